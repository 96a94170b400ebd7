"""What the FDI numbering post-processing (shared/fdi.py `consistent_numbering`) does to tooth
numbers, measured on the UFBA-425 annotations with controlled label noise.

The true boxes of every image go through the post-processing with a fraction of their labels
replaced by a random FDI number (and random detection scores in 0.5-1); the table gives the
numbering metrics of the noisy labels and of the post-processed ones. Noise 0 checks that
correct charts pass through unchanged. This isolates the post-processing from any detector;
the detector's own figures come from the detection benchmark.

    .venv/bin/python -m simulations.bench_numbering --noise 0,0.1,0.3 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from dental_datasets import ufba425_teeth_detection as ufba
from dental_datasets.base import shared_root
from shared import fdi
from shared.data.detection import read_detection_manifest
from shared.report_tables import render_table

METRICS = ("numbering_accuracy", "present_teeth_accuracy", "tooth_recall")


def run(noise: list[float], seeds: list[int], shared: str | None = None) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as tmp:
        out = ufba.build_manifest(Path(tmp) / "teeth.csv", shared)
        truths = read_detection_manifest(out, fdi.PERMANENT)["boxes"].tolist()
    rows = []
    for p in noise:
        per: dict[str, list[float]] = {}
        for seed in seeds:
            rng = np.random.default_rng(seed)
            noisy = [[fdi.finding(rng.choice(fdi.PERMANENT) if rng.random() < p else b[0],
                                  b[1:], rng.uniform(0.5, 1.0)) for b in bs] for bs in truths]
            raw = fdi.numbering_metrics(noisy, truths)
            post = fdi.numbering_metrics([fdi.consistent_numbering(f) for f in noisy], truths)
            for m in METRICS:
                per.setdefault(f"{m} raw", []).append(raw[m])
                per.setdefault(f"{m} post", []).append(post[m])
        row = {"label noise": p}
        for k, v in per.items():
            row[k] = f"{np.mean(v):.4f} ± {np.std(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("label noise")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--noise", default="0,0.1,0.3")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--shared", help="../shared (default: $DENTFED_SHARED or ../shared)")
    args = ap.parse_args()
    if not (shared_root(args.shared) / ufba.FOLDER).is_dir():
        raise SystemExit(f"{shared_root(args.shared) / ufba.FOLDER} not found")
    table = run([float(x) for x in args.noise.split(",")],
                [int(x) for x in args.seeds.split(",")], args.shared)
    print(render_table(table.T))


if __name__ == "__main__":
    main()
