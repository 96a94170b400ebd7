"""Federation: the clinic's messages, aggregation, update validation and a real Flower
simulation through `dentfed simulate`."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.app import app as client_app
from client.handlers import ClinicError
from server.federation import RecordingGrid, RoundRecorder
from server.strategy import make_strategy
from shared.config import config_from_dict
from shared.fedio import (
    CLINIC_RECORD,
    CLINIC_TOKEN_KEY,
    build_global_model,
    config_record,
    exchanged_keys,
    expected_shapes,
    model_arrays,
)
from shared.models import sha256_of
from tests.conftest import tiny_config


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are stamped with the process's run/node identity, which a Flower runtime
    sets; here the test process plays that role."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


def _fed_config(**fed):
    cfg = tiny_config().model_dump(mode="json")
    cfg["model"]["freeze"] = 3
    cfg["federation"] = {"local_epochs": 1, **fed}
    return config_from_dict(cfg)


def two_clinic_simulation(tmp_path: Path, **fed) -> tuple[Path, Path]:
    """A tiny manifest and a YAML config for a real 2-clinic simulation: (config, manifest)."""
    from tests.conftest import write_tiny_multilabel

    manifest = write_tiny_multilabel(tmp_path / "data", n=64)
    cfg = _fed_config(**fed).model_dump(mode="json")
    cfg["split"] = {"clinics": 2, "scheme": "iid", "test_fraction": 0.25}
    cfg["simulation"] = {"client_cpus": 1, "max_concurrent": 2}
    path = tmp_path / "fed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, manifest


def _train_message(cfg, arrays: ArrayRecord, **extra) -> Message:
    conf = config_record(cfg)
    conf["server-round"] = 1
    for k, v in extra.items():
        conf[k] = v
    return Message(RecordDict({"arrays": arrays, "config": conf}), dst_node_id=1,
                   message_type="train")


def _context(manifest) -> Context:
    return Context(run_id=1, node_id=1, node_config={"manifest": str(manifest)},
                   state=RecordDict(), run_config={})


def test_clinic_sends_only_trainable_arrays_and_scalars(tiny_manifest):
    cfg = _fed_config()
    model = build_global_model(cfg)
    reply = client_app(_train_message(cfg, model_arrays(model)), _context(tiny_manifest))
    assert not reply.has_error(), reply.error
    (arrays,) = reply.content.array_records.values()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen, "freeze: 3 should freeze parameters"
    assert set(arrays.keys()) == set(exchanged_keys(model))
    assert not frozen & set(arrays.keys())
    shapes = expected_shapes(model)
    assert all(tuple(a.shape) == shapes[k] for k, a in arrays.items())
    assert all(a.numpy().dtype == np.float32 for a in arrays.values())
    assert not reply.content.config_records  # nothing but arrays and metrics goes back
    (metrics,) = reply.content.metric_records.values()
    assert set(metrics) == {"train_loss", "train_seconds", "examples_seen", "num-examples"}
    assert all(isinstance(v, int | float) for v in metrics.values())
    # the update moved the trainable weights
    before = model_arrays(model)
    assert any(not np.allclose(before[k].numpy(), arrays[k].numpy()) for k in arrays)


@pytest.mark.slow  # two clinic trainings; the unit test is test_training's fedprox one
def test_fedprox_term_changes_the_client_update(tiny_manifest):
    cfg = _fed_config()
    start = model_arrays(build_global_model(cfg))
    ctx = _context(tiny_manifest)

    def drift(mu: float) -> float:
        extra = {"proximal-mu": mu} if mu else {}
        reply = client_app(_train_message(cfg, start, **extra), ctx)
        (arrays,) = reply.content.array_records.values()
        return sum(float(np.sum((arrays[k].numpy() - start[k].numpy()) ** 2))
                   for k in arrays if "running" not in k)

    plain, prox = drift(0.0), drift(50.0)
    assert prox < 0.9 * plain, (prox, plain)


def _reply(node: int, arrays: dict[str, np.ndarray], n: int) -> Message:
    req = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                  message_type="train")
    req.metadata.__dict__["_message_id"] = f"m{node}"  # replies need an id to point to
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    rep = Message(RecordDict({"arrays": ArrayRecord(tensors),
                              "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})}),
                  reply_to=req)
    rep.metadata.__dict__["_src_node_id"] = node
    return rep


def test_fedavg_weights_by_examples():
    cfg = _fed_config()
    a = {"w": np.zeros((2, 2), np.float32)}
    b = {"w": np.ones((2, 2), np.float32) * 4}
    arrays, _ = make_strategy(cfg.federation).aggregate_train(1, [_reply(1, a, 1),
                                                                  _reply(2, b, 3)])
    assert np.allclose(arrays["w"].numpy(), 3.0)  # (1*0 + 3*4) / 4


class _FakeGrid:
    def __init__(self, replies):
        self.replies = replies

    def send_and_receive(self, messages, *, timeout=None):
        return self.replies


def test_bad_updates_are_rejected_before_aggregation():
    shapes = {"w": (2, 2)}
    good = _reply(1, {"w": np.ones((2, 2), np.float32)}, 5)
    nan = _reply(2, {"w": np.full((2, 2), np.nan, np.float32)}, 5)
    wrong = _reply(3, {"w": np.ones((3, 2), np.float32)}, 5)
    extra = _reply(4, {"w": np.ones((2, 2), np.float32), "x": np.ones(1, np.float32)}, 5)
    rec = RoundRecorder()
    grid = RecordingGrid(_FakeGrid([good, nan, wrong, extra]), rec, shapes)
    sent = [Message(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2, 2)}),
                                "config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=n, message_type="train") for n in (1, 2, 3, 4)]
    kept = grid.send_and_receive(sent)
    assert [m.metadata.src_node_id for m in kept] == [1]
    reasons = rec.rounds[1].rejected
    assert set(reasons) == {1, 2, 3}  # anonymous clinic indices, not node ids
    assert "NaN" in reasons[1] and "shape" in reasons[2] and "names" in reasons[3]
    arrays, _ = make_strategy(_fed_config().federation).aggregate_train(1, kept)
    assert np.isfinite(arrays["w"].numpy()).all()


def _pids_with_flwr_home_under(root, wait: float = 30.0) -> set[int]:
    """Processes of this run still alive after up to `wait` s: every Flower/Ray process it
    starts inherits FLWR_HOME, which points inside the test's own tmp folder (so parallel runs
    elsewhere don't count). The wait: Ray's workers finish exiting a moment after the command
    returned (seen once in ~10 suite runs on the loaded 2-core VM, and again with 15 s while
    the other xdist worker ran a Ray cluster); one that outlives it is left running."""
    deadline = time.monotonic() + wait
    while (pids := _flwr_pids(root)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return pids


def describe_pids(pids: set[int]) -> str:
    """What the processes are (command line, and the DENTFED_SIM_TAG they carry), for a
    failure message."""
    lines = []
    for pid in sorted(pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
            tag = [v.decode() for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                   if v.startswith(b"DENTFED_SIM_TAG=")]
        except OSError:
            cmd, tag = "(gone)", []
        lines.append(f"{pid}: {cmd} {tag}")
    return "Flower processes left running:\n" + "\n".join(lines)


def _flwr_pids(root) -> set[int]:
    needle = f"FLWR_HOME={root}".encode()
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(v.startswith(needle) for v in env):
                pids.add(int(entry.name))
    return pids


@pytest.mark.slow  # CLI subprocess start-up
def test_config_error_is_one_clear_line(tmp_path, tiny_manifest):
    cfg = tiny_config().model_dump(mode="json")
    cfg["federation"] = {"strategy": "fedmagic"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                        str(tmp_path / "bad.yaml"), "--manifest", str(tiny_manifest)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "federation.strategy: Input should be 'fedavg'" in r.stderr


def test_clinic_errors_reach_the_server_without_paths_or_ids(tmp_path, tiny_manifest):
    import pandas as pd

    from client.handlers import ClinicError

    rows = pd.read_csv(tiny_manifest)
    rows.loc[0, "path"] = str(tmp_path / "P0042_Jane_Doe.png")  # missing: names a patient
    bad = tmp_path / "manifest.csv"
    rows.to_csv(bad, index=False)
    cfg = _fed_config()
    with pytest.raises(ClinicError) as err:
        client_app(_train_message(cfg, model_arrays(build_global_model(cfg))), _context(bad))
    text = str(err.value)
    assert "ManifestError" in text
    assert "P0042" not in text and str(tmp_path) not in text and "Jane" not in text


def test_server_optimisers_average_bn_statistics_instead_of_stepping_them():
    """FedAdam steps weights by about server_lr; a running variance of 1e-4 would go negative.
    The statistics must come out as the example-weighted mean of the clinics' values."""
    cfg = _fed_config(strategy="fedadam", server_lr=0.1)
    strategy = make_strategy(cfg.federation)
    start = {"w": np.zeros(3, np.float32), "bn.running_var": np.full(3, 1e-4, np.float32)}
    strategy.current_arrays = start  # what FedOpt's configure_train records each round
    a = {"w": np.full(3, -1.0, np.float32), "bn.running_var": np.full(3, 2e-4, np.float32)}
    b = {"w": np.full(3, -1.0, np.float32), "bn.running_var": np.full(3, 5e-5, np.float32)}
    arrays, _ = strategy.aggregate_train(1, [_reply(1, a, 1), _reply(2, b, 3)])
    assert np.allclose(arrays["bn.running_var"].numpy(), (2e-4 + 3 * 5e-5) / 4)
    w = arrays["w"].numpy()
    assert np.all(w < 0) and not np.allclose(w, -1.0)  # the weights did take an Adam step


