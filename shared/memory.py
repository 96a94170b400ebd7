"""Handing memory that Python and torch have freed back to the operating system."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def release_freed_memory() -> None:
    """glibc keeps freed heap pages for reuse, so a process stays as large as its largest
    training step or message: a simulation actor that trained a clinic held ~400 MiB it no
    longer used until its next clinic (docs/speed.md, Memory). malloc_trim(0) returns them;
    a few milliseconds, called between messages. A no-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
