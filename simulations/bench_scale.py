"""How a simulation scales with the number of virtual clinics on this machine: wall time per
round and peak memory of the whole process tree, so docs/scale.md's resource arithmetic
rests on measurements.

For each clinic count it runs `dentfed simulate` on the config (IID split into N clinics, all
sampled every round), samples every process the run starts (they all carry the run's
DENTFED_SIM_TAG, Ray's workers included) twice a second, and prints one row per N: seconds
per round (clinic training + clinic evaluation + central evaluation), start-up seconds (the
SuperLink, Ray and the ServerApp), peak summed RSS (counts shared pages once per process: an
upper bound), peak summed PSS (shared pages divided among their users) and, where the kernel
shows physical page frames (/proc/PID/pagemap; root), the peak resident memory of the whole
tree with every physical page counted once: what the tree holds in RAM, exactly. Also the
largest single process. `clinics-N/memory_timeline.csv` holds every
sample: RSS MiB summed per kind of process, to see when the peak comes.

    .venv/bin/python -m simulations.bench_scale --config configs/demo-photos-scratch.yaml \
        --clinics 4,10,20 --rounds 2 --out runs/bench-scale
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from shared.atomic_files import write_text_atomic
from shared.config import load_config, with_overrides
from simulations.engine import _tagged_pids
from simulations.simulate import simulate


def _mem_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; (0, 0) if it is gone."""
    rss = pss = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def _rss_parts_kb(pid: int) -> tuple[int, int, int]:
    """(anonymous, file-backed, shared-memory) resident KiB of one process: Ray's object
    store is shared memory (/dev/shm), torch's libraries are file-backed."""
    parts = dict.fromkeys(("RssAnon:", "RssFile:", "RssShmem:"), 0)
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in parts:
                parts[key] = int(line.split()[1])
    return parts["RssAnon:"], parts["RssFile:"], parts["RssShmem:"]


PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
_PRESENT, _FRAME = np.uint64(1 << 63), np.uint64((1 << 55) - 1)  # pagemap entry bits


