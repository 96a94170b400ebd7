"""`dentfed simulate --ray-address`: virtual clinics on a real multi-node Ray cluster (two
`ray start` nodes on 127.0.0.1), the same final model as on the embedded engine, and nothing
left running on the cluster afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from shared.config import load_config
from shared.errors import DentfedError
from simulations.engine import (
    FIRST_FREE_PORT,
    RAY_DISK_THRESHOLD,
    check_ray_address,
    engine_env,
    ephemeral_port_range,
    free_port,
    kill_tagged,
    stop_group,
)
from tests.test_federation import two_clinic_simulation

RAY = str(Path(sys.executable).parent / "ray")

# Run in a separate driver process: what the cluster knows about nodes, actors and jobs.
CLUSTER_STATE = textwrap.dedent("""
    import json, sys, ray
    from ray._private import state
    ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
    me = ray.get_runtime_context().get_job_id()
    print(json.dumps({
        "nodes": {n["NodeID"]: {"alive": n["Alive"], "head": "node:__internal_head__" in
                                n["Resources"]} for n in ray.nodes()},
        "actors": [{"class": a["ActorClassName"], "state": a["State"],
                    "node": a["Address"]["NodeID"]} for a in state.actors().values()],
        "jobs": [{"id": j["JobID"], "dead": j["IsDead"]} for j in state.jobs()
                 if j["JobID"] != me]}))
    ray.shutdown()
