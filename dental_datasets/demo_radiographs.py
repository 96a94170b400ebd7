"""Demo radiographs: SYNTHETIC radiograph-like images of one implant of three made-up systems
(multi-class, dental_datasets/synth.py); generated on first use."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dental_datasets import synth
from dental_datasets.base import DatasetInfo

INFO = DatasetInfo(
    name="demo-radiographs",
    task="multiclass",
    source="synthetic (dental_datasets/synth.py generate_implants); data/demo-radiographs/",
    natural_split="the `site` column (synthetic sites with their own exposure and noise)",
    config="configs/demo-radiographs.yaml",
    baselines=(),  # none measured and written up yet
)


def build_manifest(out_dir: Path, n: int = 450, seed: int = 0, image_size: int = 128) -> Path:
    """Generate the set (the config's `data.synth`) and return its manifest."""
    return synth.generate_implants(Path(out_dir), n=n, seed=seed, image_size=image_size)


def clinic_key(manifest: pd.DataFrame) -> pd.Series:
    """The natural clinic of each row: its synthetic site."""
    return manifest["site"].astype(str)
