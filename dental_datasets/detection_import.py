"""YOLO folders and COCO JSON <-> detection manifests (shared/data/detection.py).

Import keeps what federation needs: the patient grouping (`patient_regex` on the file name,
group 1; without it every image is its own patient) and an optional clinic (`site`: one
value, or `site_from`, a regex on the file name whose group 1 is the site, e.g.
`^(cate\\d+)-` for UFBA-425's category). Everything is validated before anything is written
(boxes inside the image, positive size, known class, no exact duplicates), and the manifest
is written all-or-nothing: a failed import leaves no half-written file.

Exporters write the other way so round trips can be checked: YOLO (`images/`, `labels/*.txt`,
`data.yaml`) and COCO (one JSON; our patient_id/site/split ride along as extra keys of each
image entry, which other tools ignore).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import yaml

from shared.atomic_files import atomic_folder, write_text_atomic
from shared.data.detection import (
    box_problems,
    image_size,
    read_detection_manifest,
    resolve_path,
    write_detection_manifest,
)
from shared.data.readers import IMAGE_SUFFIXES
from shared.errors import ManifestError

log = logging.getLogger("dentfed.data")

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
               "test": "test"}


def _regex(pattern: str | None, option: str) -> re.Pattern | None:
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ManifestError(f"{option} '{pattern}' is not a valid regex: {err}") from None


def _group(rx: re.Pattern, text: str) -> str | None:
    m = rx.search(text)
    if m is None:
        return None
    return m.group(1) if m.groups() else m.group(0)


def _relative(path: Path, start: Path) -> str:
    """Relative to `start` when inside it (the manifest travels with its images), else
    absolute."""
    try:
        return path.relative_to(start).as_posix()
    except ValueError:
        return str(path)


class _Rows:
    """Collects manifest rows and problems; patient and site come from the file name."""

    def __init__(self, out: Path, patient_regex: str | None, site: str | None,
                 site_from: str | None, modality: str | None):
        if site and site_from:
            raise ManifestError("give either a fixed site or a site regex, not both")
        self.out_dir = Path(out).parent.resolve()
        self.prx = _regex(patient_regex, "--patient-regex")
        self.srx = _regex(site_from, "--site-from")
        self.patient_regex, self.site_from = patient_regex, site_from
        self.site, self.modality = site, modality
        self.rows: list[dict] = []
        self.problems: list[str] = []

    def add(self, image: Path, boxes: list[list], split: str | None = None,
            patient: str | None = None, site: str | None = None) -> None:
        rec: dict = {"path": _relative(image.resolve(), self.out_dir)}
        if self.prx is not None:
            patient = _group(self.prx, image.name)
            if patient is None:
                self.problems.append(f"{image}: file name does not match --patient-regex "
                                     f"'{self.patient_regex}'")
                return
        rec["patient_id"] = patient or image.stem
        if self.srx is not None:
            site = _group(self.srx, image.name)
            if site is None:
                self.problems.append(f"{image}: file name does not match --site-from "
                                     f"'{self.site_from}'")
                return
        site = self.site or site
        if site:
            rec["site"] = site
        if self.modality:
            rec["modality"] = self.modality
        if split:
            rec["split"] = split
        rec["boxes"] = boxes
        self.rows.append(rec)

    def write(self, out: Path, source: Path) -> pd.DataFrame:
        if self.problems:
            raise ManifestError(self.problems)
        if not self.rows:
            raise ManifestError(f"{source}: no images found")
        df = pd.DataFrame.from_records(self.rows)
        if "split" in df:
            crossing = int((df.groupby("patient_id")["split"].nunique() > 1).sum())
            if crossing:  # the source split leaks patients: keep it for reference only
                log.warning("the source's train/val/test split puts %d patient(s) in more than "
                            "one split; writing it as `source_split` (not used) so dentfed "
                            "splits by patient", crossing)
                df = df.rename(columns={"split": "source_split"})
        write_detection_manifest(df, out)
        return df


# --------------------------------------------------------------------------- YOLO

def yolo_names(root: Path) -> list[str]:
    """Class names of a YOLO folder: data.yaml `names` (a list, or a dict index -> name), else
    classes.txt / obj.names (one per line)."""
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        f = root / name
        if f.is_file():
            data = yaml.safe_load(f.read_text()) or {}
            names = data.get("names")
            if isinstance(names, dict):
                keys = sorted(int(k) for k in names)
                if keys != list(range(len(keys))):
                    raise ManifestError(f"{f}: names must be numbered 0..{len(keys) - 1}")
                return [str(names[k]) for k in keys]
            if isinstance(names, list) and names:
                return [str(n) for n in names]
            raise ManifestError(f"{f}: no `names` list")
    for name in ("classes.txt", "obj.names"):
        f = root / name
        if f.is_file():
            return [ln.strip() for ln in f.read_text().splitlines() if ln.strip()]
    raise ManifestError(f"{root}: no data.yaml (names) or classes.txt: the class names are "
                        "unknown")


def _yolo_split(rel: Path) -> str | None:
    for part in rel.parts[:-1]:
        if part.lower() in SPLIT_NAMES:
            return SPLIT_NAMES[part.lower()]
    return None


def parse_yolo_labels(text: str, names: Sequence[str], size: tuple[int, int],
                      where: str) -> tuple[list[list], list[str], list[int], int]:
    """Boxes in pixels from a YOLO label file: `class cx cy w h` (normalised) per line; a
    segment line (`class x1 y1 x2 y2 ...`, a polygon) becomes the polygon's bounding box, as
    Ultralytics does. Returns (boxes, problems, each box's line number, number of polygon
    lines)."""
    w, h = size
    boxes: list[list] = []
    lines: list[int] = []
    problems: list[str] = []
    polygons = 0
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        try:
            k = int(parts[0])
            vals = [float(v) for v in parts[1:]]
        except ValueError:
            problems.append(f"{where}:{n}: not numbers: '{line.strip()}'")
            continue
        if not 0 <= k < len(names):
            problems.append(f"{where}:{n}: class {k} is not in names (0..{len(names) - 1})")
            continue
        if len(vals) == 4:
            cx, cy, bw, bh = vals
            x1, y1, x2, y2 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, \
                (cy + bh / 2) * h
        elif len(vals) >= 6 and len(vals) % 2 == 0:
            xs, ys = vals[0::2], vals[1::2]
            x1, y1, x2, y2 = min(xs) * w, min(ys) * h, max(xs) * w, max(ys) * h
            polygons += 1
        else:
            problems.append(f"{where}:{n}: expected 'class cx cy w h' (or a polygon), got "
                            f"{len(parts)} values")
            continue
        boxes.append([str(names[k]), x1, y1, x2, y2])
        lines.append(n)
    return boxes, problems, lines, polygons


def import_yolo(root: str | Path, out: str | Path, *, patient_regex: str | None = None,
                site: str | None = None, site_from: str | None = None,
                modality: str | None = "radiograph") -> pd.DataFrame:
    """Write a detection manifest for a YOLO folder: every `images/` folder under `root` (e.g.
    `root/images` or Roboflow's `root/train/images`) with its sibling `labels/` (same relative
    path, `.txt`); a missing label file means no boxes. A train/val(id)/test folder on the way
    fills the `split` column. Returns the rows (boxes as lists)."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder")
    names = yolo_names(root)
    rows = _Rows(out, patient_regex, site, site_from, modality)
    polygons = 0
    image_dirs = sorted(p for p in root.rglob("images") if p.is_dir())
    if not image_dirs:
        raise ManifestError(f"{root}: no images/ folder (YOLO layout: images/, labels/, "
                            "data.yaml)")
    for img_dir in image_dirs:
        lab_dir = img_dir.parent / "labels"
        for img in sorted(p for p in img_dir.rglob("*")
                          if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            rel = img.relative_to(img_dir)
            lab = (lab_dir / rel).with_suffix(".txt")
            try:
                size = image_size(img)
            except ManifestError as err:
                rows.problems.append(str(err))
                continue
            boxes: list[list] = []
            if lab.is_file():
                boxes, probs, nums, npoly = parse_yolo_labels(lab.read_text(), names, size,
                                                              str(lab))
                polygons += npoly
                rows.problems += probs
                rows.problems += [f"{lab}: {p}" for p in box_problems(
                    boxes, names, size, names=[f"line {n}" for n in nums])]
            rows.add(img, boxes, _yolo_split(img.relative_to(root)))
    if polygons:
        log.warning("%d polygon (segment) label line(s) were turned into their bounding boxes",
                    polygons)
    df = rows.write(out, root)
    df.attrs["class_names"] = names
    return df


def _fmt(v: float) -> str:
    """10 significant digits: drops the float noise of pixel -> normalised arithmetic while
    keeping every digit a YOLO tool writes."""
    return f"{v:.10g}"


def _unique_names(paths: Sequence[Path]) -> list[str]:
    used: set[str] = set()
    out = []
    for p in paths:
        name, k = p.name, 1
        while name in used:
            name = f"{p.stem}_{k}{p.suffix}"
            k += 1
        used.add(name)
        out.append(name)
    return out


def export_yolo(manifest: str | Path, out_dir: str | Path,
                class_names: Sequence[str] | None = None) -> Path:
    """Write a YOLO folder (images copied, labels/*.txt, data.yaml) for a detection manifest;
    class order = `class_names` (default: sorted labels in the manifest). The folder is
    written all-or-nothing."""
    manifest = Path(manifest)
    df = read_detection_manifest(manifest, class_names)
    names = list(class_names) if class_names else sorted({b[0] for bs in df["boxes"] for b in bs})
    index = {n: k for k, n in enumerate(names)}
    images = [resolve_path(p, manifest.parent) for p in df["path"]]
    with atomic_folder(Path(out_dir)) as tmp:
        (tmp / "images").mkdir()
        (tmp / "labels").mkdir()
        for img, name, boxes in zip(images, _unique_names(images), df["boxes"], strict=True):
            w, h = image_size(img)
            shutil.copyfile(img, tmp / "images" / name)
            lines = [" ".join([str(index[lab]), _fmt((x1 + x2) / 2 / w), _fmt((y1 + y2) / 2 / h),
                               _fmt((x2 - x1) / w), _fmt((y2 - y1) / h)])
                     for lab, x1, y1, x2, y2 in boxes]
            (tmp / "labels" / f"{Path(name).stem}.txt").write_text(
                "".join(f"{ln}\n" for ln in lines))
        (tmp / "data.yaml").write_text(yaml.safe_dump(
            {"path": ".", "train": "images", "nc": len(names), "names": names},
            sort_keys=False))
    return Path(out_dir)


# --------------------------------------------------------------------------- COCO

def import_coco(coco_json: str | Path, out: str | Path, *, images_root: str | Path | None = None,
                patient_regex: str | None = None, site: str | None = None,
                site_from: str | None = None, modality: str | None = "radiograph"
                ) -> pd.DataFrame:
    """Write a detection manifest for a COCO detection JSON (`images`, `annotations` with
    `bbox` [x, y, w, h] in pixels, `categories`). Image files are `file_name` under
    `images_root` (default: the JSON's folder). Crowd annotations (iscrowd 1: regions, not
    objects) are left out with a warning. Image entries' own `patient_id`/`site`/`split` keys
    (as `export_coco` writes them) are used unless a regex or fixed site is given."""
    coco_json, out = Path(coco_json), Path(out)
    try:
        data = json.loads(coco_json.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{coco_json}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{coco_json}: not valid JSON ({err})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ManifestError(f"{coco_json}: no '{key}' list (not a COCO detection file)")
    base = Path(images_root) if images_root else coco_json.parent
    cats = {c["id"]: str(c["name"]) for c in data["categories"]}
    names = [cats[k] for k in sorted(cats)]
    if len(set(names)) != len(names):
        raise ManifestError(f"{coco_json}: category names are not unique")
    per_image: dict = {im["id"]: [] for im in data["images"]}
    problems: list[str] = []
    crowd = 0
    for a in data["annotations"]:
        where = f"{coco_json}: annotation {a.get('id', '?')}"
        if a.get("image_id") not in per_image:
            problems.append(f"{where}: image_id {a.get('image_id')} is not in images")
            continue
        if a.get("category_id") not in cats:
            problems.append(f"{where}: category_id {a.get('category_id')} is not in categories")
            continue
        if a.get("iscrowd", 0):
            crowd += 1
            continue
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, int | float) for v in bbox)):
            problems.append(f"{where}: bbox must be [x, y, width, height], got {bbox}")
            continue
        x, y, bw, bh = (float(v) for v in bbox)
        per_image[a["image_id"]].append([cats[a["category_id"]], x, y, x + bw, y + bh])
    if crowd:
        log.warning("%d crowd annotation(s) (iscrowd 1) left out", crowd)
    rows = _Rows(out, patient_regex, site, site_from, modality)
    rows.problems += problems
    for im in data["images"]:
        img = base / im["file_name"]
        if not img.is_file():
            rows.problems.append(f"{coco_json}: image {im['id']}: file not found: "
                                 f"{im['file_name']}")
            continue
        w, h = im.get("width"), im.get("height")
        size = (int(w), int(h)) if w and h else image_size(img)
        boxes = per_image[im["id"]]
        rows.problems += [f"{coco_json}: image {im['id']} ({im['file_name']}): {p}"
                          for p in box_problems(boxes, names, size)]
        split = im.get("split")
        rows.add(img, boxes, SPLIT_NAMES.get(str(split).lower()) if split else None,
                 patient=im.get("patient_id"), site=im.get("site"))
    df = rows.write(out, coco_json)
    df.attrs["class_names"] = names
    return df


