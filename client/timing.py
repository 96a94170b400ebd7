"""Where a clinic's ClientApp process spends its seconds, for the deployment benchmark
(simulations/bench_deploy.py): a SuperNode starts a fresh process for every message, so the
interpreter, the imports, the manifest, the model and the images are paid again each time.

Off unless the clinic's environment sets DENTFED_TIMING_DIR (a folder on the clinic's own
disk). Then each message's process writes one JSON file there: its pid, the message type and
wall-clock timestamps (time.time()) of its own start (from /proc), the app module loaded, the
handler entered, the manifest read, the model built, the data loaders made, the handler's
compute done and the reply returned. Timestamps and counts only; nothing of it is sent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.atomic_files import write_text_atomic

TIMING_ENV = "DENTFED_TIMING_DIR"
_marks: list[tuple[str, float]] = []


def enabled() -> bool:
    return bool(os.environ.get(TIMING_ENV))


def mark(name: str) -> None:
    """Record that `name` happened now (a no-op unless DENTFED_TIMING_DIR is set)."""
    if enabled():
        _marks.append((name, time.time()))


def process_start() -> float | None:
    """When this process started (Linux: /proc, 10 ms resolution), or None."""
    try:
        fields = Path("/proc/self/stat").read_text().rpartition(")")[2].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: ticks after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return time.time() - (uptime - started)


def write(message_type: str) -> None:
    """Write this message's marks to DENTFED_TIMING_DIR and start a new list."""
    folder = os.environ.get(TIMING_ENV)
    if not folder:
        return
    record = {"pid": os.getpid(), "message_type": message_type,
              "process_start": process_start(), "marks": list(_marks)}
    _marks.clear()
    path = Path(folder) / f"{os.getpid()}-{time.time_ns()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(record))


def timing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: mark the handler's start and the reply, then write this message's marks
    (only with DENTFED_TIMING_DIR set)."""
    mark("handler_start")
    try:
        return call_next(msg, context)
    finally:
        mark("reply")
        write(msg.metadata.message_type)
