"""bench_scale's reading of a process tree's memory with every physical page counted once
(/proc/PID/pagemap): pages a forked child shares with its parent count once, and the copies
it makes by writing count again. Summed RSS counts the shared pages twice."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from simulations.bench_scale import _mem_kb, resident_kb_once

MIB = 1024  # KiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/PID/pagemap is Linux's")
def test_shared_pages_count_once_and_written_copies_again():
    if resident_kb_once([os.getpid()]) is None:
        pytest.skip("the kernel hides physical page frames here (needs CAP_SYS_ADMIN)")
    block = np.ones(100 * 2**20 // 8)  # 100 MiB, every page touched
    from_parent, to_child = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: share the block, then write its own copy when told
        try:
            os.close(to_child)
            os.close(from_child)
            os.read(from_parent, 1)
            block += 1
            os.write(to_parent, b"w")
            os.read(from_parent, 1)  # until the parent writes or is gone
        finally:
            os._exit(0)
    os.close(from_parent)
    os.close(to_parent)
    try:
        shared = resident_kb_once([os.getpid(), pid])
        rss = [_mem_kb(p)[0] for p in (os.getpid(), pid)]
        assert sum(rss) - shared > 90 * MIB  # the block, counted twice by summed RSS
        assert shared <= max(rss) + 20 * MIB  # ... and once here
        os.write(to_child, b"w")
        os.read(from_child, 1)
        copied = resident_kb_once([os.getpid(), pid])
        assert copied - shared > 90 * MIB  # the child's written copy is its own memory
        assert copied <= sum(_mem_kb(p)[0] for p in (os.getpid(), pid)) + 20 * MIB
    finally:
        os.close(to_child)  # the child's last read returns
        os.close(from_child)
        os.waitpid(pid, 0)