def export_coco(manifest: str | Path, out_json: str | Path,
                class_names: Sequence[str] | None = None) -> Path:
    """Write a COCO detection JSON for a detection manifest (category ids 1..K in
    `class_names` order; file names relative to the JSON's folder)."""
    manifest, out_json = Path(manifest), Path(out_json)
    df = read_detection_manifest(manifest, class_names)
    names = list(class_names) if class_names else sorted({b[0] for bs in df["boxes"] for b in bs})
    cat = {n: k + 1 for k, n in enumerate(names)}
    images, annotations = [], []
    base = out_json.parent.resolve()
    for i, row in enumerate(df.itertuples(index=False), start=1):
        img = resolve_path(row.path, manifest.parent)
        w, h = image_size(img)
        entry = {"id": i, "file_name": _relative(img, base), "width": w, "height": h,
                 "patient_id": row.patient_id}
        if "site" in df.columns and row.site != "all":
            entry["site"] = row.site
        if "split" in df.columns:
            entry["split"] = row.split
        images.append(entry)
        for lab, x1, y1, x2, y2 in row.boxes:
            bw, bh = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": i,
                                "category_id": cat[lab], "bbox": [x1, y1, bw, bh],
                                "area": bw * bh, "iscrowd": 0})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": cat[n], "name": n, "supercategory": "dental"}
                           for n in names]}
    write_text_atomic(out_json, json.dumps(data, indent=1))
    return out_json
