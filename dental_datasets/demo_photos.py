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
        Baseline("pooled ResNet-18 from scratch, 96 px, 16 epochs (seed 0)", "test macro_auc",
                 0.845, "dentfed train --config configs/demo-photos.yaml",
                 "commit 'Demo photos: 1200 synthetic photos at 96 px'"),
        Baseline("MobileNetV2 ImageNet features frozen to the last stage, 64 px, 20 epochs, "
                 "no DP (seed 0)", "test macro_auc", 0.722,
                 "python -m simulations.dp_utility --config configs/demo-photos.yaml ...",
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
