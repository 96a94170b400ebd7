"""Time Flower's app bundle build from the checkout against a staged copy (dentfed/app_bundle.py),
side by side, alternating, in one run; both must give the same bundle.

    python -m simulations.bench_app_bundle [--repeats 3] [--app-dir .]

What `flwr run DIR` does before it submits a run is `build_fab_from_disk(DIR)`; the staged
variant times the copy and the build together."""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
import warnings
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from dentfed.app_bundle import app_files, stage_app

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--app-dir", default=str(REPO))
    args = ap.parse_args(argv)
    app = Path(args.app_dir).resolve()
    warnings.filterwarnings("ignore", "GitWildMatchPattern", DeprecationWarning)
    times: dict[str, list[float]] = {"checkout": [], "staged": []}
    hashes: dict[str, set[str]] = {"checkout": set(), "staged": set()}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fab = build_fab_from_disk(app)
        times["checkout"].append(time.perf_counter() - t0)
        hashes["checkout"].add(hashlib.sha256(fab).hexdigest())
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            fab = build_fab_from_disk(stage_app(app, Path(tmp) / "app"))
            times["staged"].append(time.perf_counter() - t0)
            hashes["staged"].add(hashlib.sha256(fab).hexdigest())
    same = len(hashes["checkout"] | hashes["staged"]) == 1
    print(f"app folder {app}: {len(app_files(app))} files staged; same bundle: {same}")
    for name, ts in times.items():
        sd = statistics.stdev(ts) if len(ts) > 1 else 0.0
        print(f"  {name:8s} {statistics.mean(ts):7.3f} +- {sd:.3f} s  ({args.repeats} builds)")
    ratio = statistics.mean(times["staged"]) / statistics.mean(times["checkout"])
    print(f"  staged / checkout = {ratio:.3f}")
    if not same:
        raise SystemExit("the staged bundle differs from the checkout's")


if __name__ == "__main__":
    main()
