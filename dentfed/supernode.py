"""Flower's SuperNode with brisk polls: what `dentfed clinic start` runs for a clinic.

Flower 1.42's SuperNode (`flwr.supernode.start_client_internal`) waits in three hard-coded
places, tuned for long rounds:

- it sleeps **3 s** whenever a pull finds no message for it. A clinic that has sent its reply
  pulls at once, finds nothing (the server is still collecting the other replies and
  aggregating) and sleeps 3 s, so the next round's message waited ~3 s after it arrived
  (docs/speed.md, "Flower's SuperNode polls, measured again": the next message reached the
  clinic 3.07 s after "Sent successfully", every round);
- it checks every **0.5 s** for its ClientApp's reply and for each of the reply's objects;
- it fetches a message's arrays from the SuperLink with a backoff of **1 s doubling to 10 s**
  for an array the ServerApp has not finished uploading.

This module runs Flower's own `flower-supernode` entry point with those waits shortened, and
nothing else changed: while a federation is active (a message in the last ACTIVE_WINDOW
seconds) an idle SuperNode pulls every IDLE_POLL seconds, and falls back to Flower's 3 s
after that, so an idle clinic loads the SuperLink no more than Flower's does; the local waits
become LOCAL_POLL; the fetches back off from OBJECT_POLL_INITIAL to OBJECT_POLL_CAP, bounded by
Flower's overall PULL_MAX_TIME rather than its per-object try count (which, at the shorter
backoff, would give a slow link minutes instead of an hour).

The waits are recognised in Flower's source; if this Flower's SuperNode no longer has them
(another version), the SuperNode runs unchanged and says so on stderr.
"""

from __future__ import annotations

import functools
import inspect
import sys
import time
from collections.abc import Callable
from typing import Any

IDLE_POLL = 0.25  # s between pulls of an idle SuperNode while a federation is active
ACTIVE_WINDOW = 120.0  # s after the last message during which a SuperNode counts as active
LOCAL_POLL = 0.05  # s between checks for the ClientApp's reply in the SuperNode's own store
OBJECT_POLL_INITIAL, OBJECT_POLL_CAP = 0.05, 0.5  # s, fetching arrays from the SuperLink

FLOWER_IDLE_SLEEP, FLOWER_LOCAL_SLEEP = 3, 0.5  # Flower 1.42's values, as in its source


class BriskClock:
    """Stands in for the `time` module inside Flower's SuperNode loop: `sleep(3)` (the idle
    sleep) lasts IDLE_POLL while the node is active, `sleep(0.5)` (the local waits) lasts
    LOCAL_POLL; everything else is the real `time`."""

    def __init__(self, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sleep, self._clock = sleep, clock
        self.last_activity = float("-inf")

    def active(self) -> bool:
        return self._clock() - self.last_activity < ACTIVE_WINDOW

    def touch(self) -> None:
        """A message came in or a reply went out."""
        self.last_activity = self._clock()

    def sleep(self, seconds: float) -> None:
        if seconds == FLOWER_IDLE_SLEEP and self.active():
            seconds = IDLE_POLL
        elif seconds == FLOWER_LOCAL_SLEEP:
            seconds = LOCAL_POLL
        self._sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def _marks_activity(fn: Callable[..., Any], clock: BriskClock,
                    when: Callable[[Any], bool]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if when(result):
            clock.touch()
        return result
    return wrapped


def brisk_polls(module: Any = None) -> BriskClock | None:
    """Shorten the waits of Flower's SuperNode module (`flwr.supernode.start_client_internal`
    unless given); the clock installed, or None (nothing changed) where this Flower's source
    does not have the waits this module knows."""
    if module is None:
        from flwr.supernode import start_client_internal as module
    if isinstance(getattr(module, "time", None), BriskClock):
        return module.time  # already patched in this process
    try:
        loop = inspect.getsource(module.start_client_internal)
        push = inspect.getsource(module._push_messages)
        pull = module.pull_objects
    except (AttributeError, OSError, TypeError):
        return None
    if (f"time.sleep({FLOWER_IDLE_SLEEP})" not in loop
            or f"time.sleep({FLOWER_LOCAL_SLEEP})" not in push
            or "initial_backoff" not in inspect.signature(pull).parameters):
        return None
    clock = BriskClock()
    module.time = clock
    # a pulled message (a run id) or a sent reply: the federation is active
    module._pull_and_store_message = _marks_activity(
        module._pull_and_store_message, clock, lambda run_id: run_id is not None)
    module._push_messages = _marks_activity(module._push_messages, clock, lambda _: True)
    module.pull_objects = functools.partial(
        pull, initial_backoff=OBJECT_POLL_INITIAL, backoff_cap=OBJECT_POLL_CAP,
        max_tries_per_object=None)
    return clock


def main() -> None:
    """`flower-supernode` with brisk polls; the same arguments."""
    if brisk_polls() is None:
        print("dentfed supernode: this Flower's SuperNode loop is not the one dentfed knows; "
              "running it with Flower's own polling intervals", file=sys.stderr, flush=True)
    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True)  # a clinic's log says when each message came
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
