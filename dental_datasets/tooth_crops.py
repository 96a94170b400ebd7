"""Tooth crops from panoramics (../shared/data/tooth_crops_treatment): 336 single-tooth crops,
three treatment classes, ImageFolder layout; the file-name prefix is the source panoramic."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dental_datasets.base import DatasetInfo, shared_root
from dental_datasets.folder_import import import_folder

FOLDER = "data/tooth_crops_treatment"
LABELS = ["filling", "no_treatment", "root_canal"]
PATIENT_REGEX = r"^([^_]+)_"  # <source panoramic>_<n>.jpg: the source is the patient

INFO = DatasetInfo(
    name="tooth-crops-treatment",
    task="multiclass",
    source=f"../shared/{FOLDER} (10 source panoramics)",
    natural_split="the source panoramic (`patient_id`): whole sources go to clinics "
                  "(configs/crops-treatment.yaml: 3 clinics, scheme iid over patients); the "
                  "folder's own train/test split shares sources and is ignored",
    config="configs/crops-treatment.yaml",
    baselines=(),  # none measured and written up yet
)


def build_manifest(out: Path, shared: str | Path | None = None) -> Path:
    """`dentfed data import-folder ... --patient-regex '^([^_]+)_' --modality radiograph`."""
    import_folder(shared_root(shared) / FOLDER, out, patient_regex=PATIENT_REGEX,
                  modality="radiograph")
    return Path(out)


def clinic_key(manifest: pd.DataFrame) -> pd.Series:
    """The natural clinic of each row: its source panoramic."""
    return manifest["patient_id"].astype(str)
