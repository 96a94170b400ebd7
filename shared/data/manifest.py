"""Manifest CSV: one row per image, validated into arrays the dataset and splitter use.

Columns: `path` (relative to the manifest's folder, or absolute), `patient_id` (grouping key;
optional, else each image is its own patient), optional `site`, `modality` (photo|radiograph)
and `split` (train|val|test), plus the label columns the task declares. Multi-label cells are
0, 1 or blank (= unknown, kept as NaN and masked by losses and metrics, never read as 0).

Every problem is reported as one line naming the CSV line (header = line 1) or file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from shared.config import TaskConfig
from shared.data.readers import read_image, read_manifest_csv
from shared.errors import ManifestError

log = logging.getLogger(__name__)

MODALITIES = ("photo", "radiograph")
SPLITS = ("train", "val", "test")
_ONE = {"1", "1.0"}
_ZERO = {"0", "0.0"}


@dataclass
class Manifest:
    """A validated manifest. `targets` is float [N, L] with NaN = unknown (multilabel) or
    int64 [N] class indices (multiclass)."""

    source: Path
    paths: list[str]
    patient_ids: np.ndarray
    sites: np.ndarray
    modalities: np.ndarray
    splits: np.ndarray | None
    targets: np.ndarray
    task: TaskConfig
    has_patient_ids: bool = True
    # Detection: per row the list of [label, x1, y1, x2, y2] boxes (original-image pixels);
    # `targets` is then float [N, L] with 1 where the image has a box of label L (0 else), so
    # stratified splits and per-clinic label counts work as for a multi-label task.
    boxes: list[list] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> Manifest:
        idx = np.asarray(idx, dtype=np.int64)
        return Manifest(
            source=self.source,
            paths=[self.paths[i] for i in idx],
            patient_ids=self.patient_ids[idx],
            sites=self.sites[idx],
            modalities=self.modalities[idx],
            splits=None if self.splits is None else self.splits[idx],
            targets=self.targets[idx],
            task=self.task,
            has_patient_ids=self.has_patient_ids,
            boxes=None if self.boxes is None else [self.boxes[i] for i in idx],
        )


def _line(i: int) -> str:
    return f"line {i + 2}"


def read_manifest(
    path: str | Path,
    task: TaskConfig,
    *,
    default_modality: str = "photo",
    check_images: bool = False,
) -> Manifest:
    """Read and validate a manifest; raises ManifestError listing every problem found.

    With `check_images`, every image is decoded (slow on big sets; `dentfed data check` does it).
    """
    path = Path(path)
    df = read_manifest_csv(path)
    problems: list[str] = []
    if "path" not in df.columns:
        raise ManifestError(f"{path}: no 'path' column (columns are: {', '.join(df.columns)})")
    if len(df) == 0:
        raise ManifestError(f"{path}: manifest has a header but no rows")

    label_cols = (task.labels if task.type == "multilabel" else
                  [] if task.type in ("detection", "pretrain") else [task.label_column])
    missing = [c for c in label_cols if c not in df.columns]
    if missing and len(missing) == len(label_cols):
        raise ManifestError(f"{path}: no label column of this {task.type} task ("
                            f"{', '.join(missing)}): an unlabelled manifest is for "
                            "pretraining (task.type: pretrain), not for a labelled task")
    if missing:
        raise ManifestError(f"{path}: label column(s) named in the config but absent from the "
                            f"CSV: {', '.join(missing)}")

    root = path.parent
    abs_paths: list[str] = []
    for i, p in enumerate(df["path"].str.strip()):
        if not p:
            problems.append(f"{path} {_line(i)}: empty path")
            abs_paths.append("")
            continue
        q = Path(p)
        abs_paths.append(str(q if q.is_absolute() else (root / q).resolve()))
    seen: dict[str, int] = {}
    for i, p in enumerate(abs_paths):
        if not p:
            continue
        if p in seen:
            problems.append(f"{path} {_line(i)}: duplicate path '{df['path'].iloc[i]}' "
                            f"(first at {_line(seen[p])})")
        else:
            seen[p] = i

    has_pid = "patient_id" in df.columns
    if has_pid:
        pids = df["patient_id"].str.strip().to_numpy(dtype=object)
        for i in np.flatnonzero(pids == ""):
            problems.append(f"{path} {_line(i)}: blank patient_id")
    else:
        log.warning("%s has no patient_id column: every image is treated as its own patient",
                    path.name)
        pids = np.array([f"img{i}" for i in range(len(df))], dtype=object)

    sites = (df["site"].str.strip().replace("", "unknown").to_numpy(dtype=object)
             if "site" in df.columns else np.array(["all"] * len(df), dtype=object))

    if "modality" in df.columns:
        mods = df["modality"].str.strip().str.lower().replace("", default_modality)
        for i in np.flatnonzero(~mods.isin(MODALITIES).to_numpy()):
            problems.append(f"{path} {_line(i)}: modality '{df['modality'].iloc[i]}' is not "
                            f"one of {', '.join(MODALITIES)}")
        modalities = mods.to_numpy(dtype=object)
    else:
        modalities = np.array([default_modality] * len(df), dtype=object)

    splits = None
    if "split" in df.columns:
        sp = df["split"].str.strip().str.lower()
        for i in np.flatnonzero(~sp.isin(SPLITS).to_numpy()):
            problems.append(f"{path} {_line(i)}: split '{df['split'].iloc[i]}' is not one of "
                            f"{', '.join(SPLITS)}")
        splits = sp.to_numpy(dtype=object)
        if has_pid:
            per_patient = pd.Series(splits).groupby(pids).agg(lambda s: sorted(set(s)))
            for pid, sset in per_patient.items():
                if len(sset) > 1:
                    problems.append(f"{path}: patient '{pid}' is in two splits ({', '.join(sset)});"
                                    " a patient's images must all be in one split")

    boxes = None
    if task.type == "detection":
        boxes, targets = _detection_targets(path, task)
    elif task.type == "pretrain":  # self-supervised: any label columns are ignored
        targets = np.zeros(len(df), dtype=np.int64)
    elif task.type == "multilabel":
        targets = np.full((len(df), len(task.labels)), np.nan, dtype=np.float32)
        for j, col in enumerate(task.labels):
            vals = df[col].str.strip()
            for i, v in enumerate(vals):
                if v in _ONE:
                    targets[i, j] = 1.0
                elif v in _ZERO:
                    targets[i, j] = 0.0
                elif v != "":
                    problems.append(f"{path} {_line(i)}: label '{col}' has value '{v}' "
                                    "(expected 0, 1 or blank for unknown)")
    else:
        col = task.label_column
        index = {c: k for k, c in enumerate(task.labels)}
        targets = np.full(len(df), -1, dtype=np.int64)
        for i, v in enumerate(df[col].str.strip()):
            if v == "":
                problems.append(f"{path} {_line(i)}: blank class in '{col}'")
            elif v not in index:
                problems.append(f"{path} {_line(i)}: unknown class '{v}' in '{col}' "
                                f"(config classes: {', '.join(task.labels)})")
            else:
                targets[i] = index[v]

    for i, p in enumerate(abs_paths):
        if p and not Path(p).is_file():
            problems.append(f"{path} {_line(i)}: image file not found: {df['path'].iloc[i]}")
    if check_images and not problems:
        for i, p in enumerate(abs_paths):
            try:
                read_image(p)
            except ManifestError as err:
                problems.append(f"{path} {_line(i)}: {err}")

    if problems:
        raise ManifestError(problems)
    return Manifest(source=path, paths=abs_paths, patient_ids=pids, sites=sites,
                    modalities=modalities, splits=splits, targets=targets, task=task,
                    has_patient_ids=has_pid, boxes=boxes)


def _detection_targets(path: Path, task: TaskConfig) -> tuple[list[list], np.ndarray]:
    """Boxes per row through the detection manifest reader (which validates them) and the
    per-label presence matrix."""
    import json

    from shared.data.detection import read_detection_manifest

    frame = read_detection_manifest(path, task.labels)
    index = {c: k for k, c in enumerate(task.labels)}
    boxes = [json.loads(b) if isinstance(b, str) else list(b) for b in frame["boxes"]]
    targets = np.zeros((len(boxes), len(task.labels)), dtype=np.float32)
    for i, row in enumerate(boxes):
        for b in row:
            if str(b[0]) not in index:
                raise ManifestError(f"{path} {_line(i)}: box label '{b[0]}' is not in "
                                    f"task.labels")
            targets[i, index[str(b[0])]] = 1.0
    return boxes, targets


def summarize(m: Manifest) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Overview (images, patients, sites, splits) and per-label counts tables."""
    overview = {
        "images": len(m),
        "patients": len(set(m.patient_ids)),
        "sites": len(set(m.sites)),
    }
    for mod in MODALITIES:
        overview[f"{mod}s"] = int(np.sum(m.modalities == mod))
    if m.splits is not None:
        for s in SPLITS:
            overview[f"{s} images"] = int(np.sum(m.splits == s))
    ov = pd.DataFrame({"value": overview})
    if m.task.type == "pretrain":
        counts = pd.DataFrame({"images": [len(m)]}, index=["unlabelled (pretraining)"])
    elif m.task.type == "multilabel":
        t = m.targets
        counts = pd.DataFrame({
            "positive": np.nansum(t == 1, axis=0).astype(int),
            "negative": np.nansum(t == 0, axis=0).astype(int),
            "unknown": np.isnan(t).sum(axis=0).astype(int),
        }, index=m.task.labels)
        counts["prevalence"] = (counts.positive / (counts.positive + counts.negative)).round(3)
    else:
        n = np.bincount(m.targets, minlength=len(m.task.labels))
        counts = pd.DataFrame({"images": n, "fraction": (n / n.sum()).round(3)},
                              index=m.task.labels)
    counts.index.name = "label"
    return ov, counts
