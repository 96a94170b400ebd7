"""The real public datasets beside the checkout (../shared or $DENTFED_SHARED): read, split and
train briefly. Skipped with a reason on a machine without them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dental_datasets import tooth_crops, ufba425_panoramic, ufba425_teeth_detection
from dental_datasets.ufba425_panoramic import LABELS
from shared import fdi
from shared.config import config_from_dict, load_config
from shared.data.detection import read_detection_manifest
from shared.data.manifest import read_manifest
from simulations.pooled_training import run_training

pytestmark = pytest.mark.slow  # real datasets in ../shared, training


def test_ufba_blanks_are_unknown_and_a_short_transfer_run_completes(shared_data, tmp_path):
    raw = ufba425_panoramic.config_dict(shared_data, pretrained=True, epochs=1, image_size=64,
                                        seed=0)
    raw["train"]["max_steps_per_epoch"] = 3
    cfg = config_from_dict(raw)
    m = read_manifest(cfg.data.manifest, cfg.task)
    assert len(m) == 425
    unknown = np.isnan(m.targets)
    assert unknown.any() and not unknown.all()  # categories 5 and 6 leave attributes blank
    res = run_training(cfg, None, tmp_path / "run")
    final = json.loads((tmp_path / "run" / "metrics.json").read_text())["final"]
    assert set(final) == set(res["final"])
    assert all(f"auc/{lab}" in final for lab in LABELS)
    assert 0 <= final["macro_auc"] <= 1


def test_tooth_crops_import_groups_by_source_panoramic(shared_data, tmp_path):
    tooth_crops.build_manifest(tmp_path / "m.csv", shared_data)
    df = pd.read_csv(tmp_path / "m.csv")
    assert len(df) == 336 and df.patient_id.nunique() == 10
    assert "split" not in df  # the folder split shares sources between train and test
    cfg = config_from_dict({"task": {"type": "multiclass",
                                     "labels": ["filling", "no_treatment", "root_canal"],
                                     "label_column": "label"},
                            "train": {"loss": "ce"}})
    m = read_manifest(tmp_path / "m.csv", cfg.task)
    assert len(m) == 336 and m.splits is None


def test_ufba_manifest_builder_gives_the_category_as_natural_clinic(shared_data, tmp_path):
    out = ufba425_panoramic.build_manifest(tmp_path / "ufba.csv", shared_data)
    cfg = load_config(ufba425_panoramic.INFO.config_path())
    m = read_manifest(out, cfg.task)
    assert len(m) == 425 and len(set(m.patient_ids)) == 425
    assert sorted(set(m.sites)) == sorted(f"cate{k}" for k in range(1, 11))


def test_teeth_manifest_lists_every_image_with_its_boxes(shared_data, tmp_path):
    names = ufba425_teeth_detection.fdi_names(shared_data)
    out = ufba425_teeth_detection.build_manifest(tmp_path / "teeth.csv", shared_data)
    df = read_detection_manifest(out, names)
    teeth = df.boxes.map(len)
    assert len(df) == 318 and df.patient_id.is_unique
    assert (teeth == 0).sum() <= 1 and 20 <= teeth.median() <= 32  # cate6: > 32 teeth
    assert set(df.site) <= {f"cate{k}" for k in range(1, 11)}
    assert names == list(fdi.PERMANENT)