""")


def cluster_state(address: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CLUSTER_STATE, address], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def local_ray_cluster(cpus_per_node: int = 1) -> Iterator[str]:
    """A head and one worker node on 127.0.0.1, each started with `ray start --block` (so the
    `ray start` process owns its node), on free ports, in a private temp dir; yields the
    head's address. Stopped by process group and by a tag in every process's environment,
    never with a machine-wide `ray stop`."""
    tag = uuid.uuid4().hex
    env = {"RAY_local_fs_capacity_threshold": RAY_DISK_THRESHOLD, **os.environ,
           "DENTFED_SIM_TAG": tag, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    temp = Path(tempfile.mkdtemp(prefix="ray-t-", dir="/tmp"))  # unix sockets: short path
    port = free_port()
    # Worker ports above the kernel's ephemeral range (free_port() picks below it, and
    # outgoing connections take theirs inside it): the three can never collide.
    base = random.randrange(ephemeral_port_range()[1] + 1, 65536 - 200, 200)
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(cpus_per_node),
              "--num-gpus", "0", "--object-store-memory", str(100 * 2**20),
              "--disable-usage-stats"]
    procs: list[subprocess.Popen] = []

    def start(args: list[str], i: int) -> None:
        ports = ["--dashboard-agent-listen-port", str(free_port()),
                 "--dashboard-agent-grpc-port", str(free_port()),
                 "--metrics-export-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()),
                 "--min-worker-port", str(base + 100 * i),
                 "--max-worker-port", str(base + 100 * i + 99)]
        log = (temp / f"node{i}.log").open("w")
        procs.append(subprocess.Popen([RAY, "start", *args, *common, *ports], env=env,
                                      stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    address = f"127.0.0.1:{port}"
    try:
        start(["--head", "--port", str(port), "--include-dashboard", "false",
               "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp)], 0)
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(DentfedError):
                check_ray_address(address, timeout=1)
                break
            assert time.monotonic() < deadline, (temp / "node0.log").read_text()[-2000:]
            assert procs[0].poll() is None, (temp / "node0.log").read_text()[-2000:]
            time.sleep(0.5)
        start(["--address", address], 1)
        deadline = time.monotonic() + 120
        while len([n for n in cluster_state(address)["nodes"].values() if n["alive"]]) < 2:
            assert time.monotonic() < deadline, (temp / "node1.log").read_text()[-2000:]
            assert procs[1].poll() is None, (temp / "node1.log").read_text()[-2000:]
            time.sleep(1)
        yield address
    finally:
        for p in reversed(procs):
            stop_group(p, grace=15)
        kill_tagged(tag)
        shutil.rmtree(temp, ignore_errors=True)


def _simulate(cfg_path: Path, manifest: Path, out: Path, *extra: str) -> str:
    """Run `dentfed simulate`; returns its stderr (the log) for failure messages."""
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                        str(cfg_path), "--manifest", str(manifest), "--out", str(out),
                        *extra], capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stderr


def test_engine_environment_lets_ray_use_a_nearly_full_disk(tmp_path, monkeypatch):
    """CI once failed because the disk was 95% used (Ray's default refusal point) with GBs
    free: one refused message cost Flower's backend an actor, and every later message failed."""
    monkeypatch.delenv("RAY_local_fs_capacity_threshold", raising=False)
    monkeypatch.setenv("FLWR_HOME", "/elsewhere")
    env = engine_env(tmp_path, "tag0", None)
    assert env["RAY_local_fs_capacity_threshold"] == RAY_DISK_THRESHOLD == "0.99"
    assert env["RAY_ADDRESS"] == "local"
    # The tag and home come last (kill_tagged reads them from the end of /proc/PID/environ).
    assert list(env)[-2:] == ["FLWR_HOME", "DENTFED_SIM_TAG"]
    assert env["FLWR_HOME"] == str(tmp_path)
    monkeypatch.setenv("RAY_local_fs_capacity_threshold", "0.9")  # the caller's choice stands
    env = engine_env(tmp_path, "tag0", "10.0.0.1:6379")
    assert env["RAY_local_fs_capacity_threshold"] == "0.9"
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379"


def test_free_ports_lie_outside_the_range_outgoing_connections_take_theirs_from():
    """A port from bind(0) lies in the kernel's ephemeral range, where any process's next
    outgoing connection may take it before our server binds it (a SuperNode that exited with
    "address already in use" on CI). free_port() picks below that range, above Ray's default
    worker ports, and never a port something listens on."""
    lo, hi = ephemeral_port_range()
    assert 1024 <= lo <= hi <= 65535
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {free_port() for _ in range(200)}
        assert busy.getsockname()[1] not in ports
    assert all(FIRST_FREE_PORT <= p < lo for p in ports), sorted(ports)[:5]
    assert len(ports) > 150  # random picks, not one port handed to every caller


@pytest.mark.slow  # four real SuperLink starts
def test_simulation_superlink_starts_again_when_its_port_was_taken(tmp_path, monkeypatch):
    """The engine's SuperLink exits when another process took its port after free_port()
    picked it; the engine picks another and starts it again (at most 3 tries)."""
    import simulations.engine as engine

    with socket.socket() as busy:  # bound, not listening: as a connection's local port
        busy.bind(("127.0.0.1", free_port()))
        taken = busy.getsockname()[1]
        picks = iter([taken])
        real = engine.free_port
        monkeypatch.setattr(engine, "free_port", lambda: next(picks, None) or real())
        with engine.simulation_superlink(tmp_path) as (port, _env):
            assert port != taken
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
        assert engine.port_taken(tmp_path / "superlink.log") is False  # the last start's log
        monkeypatch.setattr(engine, "free_port", lambda: taken)  # taken every time: give up
        with pytest.raises(DentfedError, match="exited"), \
                engine.simulation_superlink(tmp_path / "again"):
            pass
        assert engine.port_taken(tmp_path / "again" / "superlink.log")


def test_ray_address_must_be_a_listening_head():
    with pytest.raises(DentfedError, match="expected HOST:PORT"):
        check_ray_address("nohost")
    with pytest.raises(DentfedError, match=r"no Ray cluster at 127\.0\.0\.1:\d+"):
        check_ray_address(f"127.0.0.1:{free_port()}", timeout=1)


@pytest.mark.slow  # a 2-node Ray cluster and a real Flower simulation on it
def test_simulation_on_a_two_node_ray_cluster_matches_the_embedded_engine(tmp_path):
    """The reference is the in-process run of the same split, server loop and ClientApp, which
    tests/test_resilience.py shows equal, bit for bit, to the embedded engine's run."""
    from tests.test_resilience import _uninterrupted_in_process

    cfg_path, manifest = two_clinic_simulation(tmp_path, rounds=2)
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["split"]["clinics"] = 4
    cfg["federation"].update(min_train_clinics=4, min_evaluate_clinics=4,
                             min_available_clinics=4)
    cfg["data"]["augment"] = False
    cfg["tracking"] = {"enabled": False}
    cfg_path.write_text(yaml.safe_dump(cfg))

    emb = _uninterrupted_in_process(load_config(cfg_path), manifest, tmp_path / "embedded")
    with local_ray_cluster(cpus_per_node=1) as address:
        before = cluster_state(address)
        assert len(before["nodes"]) == 2
        assert not [a for a in before["actors"] if a["state"] != "DEAD"]
        log = _simulate(cfg_path, manifest, tmp_path / "cluster", "--ray-address", address)
        after = cluster_state(address)
    # One CPU per node and one per clinic: the pool has one actor on each node, so both nodes
    # trained clinics.
    clinic_actors = [a for a in after["actors"] if a["class"] == "ClientAppActor"]
    assert {a["node"] for a in clinic_actors} == set(after["nodes"]), after
    # Nothing of the run is left on the cluster: every actor gone, the run's job finished.
    assert all(a["state"] == "DEAD" for a in after["actors"]), after["actors"]
    assert after["jobs"] and all(j["dead"] for j in after["jobs"]), after["jobs"]
    clu = json.loads((tmp_path / "cluster" / "metrics.json").read_text())
    assert [h["clinics_replied"] for h in clu["history"][1:]] == [4, 4], log[-4000:]
    # Every clinic computed bit for bit what it computed in process (the anonymous indices
    # may be assigned in another order), and aggregation orders the updates by content, not
    # arrival: the same metrics and the same final model, bit for bit.
    for hc in clu["history"]:
        assert json.loads(json.dumps(emb.evaluator.history[hc["round"]])) == hc["server"]
    for rnd in (1, 2):
        ours = sorted(c["train_loss"] for c in emb.recorder.rounds[rnd].train.values())
        theirs = sorted(c["train_loss"] for c in clu["history"][rnd]["clinics_train"]
                        ["per_clinic"].values())
        assert ours == theirs
    a = emb.evaluator.final_state
    b = torch.load(tmp_path / "cluster" / "model_final.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
