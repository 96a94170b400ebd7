"""The clinic's round state written in the background (a ClientApp process of the warm clinic
worker): the reply leaves while the optimiser state goes to disk, and the next message, in
this process or another, reads the whole file, never none or an older one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, RecordDict

import client.clinic as clinic_mod
from client.clinic import (
    EXIT_WAITS_FOR_WRITES_ENV,
    OPTIMIZER_KEY,
    restore_round_state,
    save_round_state,
)
from dentfed import clinic_worker
from shared.atomic_files import (
    BACKGROUND_NICE,
    wait_for_background_writes,
    write_in_background,
)
from shared.fedio import FEDERATION_ID_KEY

ROOT = Path(__file__).resolve().parents[1]
WRITE_DELAY = 1.0  # s a slowed write takes: far longer than a save that does not wait for it


def _ctx(state_dir: Path) -> Context:
    """A SuperNode's Context (as `dentfed clinic start` and `coordinator run` set it), new:
    the next message's process knows nothing but the folder."""
    return Context(run_id=1, node_id=1, node_config={"state-dir": str(state_dir)},
                   state=RecordDict(), run_config={FEDERATION_ID_KEY: "fedA"})


def _moments() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return {OPTIMIZER_KEY: {"exp_avg": torch.randn(1000, generator=g),
                            "exp_avg_sq": torch.rand(1000, generator=g)}}


@pytest.fixture
def slow_writes(monkeypatch):
    """Background writes on (as in the warm worker's children), each slowed to WRITE_DELAY."""
    monkeypatch.setenv(EXIT_WAITS_FOR_WRITES_ENV, "1")
    real = clinic_mod.torch_save_atomic

    def slow(obj, path):
        time.sleep(WRITE_DELAY)
        real(obj, path)

    monkeypatch.setattr(clinic_mod, "torch_save_atomic", slow)
    yield
    assert wait_for_background_writes(30)


def test_save_returns_before_the_write_and_the_next_read_waits_for_it(tmp_path, slow_writes):
    ctx = _ctx(tmp_path / "state")
    saved = _moments()
    t0 = time.monotonic()
    save_round_state(ctx, 1, {k: dict(v) for k, v in saved.items()})
    returned = time.monotonic() - t0
    folder = tmp_path / "state" / "fedA"
    assert returned < WRITE_DELAY / 2, "save_round_state waited for its write"
    assert not (folder / "after_round_1.pt").exists()
    # The next message (a new Context: only the folder is known) asks while the write is on.
    got = restore_round_state(_ctx(tmp_path / "state"), 2, direct=(OPTIMIZER_KEY,))
    assert time.monotonic() - t0 >= WRITE_DELAY
    assert set(got) == {OPTIMIZER_KEY}
    for name, t in saved[OPTIMIZER_KEY].items():
        assert torch.equal(got[OPTIMIZER_KEY][name], t)


def test_another_process_reading_during_the_write_gets_the_whole_file(tmp_path, slow_writes):
    """As on a SuperNode: the next message runs in another process, which must wait on the
    folder's lock, not find no file (and start the optimiser afresh) or a partial one."""
    state = tmp_path / "state"
    (state / "fedA").mkdir(parents=True)
    ready = tmp_path / "reader-ready"
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, sys, time
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from flwr.app import Context, RecordDict
        from client.clinic import OPTIMIZER_KEY, restore_round_state
        from shared.fedio import FEDERATION_ID_KEY
        ctx = Context(run_id=2, node_id=1, node_config={{"state-dir": {str(state)!r}}},
                      state=RecordDict(), run_config={{FEDERATION_ID_KEY: "fedA"}})
        Path({str(ready)!r}).write_text("ready")
        while not Path({str(ready)!r} + ".go").exists():
            time.sleep(0.01)
        got = restore_round_state(ctx, 2, direct=(OPTIMIZER_KEY,))
        print(json.dumps({{k: v.sum().item() for k, v in got.get(OPTIMIZER_KEY, {{}}).items()}}))
    """)], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():  # the reader's imports
            assert reader.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        saved = _moments()
        save_round_state(_ctx(state), 1, {k: dict(v) for k, v in saved.items()})
        assert not (state / "fedA" / "after_round_1.pt").exists()
        Path(str(ready) + ".go").write_text("go")  # the reader asks while the write is on
        out, _ = reader.communicate(timeout=120)
    finally:
        reader.kill()
    assert reader.returncode == 0
    assert json.loads(out) == pytest.approx(
        {k: v.sum().item() for k, v in saved[OPTIMIZER_KEY].items()})


def test_a_failed_background_write_is_logged_and_frees_the_lock(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(EXIT_WAITS_FOR_WRITES_ENV, "1")

    def full_disk(obj, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(clinic_mod, "torch_save_atomic", full_disk)
    save_round_state(_ctx(tmp_path / "state"), 1, _moments())
    assert wait_for_background_writes(30)
    assert "the clinic's state after round 1 failed" in caplog.text
    t0 = time.monotonic()  # the lock is free: the next round starts afresh, and says so
    assert restore_round_state(_ctx(tmp_path / "state"), 2, direct=(OPTIMIZER_KEY,)) == {}
    assert time.monotonic() - t0 < 5
    assert "no saved clinic state" in caplog.text


def test_without_the_worker_the_state_is_written_before_save_returns(tmp_path, monkeypatch):
    """Flower's own ClientApp processes and simulation actors (Ray may stop an actor at the
    end of a run) write at once."""
    monkeypatch.delenv(EXIT_WAITS_FOR_WRITES_ENV, raising=False)
    save_round_state(_ctx(tmp_path / "state"), 1, _moments())
    assert (tmp_path / "state" / "fedA" / "after_round_1.pt").is_file()


def test_the_worker_child_waits_for_background_writes_before_it_exits(tmp_path):
    """The warm worker's children end with os._exit, which would stop a write half-way."""
    target = tmp_path / "written"

    def write():
        time.sleep(WRITE_DELAY)
        target.write_text("done")

    write_in_background(write, "a test file")
    clinic_worker._wait_for_background_writes()
    assert target.read_text() == "done"
    assert clinic_worker.WAITS_FOR_WRITES_ENV == EXIT_WAITS_FOR_WRITES_ENV


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_a_background_write_runs_at_the_lowest_priority_and_the_caller_does_not():
    """It would otherwise take one of a small machine's cores from the reply's upload."""
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before, seen = nice(), []
    write_in_background(lambda: seen.append(nice()), "a priority check")
    assert wait_for_background_writes(30)
    assert seen == [BACKGROUND_NICE]
    assert nice() == before
