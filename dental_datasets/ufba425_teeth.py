"""UFBA-425 tooth boxes (../shared/data/ufba425_teeth_yolo): 318 panoramics, one box per tooth
with its FDI number, YOLO layout. Detection training is not built yet; this module lists the
images with their category (the natural clinic) and tooth count."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import yaml

from dental_datasets.base import DatasetInfo, shared_root
from shared.atomic_files import write_text_atomic
from shared.data.readers import IMAGE_SUFFIXES

FOLDER = "data/ufba425_teeth_yolo"
CATEGORY = re.compile(r"^cate(\d+)-")

INFO = DatasetInfo(
    name="ufba425-teeth",
    task="detection",
    source=f"../shared/{FOLDER} (images/, labels/ one `class cx cy w h` line per tooth, "
           "data.yaml: 32 FDI names)",
    natural_split="the UFBA category (`cate<k>` in the image id), written as `site`; one image "
                  "per patient",
    config=None,  # detection is a later issue
    baselines=(),
)


def fdi_names(shared: str | Path | None = None) -> list[str]:
    """Class k is FDI tooth number names[k]."""
    data = yaml.safe_load((shared_root(shared) / FOLDER / "data.yaml").read_text())
    return [str(n) for n in data["names"]]


def build_manifest(out: Path, shared: str | Path | None = None) -> Path:
    """One row per image: absolute path, image_id (= patient_id), site (category), modality,
    labels file and its number of boxes."""
    root = shared_root(shared) / FOLDER
    rows = []
    for img in sorted(p for p in (root / "images").iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES):
        labels = root / "labels" / f"{img.stem}.txt"
        boxes = [ln for ln in labels.read_text().splitlines() if ln.strip()] \
            if labels.is_file() else []
        rows.append({"path": str(img.resolve()), "image_id": img.stem,
                     "patient_id": img.stem, "modality": "radiograph",
                     "labels": str(labels.resolve()) if labels.is_file() else "",
                     "teeth": len(boxes)})
    df = pd.DataFrame(rows)
    df["site"] = clinic_key(df)
    write_text_atomic(Path(out), df.to_csv(index=False))
    return Path(out)


def clinic_key(manifest: pd.DataFrame) -> pd.Series:
    """The natural clinic of each row: its UFBA category from the image id."""
    return manifest["image_id"].map(lambda i: f"cate{CATEGORY.match(i).group(1)}")
