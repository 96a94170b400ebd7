"""Deployment with real processes on 127.0.0.1: a SuperLink with TLS and SuperNode
authentication started by `dentfed coordinator start`, clinics registered with `dentfed
coordinator register` and started with `dentfed clinic start`, runs with `dentfed coordinator
run`. Every process gets a unique environment tag and is killed by it afterwards."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from client.audit import AUDIT_ENV
from client.clinic import CLINIC_TOKEN_FILE
from dentfed import deploy
from server.checkpoint import CHECKPOINT, FEDERATION_ID_FILE, load_checkpoint
from shared.config import load_config
from shared.fedio import CLINIC_RECORD, CLINIC_TOKEN_KEY, build_global_model, expected_shapes
from simulations.engine import free_port
from simulations.local_deployment import LocalFederation, wait_process
from tests.conftest import write_tiny_multilabel
from tests.test_federation import _fed_config

pytestmark = pytest.mark.slow  # real SuperLink/SuperNode processes over TLS


class Federation(LocalFederation):
    """A LocalFederation whose clinics hold tiny manifests with distinctive patient ids (to
    grep for afterwards) and record every reply they send (the audit folder); one key more
    than clinics, for a clinic that is never registered."""

    def __init__(self, root: Path, clinics: int):
        self.audit = root / "audit"
        super().__init__(root, keys=clinics + 1,
                         env={"OMP_NUM_THREADS": "1", AUDIT_ENV: str(self.audit)})
        self.manifests = [write_tiny_multilabel(root / f"clinic_{k}", n=32, seed=k)
                          for k in range(clinics + 1)]
        self.patient_ids: list[str] = []
        for k, m in enumerate(self.manifests):
            df = pd.read_csv(m)
            df["patient_id"] = [f"PAT-{k}-{uuid.uuid4().hex[:8]}-{p}" for p in df["patient_id"]]
            df.to_csv(m, index=False)
            self.patient_ids += list(df["patient_id"].unique())
        self.test_manifest = write_tiny_multilabel(root / "server_test", n=24, seed=99)

    def start_clinic(self, k: int, *extra: str) -> subprocess.Popen:  # type: ignore[override]
        return super().start_clinic(k, self.manifests[k], "--cache-dir",
                                    str(self.root / f"cache_{k}"), *extra)

    def config(self, **fed) -> Path:
        cfg = _fed_config(local_steps=2, fraction_evaluate=0.0, min_evaluate_clinics=0,
                          **fed).model_dump(mode="json")
        path = self.root / "fed.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    def run(self, config: Path, run_dir: Path) -> subprocess.Popen:  # type: ignore[override]
        return super().run(config, run_dir, self.test_manifest)


@pytest.fixture
def federation(tmp_path):
    feds: list[Federation] = []

    def make(clinics: int) -> Federation:
        feds.append(Federation(tmp_path, clinics))
        return feds[-1]

    yield make
    for f in feds:
        f.close()


def test_tls_auth_audit_and_a_clinic_killed_mid_round(federation, tmp_path):
    """One deployment (one coordinator start instead of two): 3 registered clinics over TLS
    with SuperNode authentication; while the run goes on, an unregistered clinic and a
    plain-text client are refused, and one clinic is killed mid-round, which must not stop the
    run; every reply the clinics sent is audited and nothing of their manifests reaches the
    coordinator."""
    fed = federation(3)
    fed.start_coordinator()
    for k in range(3):
        fed.register(k)
        fed.start_clinic(k)
    fed.wait_online(3)
    run_dir = tmp_path / "run"
    proc = fed.run(fed.config(rounds=3, round_timeout=60, min_available_clinics=2,
                              min_train_clinics=2, keep_optimizer_state=True), run_dir)

    # While the run goes on: a clinic whose key was never registered is refused...
    stranger = fed.start_clinic(3)
    # ... a plain-text client gets nowhere ...
    plain = fed.start("plaintext", [deploy.flower_bin("flower-supernode"), "--insecure",
                                    "--superlink", fed.address, "--max-retries", "2",
                                    "--max-wait-time", "10", "--port", str(free_port()),
                                    "--node-config", f'manifest="{fed.manifests[3]}"'],
                      home=tmp_path / "plaintext-home")
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            reply = s.recv(100)
        except ConnectionResetError:
            reply = b""
        # The TLS listener drops a plain-text client without sending a byte (no HTTP or gRPC
        # reply, not even an error page); a timeout here would mean it is waiting for more.
        assert reply == b"", reply
    # ... and the server's certificate verifies against our CA, for the name clinics dial.
    ctx = ssl.create_default_context(cafile=str(fed.certs.ca_cert))
    with socket.create_connection(("127.0.0.1", fed.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")

    deadline = time.monotonic() + 300
    while not ((run_dir / CHECKPOINT).is_file() and load_checkpoint(run_dir)["round"] >= 1):
        assert proc.poll() is None, fed.log("run")[-3000:]
        assert time.monotonic() < deadline, "round 1 did not finish"
        time.sleep(0.2)
    fed.kill("clinic2")  # round 2 has just been sent out

    assert wait_process(stranger, 120, "unregistered SuperNode") != 0
    assert "Failed to activate SuperNode" in fed.log("clinic3")
    assert wait_process(plain, 120, "plain-text SuperNode") != 0

    assert wait_process(proc, 400, "the federated run") == 0, fed.log("run")[-3000:]
    data = json.loads((run_dir / "metrics.json").read_text())
    hist = {h["round"]: h for h in data["history"]}
    assert sorted(hist) == [0, 1, 2, 3]
    assert hist[1]["clinics_replied"] == 3  # the stranger never took part
    assert hist[2]["clinics_sampled"] == 3 and hist[2]["clinics_replied"] == 2
    # the killed clinic: the SuperLink's error for it (it stopped heartbeating) or, on a slow
    # machine, no reply within round_timeout; counted once either way
    assert hist[2]["clinics_failed"] + hist[2]["clinics_no_reply"] == 1, hist[2]
    assert set(hist[2]["clinics_errors"].values()) <= {"NODE_UNAVAILABLE",
                                                      "REPLY_MESSAGE_UNAVAILABLE"}, hist[2]
    assert all(hist[r]["skipped"] is None for r in (1, 2, 3))
    assert hist[3]["clinics_replied"] == 2
    assert data["clinics"] == 3
    report = (run_dir / "report.md").read_text()
    assert "2/3" in report and "fewer clinic" in report
    for name in ("config.yaml", "model_final.pt", "report.md", "rounds.png", CHECKPOINT):
        assert (run_dir / name).is_file(), name
    assert os.path.getsize(run_dir / "model_final.pt") > 0
    # Each clinic's AdamW state went to its own state folder for this federation (the
    # replies, audited below, carry none of it); clinic 2 was killed in round 2.
    fid = (run_dir / FEDERATION_ID_FILE).read_text().strip()
    for k, last in ((0, 3), (1, 3), (2, 1)):
        saved = {p.name for p in (fed.state_dir(k) / fid).glob("after_round_*.pt")}
        assert {f"after_round_{r}.pt" for r in range(1, last + 1)} <= saved, (k, saved)

    # Privacy audit over the network: every reply the clinics sent (their own records).
    shapes = {k: list(v) for k, v in
              expected_shapes(build_global_model(load_config(run_dir / "config.yaml"))).items()}
    entries = [json.loads(p.read_text()) for p in fed.audit.glob("*.json")]
    replied = sum(hist[r]["clinics_replied"] for r in (1, 2, 3))
    assert [e["message_type"] for e in entries].count("train") == replied == 7
    tokens = [(fed.state_dir(k) / fid / CLINIC_TOKEN_FILE).read_text().strip()
              for k in range(3)]
    assert len(set(tokens)) == 3
    for e in entries:
        assert "error" not in e, e
        assert set(e["records"]) <= {"arrays", "metrics", CLINIC_RECORD}
        # the clinic's random token for this federation, nothing else
        assert e["records"][CLINIC_RECORD]["values"][CLINIC_TOKEN_KEY].strip("'") in tokens
        assert set(e["records"][CLINIC_RECORD]["values"]) == {CLINIC_TOKEN_KEY}
        if "arrays" in e["records"]:
            arrays = e["records"]["arrays"]["arrays"]
            assert {k: a["shape"] for k, a in arrays.items()} == shapes
            assert {a["dtype"] for a in arrays.values()} == {"float32"}
        values = e["records"]["metrics"]["values"]
        assert set(values) <= {"train_loss", "train_seconds", "examples_seen", "num-examples"}
        assert all(isinstance(v, int | float) for v in values.values())
    # Nothing from any clinic's manifest (patient ids, data locations) in what the
    # coordinator wrote or logged.
    # Nor the clinics' tokens, but in the coordinator's own checkpoint.
    written = [p.read_bytes() for p in run_dir.rglob("*") if p.is_file()]
    written += [fed.logs[n].read_bytes() for n in ("run", "superlink")]
    secrets = fed.patient_ids + [str(m.parent) for m in fed.manifests] + [
        str(fed.state_dir(k)) for k in range(3)]
    for blob in written:
        assert not [s for s in secrets if s.encode() in blob]
    for p in run_dir.rglob("*"):
        if p.is_file() and p.name != CHECKPOINT:
            assert not [t for t in tokens if t.encode() in p.read_bytes()], p
    assert not [t for t in tokens for n in ("run", "superlink")
                if t.encode() in fed.logs[n].read_bytes()]


def test_a_server_whose_port_was_taken_starts_again_and_a_failed_clinic_says_why(
        federation, monkeypatch):
    """Another process can take a port between free_port() and the server's bind (an
    outgoing connection's local port): the coordinator and a clinic that exit with "address
    already in use" start again on another port. A clinic that exits for another reason (a
    key the coordinator never registered) fails wait_online at once, with its log."""
    import simulations.local_deployment as local_deployment

    with socket.socket() as busy:  # bound, not listening: as a connection's local port
        busy.bind(("127.0.0.1", free_port()))
        taken = busy.getsockname()[1]
        script = iter([taken, None, taken])  # coordinator, its second pick, clinic 0
        monkeypatch.setattr(local_deployment, "free_port",
                            lambda: next(script, None) or free_port())
        fed = federation(1)
        fed.start_coordinator()
        assert fed.port != taken
        fed.register(0)
        fed.start_clinic(0)
        fed.wait_online(1)
        assert f"--port {taken}" not in fed.log("clinic0")  # started again on another port
        fed.start_clinic(1)  # its key was never registered
        with pytest.raises(RuntimeError, match="clinic 1 exited") as err:
            fed.wait_online(2, timeout=120)
        assert "Failed to activate SuperNode" in str(err.value)
