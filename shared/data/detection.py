"""Detection manifests and the detection Dataset (boxes move with the image).

A detection manifest is a CSV with `path`, `patient_id`, `boxes` and optional `site`, `split`,
`modality`. `boxes` is a JSON list of `[label, x1, y1, x2, y2]` in pixel coordinates of the
original image (label = class name, e.g. "11" or "implant_a"); an image without boxes has `[]`.
Paths are relative to the manifest's folder or absolute.

`DetectionDataset` yields what torchvision detection models take: an image FloatTensor [3,H,W]
in 0-1 (the models normalise themselves) and {"boxes": FloatTensor [N,4] xyxy in resized pixel
coordinates, "labels": Int64Tensor [N] with class index 1..K (0 is the background)}.

A horizontal flip of a panoramic turns each tooth into its contralateral twin: with FDI class
names the flip also permutes the labels (shared/fdi.py `flip_permutation`); when a class's
mirror is missing from the task, the flip is switched off with a warning rather than producing
wrong labels.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from shared import fdi
from shared.atomic_files import write_text_atomic
from shared.data.readers import is_dicom, read_image, read_manifest_csv
from shared.errors import ManifestError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MODALITIES = ("photo", "radiograph")
REQUIRED = ("path", "boxes")
# Slack for "inside the image": coordinates converted from normalised YOLO/COCO values can
# overshoot the edge by floating-point noise, never by a visible amount.
EDGE_TOLERANCE = 1e-3



def _line(i: int) -> str:
    return f"line {i + 2}"


def parse_boxes(text: str) -> list[list]:
    """The JSON `boxes` cell as a list of [label, x1, y1, x2, y2]; raises ValueError with the
    reason when it is not that shape (positions are not checked here)."""
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as err:
        raise ValueError(f"boxes is not valid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise ValueError("boxes must be a JSON list of [label, x1, y1, x2, y2] ([] for none)")
    out = []
    for j, b in enumerate(data):
        if not isinstance(b, list) or len(b) != 5:
            raise ValueError(f"box {j + 1} is not [label, x1, y1, x2, y2]: {json.dumps(b)}")
        label, *xy = b
        if not isinstance(label, str | int) or isinstance(label, bool):
            raise ValueError(f"box {j + 1}: label must be a class name, got {json.dumps(label)}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in xy):
            raise ValueError(f"box {j + 1}: coordinates must be numbers: {json.dumps(b)}")
        out.append([str(label), *(float(v) for v in xy)])
    return out


def boxes_to_json(boxes: Sequence[Sequence]) -> str:
    """The `boxes` cell for a list of [label, x1, y1, x2, y2]. Coordinates keep 12 significant
    digits (1e-8 pixel on a 10000-pixel image): what a conversion from normalised coordinates
    adds beyond that is floating-point noise (129.39999999999998 is written 129.4)."""
    return json.dumps([[str(b[0]), *(float(f"{float(v):.12g}") for v in b[1:5])]
                       for b in boxes], separators=(",", ":"))


def box_problems(boxes: Sequence[Sequence], class_names: Sequence[str] | None = None,
                 size: tuple[int, int] | None = None,
                 names: Sequence[str] | None = None) -> list[str]:
    """What is wrong with one image's boxes, one phrase per problem: non-finite or non-positive
    size, outside the image (`size` = (width, height)), unknown class, exact duplicates.
    `names`: how to call each box (default "box 1", "box 2", ...; an importer says "line 4")."""
    known = set(class_names) if class_names is not None else None
    names = list(names) if names is not None else [f"box {j + 1}" for j in range(len(boxes))]
    out: list[str] = []
    seen: dict[tuple, int] = {}
    for j, (label, x1, y1, x2, y2) in enumerate(boxes):
        tag = f"{names[j]} {boxes_to_json([[label, x1, y1, x2, y2]])[1:-1]}"
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            out.append(f"{tag}: coordinates are not finite")
            continue
        if x2 <= x1 or y2 <= y1:
            out.append(f"{tag}: size is not positive (need x2 > x1 and y2 > y1)")
        if size is not None:
            w, h = size
            t = EDGE_TOLERANCE
            if x1 < -t or y1 < -t or x2 > w + t or y2 > h + t:
                out.append(f"{tag}: outside the {w}x{h} image")
        if known is not None and label not in known:
            out.append(f"{tag}: unknown class '{label}' (config classes: "
                       f"{', '.join(class_names)})")
        key = (label, x1, y1, x2, y2)
        if key in seen:
            out.append(f"{tag}: duplicate of {names[seen[key]]} (same class, same coordinates)")
        else:
            seen[key] = j
    return out


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of an image file; reads only the header for Pillow formats."""
    path = Path(path)
    if is_dicom(path):
        return read_image(path).size
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as err:  # Pillow raises several types on broken files
        raise ManifestError(f"{path}: unreadable or corrupt image ({err})") from None


