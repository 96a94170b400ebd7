"""The clinic's SuperNode with brisk polls (dentfed/supernode.py): the waits it shortens, when,
and that it leaves a Flower it does not recognise alone. A real SuperNode runs it in every
deployment test (`dentfed clinic start`, tests/test_deploy.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from dentfed import deploy, supernode
from dentfed.supernode import ACTIVE_WINDOW, IDLE_POLL, LOCAL_POLL, BriskClock, brisk_polls


class FakeTime:
    def __init__(self) -> None:
        self.now, self.slept = 1000.0, []

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_idle_sleep_is_short_only_while_a_federation_is_active():
    t = FakeTime()
    clock = BriskClock(sleep=t.sleep, clock=lambda: t.now)
    clock.sleep(3)  # never a message yet: Flower's idle sleep
    clock.touch()  # a message came in or a reply went out
    clock.sleep(3)
    clock.sleep(0.5)  # the local waits for the ClientApp's reply and its objects
    clock.sleep(1.7)  # anything else is left as it is
    t.now += ACTIVE_WINDOW
    clock.sleep(3)  # quiet for the whole window: back to Flower's
    assert t.slept == [3, IDLE_POLL, LOCAL_POLL, 1.7, 3]
    assert clock.time() == pytest.approx(time.time(), abs=5)  # the rest is the real module


def _fresh_supernode_module() -> types.ModuleType:
    """A private copy of Flower's SuperNode module, so patching it changes nothing else."""
    import flwr.supernode.start_client_internal as real

    spec = importlib.util.spec_from_file_location("sci_copy", real.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_installed_flower_supernode_is_patched():
    module = _fresh_supernode_module()
    pull_before, push_before = module._pull_and_store_message, module._push_messages
    clock = brisk_polls(module)
    assert clock is not None and module.time is clock
    assert brisk_polls(module) is clock  # twice in one process: the same clock
    assert module._pull_and_store_message.__wrapped__ is pull_before
    assert module._push_messages.__wrapped__ is push_before
    assert module.pull_objects.keywords == {"initial_backoff": 0.05, "backoff_cap": 0.5,
                                            "max_tries_per_object": None}


def test_activity_is_a_pulled_message_or_a_sent_reply():
    t = FakeTime()
    clock = BriskClock(sleep=t.sleep, clock=lambda: t.now)
    pull = supernode._marks_activity(lambda run_id: run_id, clock,
                                     lambda run_id: run_id is not None)
    pull(None)  # nothing for this node
    assert not clock.active()
    pull(7)  # a message of run 7
    assert clock.active()


def test_the_patched_fetch_asks_again_quickly_for_an_array_not_uploaded_yet():
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    module = _fresh_supernode_module()
    brisk_polls(module)
    misses = {"a": 5}

    def pull(object_id: str) -> bytes:
        if misses[object_id]:
            misses[object_id] -= 1
            raise ObjectUnavailableError(object_id)
        return b"array"

    t0 = time.monotonic()
    assert module.pull_objects(["a"], pull_object_fn=pull) == {"a": b"array"}
    # Flower's backoff: 1 + 2 + 4 + 8 + 10 s; here 0.05 + 0.1 + 0.2 + 0.4 + 0.5 (+-20%)
    assert time.monotonic() - t0 < 2.0


def test_a_flower_without_the_known_waits_is_left_alone():
    def start_client_internal() -> None:  # another idle wait than the one dentfed knows
        time.sleep(1)

    def _push_messages() -> None:
        time.sleep(0.5)

    module = types.SimpleNamespace(time=time, start_client_internal=start_client_internal,
                                   _push_messages=_push_messages,
                                   _pull_and_store_message=lambda: None,
                                   pull_objects=lambda ids, pull_object_fn, *,
                                   initial_backoff=1, backoff_cap=10: {})
    assert brisk_polls(module) is None
    assert module.time is time and module._push_messages is _push_messages


def test_clinic_start_runs_the_brisk_supernode_unless_asked_not_to(tmp_path: Path):
    f = tmp_path / "x"
    f.write_text("x")
    brisk = deploy.supernode_command("127.0.0.1:9092", f, f, f, warm=True)
    assert brisk[:3] == [sys.executable, "-m", "dentfed.supernode"]
    plain = deploy.supernode_command("127.0.0.1:9092", f, f, f, warm=True, brisk_polls=False)
    assert Path(plain[0]).name == "flower-supernode"
    assert brisk[3:] == plain[1:]  # the same arguments to the same SuperNode
    help_text = subprocess.run([*brisk[:3], "--help"], capture_output=True, text=True,
                               timeout=120)
    assert help_text.returncode == 0 and "--auth-supernode-private-key" in help_text.stdout


def test_the_deployment_benchmark_reads_the_hops_from_the_timestamped_log(tmp_path: Path):
    """bench_deploy's SuperNode hop times come from the log lines Flower writes with
    timestamps on (as dentfed/supernode.py sets them)."""
    import io
    import logging

    from flwr.supercore.logger import ConsoleHandler

    from simulations.bench_deploy import supernode_hops

    stream = io.StringIO()
    handler = ConsoleHandler(timestamps=True, colored=True, stream=stream)
    log = logging.getLogger("test-supernode-hops")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    clock = iter([100.0, 100.5, 104.5, 105.25, 107.25, 107.75])
    events = ["Receiving: train message (ID: a)", "Received successfully",
              "Sending: train message (ID: b)", "Sent successfully",
              "Receiving: train message (ID: c)", "Received successfully"]
    for text in events:
        record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
        record.created = next(clock)
        record.msecs = (record.created % 1) * 1000
        handler.emit(record)
    (tmp_path / "clinic0.log").write_text(stream.getvalue())
    assert supernode_hops([tmp_path / "clinic0.log"]) == pytest.approx(
        {"receive": 0.5, "clientapp": 4.0, "send": 0.75, "wait": 2.0}, abs=0.002)
