"""UFBA-425 panoramic radiographs (../shared/data/ufba425_panoramic): 425 images, five labels
derived from the dataset's ten categories, blanks = unknown (categories 5 and 6)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dental_datasets.base import Baseline, DatasetInfo, shared_root
from shared.atomic_files import write_text_atomic

FOLDER = "data/ufba425_panoramic"
LABELS = ["missing_teeth", "restoration", "appliance", "implant", "supernumerary"]
WEIGHTS = "weights/torchvision_mobilenet_v2_features_in1k.pth"
WEIGHTS_SHA = "c689c012"

INFO = DatasetInfo(
    name="ufba425-panoramic",
    task="multilabel",
    source=f"../shared/{FOLDER} (one image per patient; no patient ids)",
    natural_split="the UFBA category (1-10, `cate<k>` in the image id): strongly non-IID, "
                  "each category fixes most labels; `build_manifest` writes it as `site` for "
                  "split.scheme: site",
    config="configs/ufba-panoramic.yaml",
    baselines=(
        Baseline("MobileNetV2 ImageNet features, 160 px, weighted BCE, 8 epochs, patience 4 "
                 "(seed 0, 85 test images)", "test macro_auc", 0.880,
                 "dentfed train --config configs/ufba-panoramic.yaml", "docs/explain.md"),
        Baseline("pooled, 8 epochs at batch 32, the 4-clinic split's test set (seeds 0-2)",
                 "pooled-test macro_auc", 0.938,
                 "python -m simulations.bench_quality --config configs/ufba-panoramic.yaml "
                 "--dataset ufba425_panoramic --seeds 0,1,2 --pooled-only",
                 "docs/federated-quality.md"),
        Baseline("FedAvg 8 x 1, 4 clinics by category, clinics at batch 8 (seeds 0-2)",
                 "pooled-test macro_auc", 0.918,
                 "python -m simulations.bench_quality --config configs/ufba-panoramic.yaml "
                 "--dataset ufba425_panoramic --seeds 0,1,2 --pooled skip --variant b8:",
                 "docs/federated-quality.md"),
    ),
)


def manifest_path(shared: str | Path | None = None) -> Path:
    """The manifest shipped with the data (path, image_id, category, five label columns)."""
    return shared_root(shared) / FOLDER / "manifest.csv"


def build_manifest(out: Path, shared: str | Path | None = None) -> Path:
    """The shipped manifest with absolute paths, `patient_id` (= image id), `site` (the
    UFBA category, the natural clinic) and `modality`."""
    src = manifest_path(shared)
    df = pd.read_csv(src, dtype={"path": str, "image_id": str}, keep_default_na=False)
    df["path"] = [str((src.parent / p).resolve()) for p in df["path"]]
    df["patient_id"] = df["image_id"]
    df["site"] = clinic_key(df)
    df["modality"] = "radiograph"
    write_text_atomic(Path(out), df.to_csv(index=False))
    return Path(out)


def clinic_key(manifest: pd.DataFrame) -> pd.Series:
    """The natural clinic of each row: its UFBA category, as `cate<k>`."""
    return "cate" + manifest["category"].astype(int).astype(str)


def config_dict(shared: Path, pretrained: bool, epochs: int, image_size: int, seed: int) -> dict:
    """The pooled transfer-learning set-up of simulations/ufba_transfer.py: MobileNetV2 from
    random init or from the ImageNet `features` weights in ../shared/weights."""
    return {
        "task": {"type": "multilabel", "labels": LABELS},
        "data": {"manifest": str(shared / FOLDER / "manifest.csv"),
                 "image_size": image_size, "modality": "radiograph", "batch_size": 32},
        "model": {"name": "mobilenet_v2", "dropout": 0.2,
                  **({"pretrained": str(shared / WEIGHTS), "pretrained_prefix": "features.",
                      "pretrained_sha256": WEIGHTS_SHA} if pretrained else {})},
        "train": {"epochs": epochs, "lr": 1e-3 if pretrained else 2e-3, "loss": "weighted_bce",
                  "patience": 5, "seed": seed, "progress": False},
    }
