"""Checkpoint/resume and bad clinics: a real Flower simulation (SuperLink, SuperExec, Ray)
on 127.0.0.1: crash the whole server side after round 2 and resume; a clinic that sends NaN."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord

from server.checkpoint import CHECKPOINT, load_checkpoint
from server.federation import NodeWaitTimeout, RecordingGrid, RoundRecorder
from shared.config import load_config
from shared.errors import DentfedError
from simulations.engine import kill_tagged
from simulations.simulate import simulate
from tests.test_federation import _pids_with_flwr_home_under, describe_pids, two_clinic_simulation

FAST = dict(local_steps=2, fraction_evaluate=0.0, min_evaluate_clinics=0)


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "model_final.pt", weights_only=False)["state_dict"]


def _wait_for_round(run: Path, rnd: int, proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if (run / CHECKPOINT).is_file():
            done = int(load_checkpoint(run)["round"])  # written atomically: never half a file
            if done >= rnd:
                return done
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of round {rnd} within {timeout} s")


def _uninterrupted_in_process(cfg, manifest: Path, out: Path):
    """The reference run: the same split, server loop and ClientApp as `dentfed simulate`,
    over the in-process grid (no Flower processes, so one engine start less). Ray gives each
    simulated clinic one CPU, so torch runs single-threaded here too: the same arithmetic."""
    from server.federation import run_federation
    from simulations.bench_quality import InProcessGrid
    from simulations.simulate import prepare_split

    prepare_split(cfg, manifest, out / "split")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_federation(InProcessGrid(out / "split", cfg.split.clinics), cfg,
                              out / "split" / "server_test.csv", run_dir=out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # real Flower simulation
def test_crash_after_round_two_and_resume_equals_uninterrupted_run(tmp_path):
    # FedAdam: the resumed run only matches if the server optimiser's moments were restored.
    cfg_path, manifest = two_clinic_simulation(tmp_path, rounds=3, strategy="fedadam",
                                               server_lr=0.01, **FAST)
    cfg = load_config(cfg_path)
    straight = _uninterrupted_in_process(cfg, manifest, tmp_path / "straight")
    assert sorted(straight.evaluator.history) == [0, 1, 2, 3]

    run, tag = tmp_path / "crashed", uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                             str(cfg_path), "--manifest", str(manifest), "--out", str(run)],
                            env={**os.environ, "DENTFED_SIM_TAG": tag},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        done = _wait_for_round(run, 2, proc, timeout=400)
    finally:  # the crash: SIGKILL the CLI, SuperLink, SuperExec, ServerApp and Ray at once
        kill_tagged(tag, grace=0.0)
        proc.wait(timeout=30)
        # A process forked while the SIGKILLs went out (Ray starting a worker) escapes that
        # one pass; sweep the crashed run's stragglers, so that the check at the end is about
        # what the resumed run leaves (a fresh-clone CI run once failed on such a straggler).
        kill_tagged(tag)
        # Ray's agents retitle themselves, which can overwrite the tag in what /proc shows of
        # their environment (seen once: two agents of the crashed run outlived the test):
        # they still carry the crashed run's FLWR_HOME.
        for home in tmp_path.glob(".crashed.work-*/flower/flwr-home"):
            kill_tagged(tag, also=f"FLWR_HOME={home}")
    assert done == 2 and not (run / "metrics.json").exists(), "crashed too late"
    before = json.loads(load_checkpoint(run)["recorder"])  # token -> index, node id -> index
    for stray in tmp_path.glob(".crashed.work-*"):  # what the killed CLI could not clean up
        shutil.rmtree(stray)

    timing = tmp_path / "clinic-timing"  # marks only (client/timing.py), to see the warm-up
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DENTFED_TIMING_DIR", str(timing))
        resumed = simulate(None, None, run, echo=False, resume=True)
    assert [h["round"] for h in resumed["history"]] == [0, 1, 2, 3]
    # Every actor imported the handlers as it started (client/warmup.py), and the first
    # record of each actor process holds that mark.
    records = [json.loads(p.read_text()) for p in sorted(timing.glob("*.json"))]
    first = {}
    for rec in sorted(records, key=lambda r: r["marks"][0][1]):
        first.setdefault(rec["pid"], rec)
    assert first and all("warm_up" in dict(r["marks"]) for r in first.values()), first
    assert resumed["history"][1]["clinics_replied"] == 2  # rounds 1-2 from the checkpoint
    # A new Flower run, new node ids: each clinic keeps its index by its token (2 clinics, the
    # same token -> index map as before the crash), not 4.
    assert resumed["clinics"] == 2
    assert all(set(h["clinics_train"]["per_clinic"]) == {"0", "1"}
               for h in resumed["history"][1:])
    after = json.loads(load_checkpoint(run)["recorder"])
    assert sorted(after["tokens"]) == sorted(before["tokens"])
    assert sorted(i for _, i in before["tokens"]) == [0, 1]
    assert len(after["index"]) == 4  # the resumed run's node ids differ, as said above
    a, b = straight.evaluator.final_state, _final_state(run)
    assert a.keys() == b.keys()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert diff == 0.0, f"resumed model differs from the uninterrupted one by {diff}"
    assert resumed["history"][3]["server"]["loss"] == straight.evaluator.history[3]["loss"]
    assert (run / "flower-resumed.log").is_file() and (run / "split").is_dir()
    assert not (left := _pids_with_flwr_home_under(tmp_path)), describe_pids(left)

    with pytest.raises(DentfedError, match="not empty"):  # no accidental overwrite
        simulate(cfg, manifest, run, echo=False)


class _NaNFromClinic:
    """The in-process grid, except that clinic `bad`'s training replies carry NaN weights (a
    broken or malicious clinic)."""

    def __init__(self, grid, bad: int):
        self.grid, self.bad = grid, bad

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for r in replies:
            if (r.metadata.message_type.startswith("train") and not r.has_error()
                    and r.metadata.src_node_id == self.bad):
                r.content["arrays"] = ArrayRecord(
                    {k: Array(np.full(a.shape, np.nan, np.float32))
                     for k, a in r.content["arrays"].items()})
        return replies


@pytest.mark.slow  # 2 rounds of real training in process
def test_clinic_sending_nan_is_rejected_and_the_run_completes(tmp_path, caplog):
    """The real server loop and ClientApp over the in-process grid (the transport adds nothing
    to the server's checks; the Flower runtime is exercised by the other real runs here)."""
    from server.federation import run_federation
    from server.run_folder import write_run_folder
    from simulations.bench_quality import InProcessGrid
    from simulations.simulate import prepare_split

    cfg_path, manifest = two_clinic_simulation(tmp_path, rounds=2, min_train_clinics=1, **FAST)
    cfg = load_config(cfg_path)
    split = tmp_path / "split"
    prepare_split(cfg, manifest, split)
    grid = _NaNFromClinic(InProcessGrid(split, 2), bad=2)
    with caplog.at_level("WARNING", logger="dentfed.server"):
        res = run_federation(grid, cfg, split / "server_test.csv", run_dir=tmp_path / "run")
    data = write_run_folder(res, tmp_path / "run")
    assert data["stopped"] is None
    for h in data["history"][1:]:
        assert h["clinics_replied"] == 2
        (why,) = h["clinics_rejected"].values()  # exactly one clinic rejected per round
        assert "NaN or Inf" in why
    state = _final_state(tmp_path / "run")
    assert all(torch.isfinite(v.float()).all() for v in state.values())
    assert "update from clinic" in caplog.text and "rejected" in caplog.text
    assert str(manifest.parent) not in caplog.text  # the log names clinics by index only
    report = (tmp_path / "run" / "report.md").read_text()
    assert "1/2" in report  # one of two clinics used per round


class _Grid:
    """A Grid with `n` connected nodes and nothing else."""

    def __init__(self, n: int):
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def test_waiting_for_clinics_is_bounded():
    grid = RecordingGrid(_Grid(1), RoundRecorder(), {}, required=2, wait_timeout=0.3)
    assert grid.get_node_ids() == [1]  # still within the wait
    time.sleep(0.4)
    with pytest.raises(NodeWaitTimeout, match="only 1 clinic.*2 needed.*node_wait_timeout"):
        grid.get_node_ids()
    enough = RecordingGrid(_Grid(3), RoundRecorder(), {}, required=2, wait_timeout=0.0)
    assert enough.get_node_ids() == [1, 2, 3]


def test_resume_refuses_a_folder_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(DentfedError, match="cannot resume"):
        simulate(None, None, tmp_path / "run", resume=True)
    (tmp_path / "run" / "split").mkdir()
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"not a checkpoint")
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump({}))
    with pytest.raises(DentfedError, match="not a readable dentfed checkpoint"):
        load_checkpoint(tmp_path / "run")