def test_central_evaluation_stops_a_diverged_run_clearly(tiny_manifest):
    from server.federation import CentralEvaluator, Diverged

    cfg = _fed_config()
    model = build_global_model(cfg)
    ev = CentralEvaluator(cfg, tiny_manifest, model)
    ev(0, model_arrays(model))
    bad = model_arrays(model)
    key = next(iter(bad.keys()))
    bad[key] = ArrayRecord({key: torch.full(tuple(bad[key].shape), float("nan"))})[key]
    with pytest.raises(Diverged, match="round 1: the aggregated global model is not finite"):
        ev(1, bad)
    assert ev.final_state is not None and list(ev.history) == [0]  # last finite model kept


def test_no_reply_count_stays_sane_over_round_retries(caplog):
    """Two attempts of one round: 3 clinics sampled then 2, every reply an error. Sampled is per
    attempt while failures add up; clinics_no_reply used to come out as -2. Each error is
    logged and reported by Flower's error code name, never by its reason text (which could
    name a file at the clinic)."""
    from types import SimpleNamespace

    from flwr.app import Error

    from server.run_folder import _history

    rec = RoundRecorder()

    def attempt(nodes, erring):
        sent = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                        dst_node_id=n, message_type="train") for n in nodes]
        replies = []
        for m in sent:
            m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
            if m.metadata.dst_node_id in erring:
                r = Message(Error(2, "ValueError: /clinic/P0042_Jane.png"), reply_to=m)
                r.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                replies.append(r)
        rec.record(sent, replies, 1.0)

    with caplog.at_level(logging.WARNING, logger="dentfed.server"):
        attempt([1, 2, 3], {1, 2})  # clinic 3 does not answer
        attempt([1, 2], {1, 2})
    res = SimpleNamespace(evaluator=SimpleNamespace(history={1: {}}, seconds={}), recorder=rec,
                          train_aggregated={}, evaluate_aggregated={})
    (row,) = _history(res)
    assert row["attempts"] == 2 and row["clinics_replied"] == 0
    assert row["clinics_errors"] == {"0": "CLIENT_APP_RAISED_EXCEPTION",
                                     "1": "CLIENT_APP_RAISED_EXCEPTION"}
    assert caplog.text.count("with an error, CLIENT_APP_RAISED_EXCEPTION") == 4
    assert "P0042" not in caplog.text and "/clinic" not in caplog.text
    assert row["clinics_no_reply"] >= 0
    assert row["clinics_sampled"] == row["clinics_replied"] + row["clinics_failed"] + \
        row["clinics_no_reply"]