def resident_frames(pid: int) -> np.ndarray | None:
    """The physical page frames of `pid`'s resident pages, from /proc/PID/pagemap (none when
    the process has gone); None when the kernel hides frame numbers (they read as 0 without
    CAP_SYS_ADMIN) or the pagemap cannot be read."""
    found = []
    try:
        with open(f"/proc/{pid}/maps") as maps, \
                open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
            for line in maps:
                lo, hi = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
                if lo >= 1 << 47:  # [vsyscall]: not in the pagemap
                    continue
                pagemap.seek(lo // PAGE_BYTES * 8)
                entries = np.frombuffer(pagemap.read((hi - lo) // PAGE_BYTES * 8), np.uint64)
                found.append(entries[(entries & _PRESENT) != 0] & _FRAME)
    except (FileNotFoundError, ProcessLookupError):
        return np.zeros(0, np.uint64)
    except OSError:
        return None
    frames = np.concatenate(found) if found else np.zeros(0, np.uint64)
    return None if len(frames) and not frames.any() else frames


def resident_kb_once(pids: list[int]) -> int | None:
    """Resident KiB of these processes together, every physical page counted once (shared
    libraries, Ray's object store and forked pages are shared between them); None where a
    process's frames cannot be read."""
    frames = [resident_frames(p) for p in pids]
    if any(f is None for f in frames):
        return None
    return len(np.unique(np.concatenate(frames))) * PAGE_BYTES // 1024 if frames else 0


# first match wins: a Ray worker's command line names the raylet's socket
ROLES = (("ClientAppActor", "actor"), ("ray::", "Ray worker"), ("default_worker", "Ray worker"),
         ("flower-superlink", "SuperLink"), ("flwr-serverapp", "ServerApp"),
         ("flwr-simulation", "ServerApp + Ray driver"), ("flwr run", "flwr run"),
         ("gcs_server", "Ray GCS"), ("raylet", "Ray raylet"), ("dashboard", "Ray agent"),
         ("log_monitor", "Ray agent"), ("ray/", "Ray other"))


def _role(pid: int) -> str:
    """What a process of the run is, from its command line (no paths are kept)."""
    if pid == os.getpid():
        return "bench_scale"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return "gone"
    return next((name for needle, name in ROLES if needle in cmd), "other")


class TreeMemory:
    """Peak summed RSS/PSS of this process and every process carrying `tag`, sampled, and
    which processes made up the peak (`at_peak`: role, RSS KiB, PSS KiB per process); in a
    second thread the peak of the tree's resident memory with every page counted once
    (`peak_once`, None where the kernel hides page frames). That takes ~0.1 s a process, so
    it is only computed while the summed RSS (its upper bound) is above its peak so far."""

    def __init__(self, tag: str, every: float = 0.5) -> None:
        self.tag, self.every = tag, every
        self.peak_rss = self.peak_pss = self.peak_one = 0
        self.peak_once: int | None = 0
        self._last_rss = 0
        self.at_peak: list[tuple[str, int, int, tuple[int, int, int]]] = []
        self._roles: dict[int, str] = {}
        #: one row per sample: seconds since start, then RSS MiB summed per role
        self.timeline: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._once_thread = threading.Thread(target=self._run_once, daemon=True)

    def _run_once(self) -> None:
        while not self._stop.is_set() and self.peak_once is not None:
            if self._last_rss > self.peak_once:  # else it cannot be a new peak
                once = resident_kb_once([os.getpid(), *_tagged_pids(self.tag)])
                self.peak_once = None if once is None else max(self.peak_once, once)
            self._stop.wait(self.every)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            pids = [os.getpid(), *_tagged_pids(self.tag)]
            mems = [_mem_kb(p) for p in pids]
            # the role of a Ray worker changes once it becomes an actor: read it again
            self._roles.update({p: _role(p) for p in pids
                                if self._roles.get(p) in (None, "Ray worker")})
            row = {"s": round(time.monotonic() - start, 2),
                   "RSS sum": round(sum(r for r, _ in mems) / 1024)}
            for p, (r, _) in zip(pids, mems, strict=True):
                role = self._roles[p]
                row[role] = row.get(role, 0) + round(r / 1024)
            self.timeline.append(row)
            if sum(r for r, _ in mems) > self.peak_rss:
                self.at_peak = sorted(((self._roles[p], r, s, _rss_parts_kb(p))
                                       for p, (r, s) in zip(pids, mems, strict=True) if r),
                                      key=lambda t: -t[1])
            self._last_rss = sum(r for r, _ in mems)
            self.peak_rss = max(self.peak_rss, sum(r for r, _ in mems))
            self.peak_pss = max(self.peak_pss, sum(p for _, p in mems))
            self.peak_one = max([self.peak_one, *(r for r, _ in mems)])
            self._stop.wait(self.every)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        self._once_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._once_thread.join()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo-photos-scratch.yaml")
    ap.add_argument("--clinics", default="4,10,20", help="comma list of clinic counts")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--max-concurrent", type=int, help="overrides simulation.max_concurrent")
    ap.add_argument("--out", default=f"runs/bench-scale-{time.strftime('%Y%m%d-%H%M%S')}")
    args = ap.parse_args(argv)

    base = load_config(args.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(c) for c in args.clinics.split(",")):
        overrides: dict[str, object] = {
            "split.clinics": n, "split.scheme": "iid", "federation.rounds": args.rounds,
            "federation.local_epochs": args.local_epochs, "federation.min_train_clinics": n,
            "federation.min_evaluate_clinics": n, "federation.min_available_clinics": n,
            "tracking.enabled": False}
        if args.max_concurrent:
            overrides["simulation.max_concurrent"] = args.max_concurrent
        cfg = with_overrides(base, overrides, source="bench_scale")
        tag = uuid.uuid4().hex
        os.environ["DENTFED_SIM_TAG"] = tag  # inherited by everything the run starts
        try:
            with TreeMemory(tag) as mem:
                data = simulate(cfg, None, out / f"clinics-{n}", echo=False)
        finally:
            os.environ.pop("DENTFED_SIM_TAG", None)
        per_round = [h.get("round_seconds", 0) + h.get("clinic_evaluate_seconds", 0)
                     + h.get("central_eval_seconds", 0) for h in data["history"][1:]]
        rows.append({
            "clinics": n, "rounds": len(per_round),
            "s/round": sum(per_round) / max(1, len(per_round)),
            "start-up s": data["wall_seconds"] - data["seconds"],
            "wall s": data["wall_seconds"],
            "peak RSS sum GiB": mem.peak_rss / 2**20, "peak PSS sum GiB": mem.peak_pss / 2**20,
            "peak resident GiB, pages once": (None if mem.peak_once is None
                                              else mem.peak_once / 2**20),
            "largest process GiB": mem.peak_one / 2**20,
            "concurrent": cfg.simulation.max_concurrent,
            "images/clinic": round(sum(c.get("num-examples", 0) for c in data["history"][1]
                                       ["clinics_train"]["per_clinic"].values()) / n)})
        print(json.dumps(rows[-1]), flush=True)
        write_text_atomic(out / f"clinics-{n}" / "memory_timeline.csv",
                          pd.DataFrame(mem.timeline).fillna(0).to_csv(index=False))
        print(f"processes at the peak RSS sum ({n} clinics), MiB:", flush=True)
        for role, rss, pss, (anon, file, shm) in mem.at_peak:
            print(f"  {role:<24} RSS {rss / 1024:6.0f} (anon {anon / 1024:5.0f}, file "
                  f"{file / 1024:4.0f}, shm {shm / 1024:5.0f})  PSS {pss / 1024:6.0f}",
                  flush=True)
    table = pd.DataFrame(rows).round(2).to_markdown(index=False)
    write_text_atomic(out / "scale.md", f"# bench_scale\n\n`{args.config}`, "
                      f"{os.cpu_count()} CPUs\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