@pytest.mark.parametrize("strategy", ["fedavgm", "fedyogi"])
def test_server_optimiser_state_survives_a_checkpoint_file(tmp_path, strategy):
    """Two strategies get the same rounds; one is rebuilt from a checkpoint file between
    rounds 2 and 3. Without its momentum/moments the third aggregate would differ."""
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.task_identity import TaskIdentity

    from server.checkpoint import (
        restore_rng_state,
        restore_strategy_state,
        rng_state,
        save_checkpoint,
        strategy_state,
    )
    from server.strategy import make_strategy
    from tests.test_federation import _fed_config, _reply

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    cfg = _fed_config(strategy=strategy, server_lr=0.1)
    rng = np.random.default_rng(0)
    updates = [[rng.normal(size=(3, 2)).astype(np.float32) for _ in range(2)] for _ in range(3)]

    def step(strat, rnd, arrays):
        strat.configure_train(rnd, arrays, ConfigRecord(), _Grid(2))
        new, _ = strat.aggregate_train(rnd, [_reply(1, {"w": updates[rnd - 1][0]}, 3),
                                             _reply(2, {"w": updates[rnd - 1][1]}, 5)])
        return new

    start = ArrayRecord({"w": Array(np.zeros((3, 2), np.float32))})
    straight = make_strategy(cfg.federation)
    a = step(straight, 1, start)
    a = step(straight, 2, a)
    save_checkpoint(tmp_path, {"strategy": strategy_state(straight), "rng": rng_state(),
                               "arrays": {"w": torch.from_numpy(a["w"].numpy().copy())}})
    a3 = step(straight, 3, a)

    ck = load_checkpoint(tmp_path)
    restored = make_strategy(cfg.federation)
    restore_strategy_state(restored, ck["strategy"])
    restore_rng_state(ck["rng"])
    b3 = step(restored, 3, ArrayRecord({"w": Array(ck["arrays"]["w"].numpy())}))
    np.testing.assert_array_equal(a3["w"].numpy(), b3["w"].numpy())
    fresh = make_strategy(cfg.federation)  # the same round without the state differs
    c3 = step(fresh, 3, ArrayRecord({"w": Array(ck["arrays"]["w"].numpy())}))
    assert not np.allclose(a3["w"].numpy(), c3["w"].numpy())