def test_an_error_the_superlink_sends_for_a_silent_clinic_counts_once():
    """A clinic that stops heartbeating is answered for by the SuperLink: an error reply from
    the SuperLink's own node id, in reply to the clinic's message. It is that clinic's failure,
    counted once (sampled == replied + failed + no_reply; it used to count as a failure and a
    missing reply), under its index and Flower's error code name."""
    from flwr.app import Error

    rec = RoundRecorder()
    sent = [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}),
                    dst_node_id=n, message_type="train") for n in (7, 9)]
    for m in sent:
        m.metadata.__dict__["_message_id"] = f"m{m.metadata.dst_node_id}"
    ok = Message(RecordDict({"metrics": MetricRecord({"num-examples": 7})}), reply_to=sent[0])
    ok.metadata.__dict__["_src_node_id"] = 7
    lost = Message(Error(5, "Node Unavailable"), reply_to=sent[1])
    lost.metadata.__dict__["_src_node_id"] = 1  # Flower's SUPERLINK_NODE_ID
    rec.record(sent, [ok, lost], 1.0)
    r = rec.rounds[1]
    assert (r.sampled, r.replied, r.train_failed, r.no_reply) == (2, 1, 1, 0)
    assert r.errors == {1: "NODE_UNAVAILABLE"} and set(r.train) == {0}


def _train_exchange(rec: RoundRecorder, rnd: int, tokens: dict) -> None:
    """One train exchange with node id -> the clinic token its reply carries (None: a reply
    without one, False: no reply); each reply's num-examples is its node id."""
    sent = [Message(RecordDict({"config": ConfigRecord({"server-round": rnd})}),
                    dst_node_id=n, message_type="train") for n in tokens]
    replies = []
    for m in sent:
        node = m.metadata.dst_node_id
        m.metadata.__dict__["_message_id"] = f"m{node}"
        if tokens[node] is False:
            continue
        content = RecordDict({"metrics": MetricRecord({"num-examples": node})})
        if tokens[node]:
            content[CLINIC_RECORD] = ConfigRecord({CLINIC_TOKEN_KEY: tokens[node]})
        r = Message(content, reply_to=m)
        r.metadata.__dict__["_src_node_id"] = node
        replies.append(r)
    rec.record(sent, replies, 1.0)