def resolve_path(p: str, root: Path) -> Path:
    q = Path(p)
    return q if q.is_absolute() else (Path(root) / q).resolve()


def read_detection_manifest(path: str | Path, class_names: Sequence[str] | None = None, *,
                            check_images: bool = False) -> pd.DataFrame:
    """Read and validate a detection manifest; raises ManifestError with one line per problem
    (CSV line, header = line 1).

    Returns the rows with `boxes` parsed into lists of [label, x1, y1, x2, y2] (floats) and
    `patient_id` (each image its own patient, with a warning, when the column is absent) and
    `site` ("all" when absent) always present. `class_names`: every box label must be one.
    `check_images`: every image is decoded and boxes must lie inside it (`dentfed data
    check`); otherwise only that the files exist."""
    path = Path(path)
    df = read_manifest_csv(path)
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: no {', '.join(repr(c) for c in missing)} column (a "
                            f"detection manifest has path, patient_id, boxes; columns are: "
                            f"{', '.join(df.columns)})")
    if len(df) == 0:
        raise ManifestError(f"{path}: manifest has a header but no rows")
    problems: list[str] = []
    root = path.parent
    df["path"] = df["path"].str.strip()
    seen: dict[Path, int] = {}
    for i, p in enumerate(df["path"]):
        if not p:
            problems.append(f"{path} {_line(i)}: empty path")
            continue
        a = resolve_path(p, root)
        if a in seen:
            problems.append(f"{path} {_line(i)}: duplicate path '{p}' (first at "
                            f"{_line(seen[a])})")
        else:
            seen[a] = i
    if "patient_id" in df.columns:
        df["patient_id"] = df["patient_id"].str.strip()
        for i in np.flatnonzero((df["patient_id"] == "").to_numpy()):
            problems.append(f"{path} {_line(i)}: blank patient_id")
    else:
        log.warning("%s has no patient_id column: every image is treated as its own patient",
                    path.name)
        df["patient_id"] = [f"img{i}" for i in range(len(df))]
    df["site"] = (df["site"].str.strip().replace("", "unknown") if "site" in df.columns
                  else "all")
    if "modality" in df.columns:
        df["modality"] = df["modality"].str.strip().str.lower().replace("", "radiograph")
        for i in np.flatnonzero(~df["modality"].isin(MODALITIES).to_numpy()):
            problems.append(f"{path} {_line(i)}: modality '{df['modality'].iloc[i]}' is not "
                            f"one of {', '.join(MODALITIES)}")
    if "split" in df.columns:
        df["split"] = df["split"].str.strip().str.lower()
        for i in np.flatnonzero(~df["split"].isin(SPLITS).to_numpy()):
            problems.append(f"{path} {_line(i)}: split '{df['split'].iloc[i]}' is not one of "
                            f"{', '.join(SPLITS)}")
        per_patient = df.groupby("patient_id")["split"].agg(lambda s: sorted(set(s)))
        for pid, sset in per_patient.items():
            if len(sset) > 1:
                problems.append(f"{path}: patient '{pid}' is in two splits ({', '.join(sset)}); "
                                "a patient's images must all be in one split")
    parsed: list[list] = []
    for i, cell in enumerate(df["boxes"]):
        try:
            boxes = parse_boxes(cell)
        except ValueError as err:
            problems.append(f"{path} {_line(i)}: {err}")
            boxes = []
        parsed.append(boxes)
        for msg in box_problems(boxes, class_names):
            problems.append(f"{path} {_line(i)}: {msg}")
    df["boxes"] = parsed
    for i, p in enumerate(df["path"]):
        if p and not resolve_path(p, root).is_file():
            problems.append(f"{path} {_line(i)}: image file not found: {p}")
    if check_images and not problems:
        for i, (p, boxes) in enumerate(zip(df["path"], df["boxes"], strict=True)):
            try:
                size = read_image(resolve_path(p, root)).size
            except ManifestError as err:
                problems.append(f"{path} {_line(i)}: {err}")
                continue
            for msg in box_problems(boxes, None, size):
                problems.append(f"{path} {_line(i)}: {msg}")
    if problems:
        raise ManifestError(problems)
    return df


def write_detection_manifest(frame: pd.DataFrame, out: str | Path) -> Path:
    """Write a detection manifest (boxes as JSON) all-or-nothing."""
    df = frame.copy()
    df["boxes"] = [b if isinstance(b, str) else boxes_to_json(b) for b in df["boxes"]]
    out = Path(out)
    write_text_atomic(out, df.to_csv(index=False))
    return out


