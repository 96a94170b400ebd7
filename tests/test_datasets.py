"""Each dataset module (dental_datasets/) agrees with its default config in configs/, and the
demo sets' manifest builders generate what the configs read."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from dental_datasets import (
    demo_implant_detection,
    demo_photos,
    demo_radiographs,
    tooth_crops,
    ufba425_panoramic,
    ufba425_teeth_detection,
)
from shared.config import load_config

MODULES = [demo_photos, demo_radiographs, ufba425_panoramic, tooth_crops,
           ufba425_teeth_detection, demo_implant_detection]


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.INFO.name)
def test_dataset_module_matches_its_config(mod):
    info = mod.INFO
    assert callable(mod.build_manifest) and callable(mod.clinic_key) and info.natural_split
    for b in info.baselines:
        assert 0 <= b.value <= 1 and b.command and b.documented
    if info.config is None:
        assert info.task == "detection"
        return
    cfg = load_config(info.config_path())
    assert cfg.task.type == info.task
    if hasattr(mod, "LABELS"):
        assert list(cfg.task.labels) == mod.LABELS
    if hasattr(mod, "FOLDER") and mod is ufba425_panoramic:
        assert Path(cfg.data.manifest).as_posix().endswith(f"{mod.FOLDER}/manifest.csv")


def test_demo_builder_is_the_config_synth_set(tmp_path):
    cfg = load_config(demo_radiographs.INFO.config_path())
    s = cfg.data.synth
    out = demo_radiographs.build_manifest(tmp_path / "r", n=24, seed=s.seed, image_size=32)
    df = pd.read_csv(out)
    assert len(df) == 24 and set(df[cfg.task.label_column]) <= set(cfg.task.labels)
    assert demo_radiographs.clinic_key(df).nunique() > 1
