"""Demo implant detection: SYNTHETIC wide radiograph-like views with 1-4 implant fixtures of the
three made-up systems, each boxed and labelled with its system (dental_datasets/synth.py
generate_implant_detection); generated on first use."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dental_datasets import synth
from dental_datasets.base import Baseline, DatasetInfo

LABELS = list(synth.IMPLANT_SYSTEMS)

INFO = DatasetInfo(
    name="demo-implant-detection",
    task="detection",
    source="synthetic (dental_datasets/synth.py generate_implant_detection); "
           "data/demo-implant-detection/",
    natural_split="the `site` column (synthetic sites with their own exposure, noise and "
                  "system mix)",
    config="configs/demo-implant-detection.yaml",
    baselines=(
        Baseline(setting="pooled, Faster R-CNN MobileNetV2-FPN (ImageNet backbone, freeze 4), "
                        "224 px, 150 AdamW steps, seed 0, 60 test images",
                 metric="map_50", value=0.886,
                 command="dentfed train --config configs/demo-implant-detection.yaml",
                 documented="docs/detection.md"),
    ),
)


def build_manifest(out_dir: Path, n: int = 300, seed: int = 0, image_size: int = 256) -> Path:
    """Generate the set (the config's `data.synth`) and return its detection manifest."""
    return synth.generate_implant_detection(Path(out_dir), n=n, seed=seed,
                                            image_size=image_size)


def clinic_key(manifest: pd.DataFrame) -> pd.Series:
    """The natural clinic of each row: its synthetic site."""
    return manifest["site"].astype(str)