def test_clinic_index_follows_the_clinic_token_across_node_ids():
    """A clinic's anonymous index follows the token its replies carry, through the
    checkpoint's state into a resumed run with new node ids; a reply without a token (or with
    a malformed one) falls back to the node id; once tokens are in play a node gets its index
    at its first reply; a checkpoint from before tokens keeps its node indices."""
    a, b = "0123456789abcdef", "fedcba9876543210"
    rec = RoundRecorder()
    _train_exchange(rec, 1, {5: a, 3: b, 9: None})  # node order: 3 -> 0, 5 -> 1, 9 -> 2
    assert {i: m["num-examples"] for i, m in rec.rounds[1].train.items()} == {0: 3, 1: 5, 2: 9}
    resumed = RoundRecorder()
    resumed.load_state(rec.state())
    _train_exchange(resumed, 2, {40: a, 50: b, 60: "not a token", 70: False})
    assert {i: m["num-examples"] for i, m in resumed.rounds[2].train.items()} == \
        {1: 40, 0: 50, 3: 60}
    assert resumed.n_clinics == 4  # node 70 never replied: no index yet
    _train_exchange(resumed, 3, {70: a})  # ... and it was clinic a all along
    assert resumed.rounds[3].train[1]["num-examples"] == 70 and resumed.n_clinics == 4
    old = RoundRecorder()  # a checkpoint written before clinic tokens
    old.load_state('{"index": [[1, 0], [2, 1]], "rounds": []}')
    _train_exchange(old, 2, {2: a, 1: b})
    assert {i: m["num-examples"] for i, m in old.rounds[2].train.items()} == {0: 1, 1: 2}
    assert old.n_clinics == 2


def test_declined_reply_is_counted_by_its_record_not_its_wording():
    """A clinic's budget decline is a reply with a `declined` config record: the recorder
    counts it whatever its text says, and the strategy never sees it."""
    from shared.dp_sgd import declined_reply

    req = Message(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2, 2)}),
                              "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    req.metadata.__dict__["_message_id"] = "m7"
    rep = declined_reply(req, "epsilon would be 5.7 > 5 (reworded message)")
    rep.metadata.__dict__["_src_node_id"] = 7
    good = _reply(1, {"w": np.ones((2, 2), np.float32)}, 5)
    rec = RoundRecorder()
    sent = [req, Message(RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2, 2)}),
                                     "config": ConfigRecord({"server-round": 1})}),
                         dst_node_id=1, message_type="train")]
    kept = RecordingGrid(_FakeGrid([good, rep]), rec, {"w": (2, 2)}).send_and_receive(sent)
    assert [m.metadata.src_node_id for m in kept] == [1]
    r = rec.rounds[1]
    assert r.declined == {1: "epsilon would be 5.7 > 5 (reworded message)"}  # node 7: index 1
    assert not r.rejected and r.replied == 1 and r.train_failed == 1


def test_clinic_refuses_a_different_frozen_state(tiny_manifest, tmp_path):
    """The server's config carries a fingerprint of the frozen stages (and of the pretrained
    file); a clinic whose own frozen state differs refuses instead of training against other
    features."""
    from shared.fedio import FROZEN_KEY, PRETRAINED_KEY, config_record, frozen_fingerprint

    weights = tmp_path / "w.pt"
    torch.manual_seed(5)
    from torchvision.models import resnet18

    torch.save(resnet18(num_classes=2).state_dict(), weights)
    raw = tiny_config().model_dump(mode="json")
    raw["model"].update({"freeze": 2, "pretrained": str(weights)})
    cfg = config_from_dict(raw)
    model = build_global_model(cfg)
    conf = config_record(cfg, model)
    assert conf[FROZEN_KEY] == frozen_fingerprint(model)
    assert conf[PRETRAINED_KEY] == sha256_of(weights)
    start = model_arrays(model)

    def train_with(conf):
        conf = ConfigRecord(dict(conf))
        conf["server-round"] = 1
        return client_app(Message(RecordDict({"arrays": start, "config": conf}), dst_node_id=1,
                                  message_type="train"), _context(tiny_manifest))

    ok = train_with(conf)
    assert not ok.has_error(), ok.error
    other = dict(conf)
    other[FROZEN_KEY] = "0" * 64  # e.g. another torch build's seeded initialisation
    with pytest.raises(ClinicError, match="FrozenStateMismatch"):  # Flower's error reply
        train_with(other)
    torch.save(resnet18(num_classes=3).state_dict(), weights)  # a clinic's file differs
    with pytest.raises(ClinicError, match="FrozenStateMismatch"):
        train_with(conf)
