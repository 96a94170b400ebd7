"""UFBA-425 tooth boxes (../shared/data/ufba425_teeth_yolo): 318 panoramics (512x512, squashed),
one box per tooth labelled with its FDI number, YOLO layout; imported into a detection manifest
(shared/data/detection.py) whose `site` is the UFBA category, the natural non-IID clinic
(implant, appliance and missing-teeth populations)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import yaml

from dental_datasets.base import Baseline, DatasetInfo, shared_root
from dental_datasets.detection_import import import_yolo

FOLDER = "data/ufba425_teeth_yolo"
SITE_FROM = r"^(cate\d+)-"  # the UFBA category in the image id
BENCH = ("python -m simulations.bench_detection --seeds 0,1 --strategy "
         "'FedAvg-keepopt:federation.keep_optimizer_state=true'")

INFO = DatasetInfo(
    name="ufba425-teeth",
    task="detection",
    source=f"../shared/{FOLDER} (images/, labels/ one `class cx cy w h` line per tooth, 3 of "
           "them polygons read as their bounding box; data.yaml: the 32 FDI numbers)",
    natural_split="the UFBA category (`cate<k>` in the image id), written as `site`; one image "
                  "per patient (patient_id = image id)",
    config="configs/ufba-teeth-detection.yaml",
    baselines=(
        Baseline("pooled, Faster R-CNN MobileNetV2-FPN 384 px, freeze 4, AdamW 5e-4, 1600 steps "
                 "of 4 images, the 4-clinic split's test set (65 images; seeds 0-1)",
                 "mAP@0.5", 0.943, BENCH, "docs/detection.md"),
        Baseline("FedAvg, clinics keep their AdamW moments, 20 rounds x 20 steps, 4 clinics by "
                 "category (seeds 0-1)", "mAP@0.5", 0.920, BENCH, "docs/detection.md"),
        Baseline("FedAvg, a fresh AdamW every round (seed 0)", "mAP@0.5", 0.789, BENCH,
                 "docs/detection.md"),
        Baseline("pooled, FDI numbering accuracy on matched teeth after the post-processing "
                 "(seeds 0-1)", "numbering accuracy", 0.959, BENCH, "docs/detection.md"),
    ),
)


def fdi_names(shared: str | Path | None = None) -> list[str]:
    """Class k is FDI tooth number names[k] ('11'..'48')."""
    data = yaml.safe_load((shared_root(shared) / FOLDER / "data.yaml").read_text())
    return [str(n) for n in data["names"]]


def build_manifest(out: Path, shared: str | Path | None = None) -> Path:
    """The detection manifest: path, patient_id (= image id), site (cate<k>), modality, boxes
    (pixels of the 512x512 images)."""
    import_yolo(shared_root(shared) / FOLDER, out, site_from=SITE_FROM, modality="radiograph")
    return Path(out)


def clinic_key(manifest: pd.DataFrame) -> pd.Series:
    """The natural clinic of each row: its UFBA category."""
    return manifest["site"].astype(str)