def class_counts(frame: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """Boxes and images per class (for `dentfed data check`)."""
    boxes = {c: 0 for c in class_names}
    images = {c: 0 for c in class_names}
    for bs in frame["boxes"]:
        for c in {b[0] for b in bs}:
            images[c] = images.get(c, 0) + 1
        for b in bs:
            boxes[b[0]] = boxes.get(b[0], 0) + 1
    out = pd.DataFrame({"boxes": boxes, "images": images})
    out.index.name = "class"
    return out


def detection_augment(modality: str = "radiograph") -> v2.Transform:
    """Box-aware training augmentation after the flip: a small affine (boxes become the
    bounding box of their moved corners) and brightness/contrast (exposure differences between
    clinics; no hue or saturation, which a radiograph does not have), then boxes are clipped
    to the image and those left under 1 pixel dropped with their labels."""
    colour = (v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)
              if modality == "photo" else v2.ColorJitter(brightness=0.15, contrast=0.15))
    return v2.Compose([
        v2.RandomAffine(degrees=3, translate=(0.03, 0.03), scale=(0.93, 1.07)),
        colour,
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])


class DetectionDataset(Dataset):
    """Yields (image FloatTensor [3,S,S] in 0-1, {"boxes": FloatTensor [N,4] xyxy in resized
    pixels, "labels": Int64Tensor [N] in 1..K}). The whole image is resized to S x S (aspect
    squashed, as for classification, so nothing at a panoramic's edge is cut) and the boxes
    with it. Training with `augment`: horizontal flip with p=0.5 (FDI labels mirrored), small
    affine and brightness/contrast. Decoded, resized images are cached per process."""

    def __init__(self, frame: pd.DataFrame, root: str | Path, image_size: int, train: bool,
                 augment: bool = True, class_names: Sequence[str] = (), *,
                 cache: bool = True, hflip: bool = True, modality: str = "radiograph"):
        if not class_names:
            raise ValueError("DetectionDataset needs the task's class names")
        self.frame = frame.reset_index(drop=True)
        self.root = Path(root)
        self.size = int(image_size)
        self.class_names = [str(c) for c in class_names]
        self.index = {c: k + 1 for k, c in enumerate(self.class_names)}
        self.augment = bool(train and augment)
        self.modality = modality
        self.flip_labels: torch.Tensor | None = None  # label index -> label index after a flip
        self.hflip = self.augment and hflip
        if self.hflip:
            try:
                perm = fdi.flip_permutation(self.class_names)
            except ValueError as err:
                log.warning("horizontal flip switched off: %s", err)
                self.hflip = False
            else:
                if perm is not None:
                    self.flip_labels = torch.tensor([0] + [k + 1 for k in perm])
        self.extra = detection_augment(modality) if self.augment else None
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = \
            {} if cache else None

    def __len__(self) -> int:
        return len(self.frame)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Resized uint8 image [3,S,S], boxes [N,4] in resized pixels, labels [N]."""
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        row = self.frame.iloc[i]
        img = read_image(resolve_path(row["path"], self.root))
        w, h = img.size
        boxes = row["boxes"]
        if isinstance(boxes, str):
            boxes = parse_boxes(boxes)
        unknown = sorted({b[0] for b in boxes} - set(self.index))
        if unknown:
            raise ManifestError(f"image {i}: box class(es) {', '.join(unknown)} not in the "
                                "task's classes")
        xyxy = torch.tensor([b[1:5] for b in boxes], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([self.index[b[0]] for b in boxes], dtype=torch.int64)
        scale = torch.tensor([self.size / w, self.size / h] * 2)
        x = F.resize(F.pil_to_tensor(img), [self.size, self.size], antialias=True)
        item = (x, (xyxy * scale).clamp(0, self.size), labels)
        if self.cache is not None:
            self.cache[i] = item
        return item

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, xyxy, labels = self._load(i)
        img = tv_tensors.Image(x)
        boxes = tv_tensors.BoundingBoxes(xyxy.clone(), format="XYXY",
                                         canvas_size=(self.size, self.size))
        if self.augment:
            if self.hflip and torch.rand(()) < 0.5:
                img, boxes = F.horizontal_flip(img), F.horizontal_flip(boxes)
                if self.flip_labels is not None:
                    labels = self.flip_labels[labels]
            out = self.extra({"image": img, "boxes": boxes, "labels": labels})
            img, boxes, labels = out["image"], out["boxes"], out["labels"]
        image = F.to_dtype(img, torch.float32, scale=True).as_subclass(torch.Tensor)
        return image, {"boxes": boxes.as_subclass(torch.Tensor).float(),
                       "labels": labels.to(torch.int64)}


def detection_collate(batch: Sequence[tuple[torch.Tensor, dict]]
                      ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A batch as torchvision detection models take it: a list of images and a list of
    target dicts (images keep their own box counts)."""
    images, targets = zip(*batch, strict=True) if batch else ((), ())
    return list(images), list(targets)

