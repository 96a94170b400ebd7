"""All-or-nothing writes: every file and folder dentfed writes goes through here.

A file is written under a temporary name in its own folder and renamed into place, so a crash
or an error leaves either the old file or the complete new one, and never the temporary file.
A folder is filled under a temporary name beside it and renamed as a whole.

A write may also run in a thread of its own (`write_in_background`) where the caller need not
wait for it; a process that ends with os._exit must call `wait_for_background_writes` first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("dentfed.files")
_background: list[threading.Thread] = []
BACKGROUND_NICE = 19  # the nice value of a background write's thread


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers that look at it still work)
    that becomes `path` with permissions `mode` when the block succeeds and is removed when
    it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.",
                                suffix=f".partial{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    with atomic_file(path, mode) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """UTF-8 text, written then renamed."""
    with atomic_file(path, mode) as tmp:
        tmp.write_text(text, encoding="utf-8")


def torch_save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` without a truncated file when the process dies half-way."""
    import torch  # here, not at the top: `dentfed simulate`'s parent never loads torch

    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


@contextlib.contextmanager
def atomic_folder(out: Path, replace: bool = False,
                  keep_on_error: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary folder beside `out` that becomes `out` when the block succeeds and is
    removed when it fails: never a half-written folder. `out` must be missing or empty, unless
    `replace`, which swaps a whole existing `out` for the new one. `keep_on_error(partial)`
    returning True keeps the partial folder (under its `.partial-` name) after a failure."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not replace:
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / out.name)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if keep_on_error is None or not keep_on_error(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj: object) -> None:
    """JSON file written atomically; NaN (undefined) becomes null, numpy scalars plain."""
    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        if isinstance(o, float) and math.isnan(o):
            return None
        if hasattr(o, "item") and getattr(o, "shape", None) == ():  # a numpy scalar
            return clean(o.item())
        return o

    write_text_atomic(path, json.dumps(clean(obj), indent=2, allow_nan=False))


def write_in_background(write: Callable[[], None], what: str,
                        done: Callable[[], None] | None = None) -> threading.Thread:
    """Run `write` (an atomic write) in a thread of its own, at the lowest CPU priority, and
    return at once; `done` runs after it, whether it succeeded or not. A failure is logged,
    not raised: the caller has moved on. A process killed mid-write keeps the old file (the
    write is atomic) and loses the new one, so a process that ends with os._exit waits first
    (`wait_for_background_writes`); a normal interpreter exit joins the thread by itself."""
    def run() -> None:
        # Lowest CPU priority, this thread only (Linux): nobody waits for it, and on a small
        # machine it would take CPU from what is waited for (the reply's upload).
        if sys.platform.startswith("linux"):  # elsewhere the id is no process id
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
        try:
            write()
        except Exception:  # noqa: BLE001 - nobody is left to raise it to
            log.exception("writing %s failed", what)
        finally:
            if done is not None:
                done()

    thread = threading.Thread(target=run, name=f"dentfed background write: {what}")
    thread.start()
    _background.append(thread)
    return thread


def wait_for_background_writes(timeout: float | None = None) -> bool:
    """Wait for this process's background writes, at most `timeout` seconds in all; True when
    none is left running."""
    end = None if timeout is None else time.monotonic() + timeout
    for thread in list(_background):
        thread.join(None if end is None else max(0.0, end - time.monotonic()))
    _background[:] = [t for t in _background if t.is_alive()]
    return not _background
