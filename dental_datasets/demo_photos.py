"""Demo photos: SYNTHETIC intraoral-photo-like images, ten multi-label dental anomalies
(dental_datasets/synth.py); generated on first use by `dentfed train` / `simulate`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dental_datasets import synth
from dental_datasets.base import Baseline, DatasetInfo

INFO = DatasetInfo(
    name="demo-photos",
    task="multilabel",
    source="synthetic (dental_datasets/synth.py generate_anomalies); data/demo-photos/",
    natural_split="the `site` column: 4 synthetic sites whose cameras differ in colour and "
                  "brightness (split.scheme: site, 4 clinics)",
    config="configs/demo-photos.yaml",
    baselines=(
        Baseline("pooled MobileNetV2 from the packaged ImageNet weights, 96 px, ~10 epochs at "
                 "batch 32 (the federation's budget; seeds 0-2)", "pooled-test macro_auc", 0.959,
                 "python -m simulations.bench_quality --config configs/demo-photos.yaml "
                 "--flower --seeds 0,1,2 --variant demo:", "docs/federated-quality.md"),
        Baseline("the README's command 1: configs/demo-photos.yaml through dentfed simulate "
                 "(FedAvgM server step 2, 19 x 4 local steps; seeds 0-2)",
                 "pooled-test macro_auc", 0.913,
                 "python -m simulations.bench_quality --config configs/demo-photos.yaml "
                 "--flower --seeds 0,1,2 --variant demo:", "docs/federated-quality.md"),
        Baseline("pooled ResNet-18 from scratch, 96 px, 16 epochs (seed 0)", "test macro_auc",
                 0.845, "dentfed train --config configs/demo-photos-scratch.yaml",
                 "commit 'Demo photos: 1200 synthetic photos at 96 px'"),
        Baseline("pooled, 10 epochs at batch 32 (the federation's budget; seeds 0-2)",
                 "pooled-test macro_auc", 0.778,
                 "python -m simulations.bench_quality --config configs/demo-photos-scratch.yaml "
                 "--seeds 0,1,2 --pooled-only", "docs/federated-quality.md"),
        Baseline("FedAvg 19 x 4 local steps, kept AdamW, 2-round warm-up, cosine (4 sites; "
                 "seeds 0-1)", "pooled-test macro_auc", 0.728,
                 "python -m simulations.bench_quality --config configs/demo-photos-scratch.yaml "
                 "...", "docs/federated-quality.md"),
        Baseline("MobileNetV2 ImageNet features frozen to the last stage, 64 px, 20 epochs, "
                 "no DP (seed 0)", "test macro_auc", 0.722,
                 "python -m simulations.dp_utility --config configs/demo-photos-scratch.yaml ...",
                 "docs/privacy.md"),
        Baseline("as above, DP-SGD epsilon 8 (delta 1e-5)", "test macro_auc", 0.636,
                 "python -m simulations.dp_utility ... --epsilons 1,3,8", "docs/privacy.md"),
        Baseline("as above, DP-SGD epsilon 1 (delta 1e-5)", "test macro_auc", 0.576,
                 "python -m simulations.dp_utility ... --epsilons 1,3,8", "docs/privacy.md"),
    ),
)


def build_manifest(out_dir: Path, n: int = 1200, seed: int = 0, image_size: int = 96) -> Path:
    """Generate the set (the config's `data.synth`) and return its manifest."""
    return synth.generate_anomalies(Path(out_dir), n=n, seed=seed, image_size=image_size)


def clinic_key(manifest: pd.DataFrame) -> pd.Series:
    """The natural clinic of each row: its synthetic site."""
    return manifest["site"].astype(str)
