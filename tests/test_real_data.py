"""The real public datasets beside the checkout (../shared or $DENTFED_SHARED): read, split and
train briefly. Skipped with a reason on a machine without them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.config import config_from_dict
from shared.data.importer import import_folder
from shared.data.manifest import read_manifest
from shared.experiment import run_training
from simulations.ufba_transfer import LABELS, ufba_config

pytestmark = pytest.mark.slow  # real datasets in ../shared, training


def test_ufba_blanks_are_unknown_and_a_short_transfer_run_completes(shared_data, tmp_path):
    raw = ufba_config(shared_data, pretrained=True, epochs=1, image_size=64, seed=0)
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
    df = import_folder(shared_data / "data" / "tooth_crops_treatment", tmp_path / "m.csv",
                       patient_regex=r"^([^_]+)_", modality="radiograph")
    assert len(df) == 336 and df.patient_id.nunique() == 10
    assert "split" not in df  # the folder split shares sources between train and test
    cfg = config_from_dict({"task": {"type": "multiclass",
                                     "labels": ["filling", "no_treatment", "root_canal"],
                                     "label_column": "label"},
                            "train": {"loss": "ce"}})
    m = read_manifest(tmp_path / "m.csv", cfg.task)
    assert len(m) == 336 and m.splits is None