def test_dp_sgd_runs_resume_where_clinics_keep_their_ledgers_secagg_does_not(tmp_path):
    """DP-SGD resumes: each clinic's epsilon ledger is in its state folder for the federation
    (tests/test_privacy.py runs it), unless the resumed run cannot give the clinics the same
    folders (a run folder without a federation id). SecAgg+ keeps no checkpoint at all."""
    from server.resume import check_resumable
    from tests.test_federation import _fed_config

    cfg = _fed_config()
    check_resumable(cfg)  # plain FedAvg: fine
    check_resumable(cfg, clinic_state_kept=False)  # nothing there to lose but round state
    cfg.privacy = type(cfg.privacy).model_validate(
        {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}})
    check_resumable(cfg)
    with pytest.raises(DentfedError, match="keeps no federation id"):
        check_resumable(cfg, clinic_state_kept=False)
    cfg.privacy = type(cfg.privacy).model_validate({"secagg": {}})
    with pytest.raises(DentfedError, match="cannot resume a SecAgg\\+ run"):
        check_resumable(cfg)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_ctrl_c_leaves_a_resumable_run_or_nothing(tmp_path, tiny_manifest, monkeypatch,
                                                  checkpointed):
    """Ctrl-C while Flower runs: without a checkpointed round the run folder must be gone (a
    rerun with the same --out then works); with one, --resume must find it."""
    import simulations.simulate as sim
    from tests.conftest import tiny_config

    def interrupted(run_config, **kwargs):
        if checkpointed:
            (Path(run_config["run-dir"]) / CHECKPOINT).write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(sim, "run_flower_simulation", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        simulate(tiny_config(), tiny_manifest, out, echo=False)
    if checkpointed:
        assert (out / CHECKPOINT).is_file() and (out / "split").is_dir()
        assert (out / "config.yaml").is_file()
    else:
        assert not out.exists()
    assert not list(tmp_path.glob(".run.work-*"))


def test_timeout_stops_a_silent_hang(tmp_path, monkeypatch):
    """A `flwr run` that prints nothing and never ends is stopped at the timeout."""
    import contextlib

    from simulations import engine

    hang = tmp_path / "flwr"
    hang.write_text("#!/bin/sh\nexec sleep 20\n")
    hang.chmod(0o755)

    @contextlib.contextmanager
    def no_superlink(work, ray_address=None):
        (work / "home").mkdir(parents=True, exist_ok=True)
        yield 1, {**os.environ, "FLWR_HOME": str(work / "home")}

    monkeypatch.setattr(engine, "simulation_superlink", no_superlink)
    monkeypatch.setattr(engine, "_bin", lambda name: str(hang))
    t0 = time.monotonic()
    with pytest.raises(DentfedError, match="exceeded 1 s"):
        engine.run_flower_simulation({}, num_clinics=2, client_cpus=1, client_gpus=0,
                                     max_concurrent=1, work=tmp_path / "w", timeout=1,
                                     echo=False)
    assert time.monotonic() - t0 < 15


def test_a_message_ray_refuses_leaves_its_actor_in_the_simulation_pool(monkeypatch):
    """Flower 1.42 loses the actor when handing it a message raises (CI: Ray's "Local disk is
    full"); the patch in server/actor_pool.py puts it back, and the normal path is unchanged."""
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    from server.actor_pool import keep_actors_on_refused_messages

    monkeypatch.setattr(BasicActorPool, "submit", BasicActorPool.submit)  # restored after
    pool = object.__new__(BasicActorPool)  # the real class, without starting Ray actors
    pool.pool, pool._future_to_actor = ["actor0", "actor1"], {}

    def refused(actor, app_fn, message, cid, context):
        raise RuntimeError("Local disk is full")

    job = (None, "message", "0", "context")
    if not getattr(BasicActorPool.submit, "_dentfed_keeps_actor", False):
        with pytest.raises(RuntimeError):
            pool.submit(refused, job)
        assert pool.pool == ["actor0"]  # Flower's own submit: the actor is gone
        pool.pool = ["actor0", "actor1"]
    assert keep_actors_on_refused_messages()
    assert keep_actors_on_refused_messages()  # idempotent
    with pytest.raises(RuntimeError, match="disk is full"):
        pool.submit(refused, job)
    assert sorted(pool.pool) == ["actor0", "actor1"] and not pool._future_to_actor
    future = pool.submit(lambda actor, *a: f"future of {actor}", job)
    assert pool._future_to_actor == {future: "actor1"} and pool.pool == ["actor0"]
    pool.add_actor_back_to_pool(future)
    assert sorted(pool.pool) == ["actor0", "actor1"]


class _FailingTrainGrid:
    """An in-process grid whose clinics answer the train messages of the rounds in `fail`
    with an error reply (as Flower's runtime does for a ClientApp that raised)."""

    def __init__(self, grid, fail: set[int]):
        self.grid, self.fail = grid, fail

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        messages = list(messages)
        rnd = int(messages[0].content["config"]["server-round"]) if messages else 0
        if messages and messages[0].metadata.message_type.startswith("train") and \
                rnd in self.fail:
            return [Message(Error(code=0, reason="clinic failed"), reply_to=m)
                    for m in messages]
        return self.grid.send_and_receive(messages, timeout=timeout)


def test_a_run_in_which_every_round_was_skipped_reports_that_it_trained_nothing(tmp_path):
    """Every round skipped (here: every clinic's train reply an error) leaves the initial
    model as the "final" one; the run must say so (the CLI exits 1 on `stopped`), while a run
    with one skipped round and one trained round is a normal run."""
    from server.federation import run_federation
    from shared.config import config_from_dict
    from simulations.bench_quality import InProcessGrid
    from simulations.simulate import prepare_split
    from tests.conftest import write_tiny_multilabel
    from tests.test_quality import _cfg

    manifest = write_tiny_multilabel(tmp_path / "data", n=48)
    raw = _cfg(rounds=2, local_steps=1, min_train_clinics=2, min_available_clinics=2,
               fraction_evaluate=0.0, min_evaluate_clinics=0).model_dump(mode="json")
    raw["split"] = {"clinics": 2, "scheme": "iid", "test_fraction": 0.25}
    cfg = config_from_dict(raw)
    split = tmp_path / "split"
    prepare_split(cfg, manifest, split)
    res = run_federation(_FailingTrainGrid(InProcessGrid(split, 2, threads=1), {1, 2}), cfg,
                         split / "server_test.csv")
    assert res.stopped and res.stopped.startswith("no round trained: all 2 were skipped")
    assert "0 usable update(s), 2 needed" in res.stopped
    assert [r.skipped is not None for r in res.recorder.rounds.values()] == [True, True]
    res = run_federation(_FailingTrainGrid(InProcessGrid(split, 2, threads=1), {1}), cfg,
                         split / "server_test.csv")
    assert res.stopped is None
    assert res.recorder.rounds[1].skipped and res.recorder.rounds[2].skipped is None
