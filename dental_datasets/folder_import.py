"""Turn an ImageFolder tree (one folder per class) into a manifest CSV."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from shared.atomic_files import write_text_atomic
from shared.data.readers import IMAGE_SUFFIXES
from shared.errors import ManifestError

SPLIT_DIRS = {"train", "val", "test"}


log = logging.getLogger("dentfed.data")


def _class_images(folder: Path) -> list[tuple[str, Path]]:
    out = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(cls.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                out.append((cls.name, f))
    return out


def import_folder(root: str | Path, out: str | Path, patient_regex: str | None = None,
                  label_column: str = "label", site: str | None = None,
                  modality: str | None = None) -> pd.DataFrame:
    """Write a manifest for `root/<class>/*` (or `root/{train,val,test}/<class>/*`, which also
    fills a `split` column). `patient_regex` is searched in each file name; its first group (or
    whole match) is the patient id. Paths are written relative to the manifest's folder."""
    root, out = Path(root), Path(out)
    if not root.is_dir():
        raise ManifestError(f"{root}: not a folder")
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    rows = []
    if subdirs and set(subdirs) <= SPLIT_DIRS:
        for split, folder in sorted(subdirs.items()):
            rows += [(cls, f, split) for cls, f in _class_images(folder)]
    else:
        rows = [(cls, f, None) for cls, f in _class_images(root)]
    if not rows:
        raise ManifestError(f"{root}: no images found in class sub-folders "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    rx = None
    if patient_regex:
        try:
            rx = re.compile(patient_regex)
        except re.error as err:
            raise ManifestError(f"--patient-regex '{patient_regex}' is not a valid regex: {err}"
                                ) from None
    out_dir = out.parent.resolve()
    records = []
    problems = []
    for cls, f, split in rows:
        rec = {"path": Path(_relative(f.resolve(), out_dir)).as_posix()}
        if rx is not None:
            match = rx.search(f.name)
            if match is None:
                problems.append(f"{f}: file name does not match --patient-regex '{patient_regex}'")
                continue
            rec["patient_id"] = match.group(1) if match.groups() else match.group(0)
        if site:
            rec["site"] = site
        if modality:
            rec["modality"] = modality
        if split:
            rec["split"] = split
        rec[label_column] = cls
        records.append(rec)
    if problems:
        raise ManifestError(problems)
    df = pd.DataFrame.from_records(records)
    if "split" in df and "patient_id" in df:
        crossing = (df.groupby("patient_id")["split"].nunique() > 1).sum()
        if crossing:  # the folder split leaks patients: keep it for reference, don't use it
            log.warning("the folder's train/val/test split puts %d patient(s) in more than one "
                        "split; writing it as `folder_split` (not used) so dentfed splits by "
                        "patient", crossing)
            df = df.rename(columns={"split": "folder_split"})
    write_text_atomic(out, df.to_csv(index=False))
    return df


def _relative(path: Path, start: Path) -> str:
    import os

    try:
        return os.path.relpath(path, start)
    except ValueError:  # different drives on Windows
        return str(path)
