"""Transfer learning on real radiographs: UFBA-425 panoramics (five labels, blanks = unknown),
MobileNetV2 from random init vs from the ImageNet `features` weights in ../shared/weights.

Both arms share the split (patient-grouped, one image per patient), seed, epochs and every
other setting; only the initial weights differ. Prints per-label test ROC-AUC side by side and
writes both run folders under --out.

    .venv/bin/python -m simulations.ufba_transfer --shared ../shared --out runs/ufba
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from dental_datasets import ufba425_panoramic as ufba
from dental_datasets.ufba425_panoramic import LABELS
from shared.atomic_files import write_text_atomic
from shared.config import config_from_dict
from simulations.pooled_training import run_training


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path,
                    default=Path(os.environ.get("DENTFED_SHARED", "../shared")))
    ap.add_argument("--out", type=Path, default=Path("runs/ufba-transfer"))
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seeds", default="0", help="comma list; split and init seeds")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not ufba.manifest_path(args.shared).is_file():
        print(f"error: UFBA manifest not found under {args.shared}/data", file=sys.stderr)
        return 1
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for arm, pretrained in (("random init", False), ("ImageNet MobileNetV2", True)):
            cfg = config_from_dict(ufba.config_dict(args.shared, pretrained, args.epochs,
                                                    args.image_size, seed))
            out = args.out / f"{'imagenet' if pretrained else 'random'}-seed{seed}"
            res = run_training(cfg, None, out)
            f = res["final"]
            rows.append({"arm": arm, "seed": seed, **{lab: f.get(f"auc/{lab}", np.nan)
                                                       for lab in LABELS},
                         "macro_auc": f["macro_auc"], "best_epoch": res["best_epoch"],
                         "seconds": res["seconds"]})
            print(f"{arm} seed {seed}: macro AUC {f['macro_auc']:.3f} in {res['seconds']:.0f} s",
                  flush=True)
    df = pd.DataFrame(rows)
    table = df.groupby("arm", sort=False)[[*LABELS, "macro_auc"]].mean().T
    table.index.name = "test ROC-AUC"
    if len(table.columns) == 2:
        table["difference"] = table.iloc[:, 1] - table.iloc[:, 0]
    text = table.to_markdown(floatfmt=".3f")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "transfer.md", text + "\n")
    write_text_atomic(args.out / "transfer.csv", df.to_csv(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
