"""Every user mistake in a manifest gives one clear line naming the row or file, via the CLI
too (exit 1, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from shared.config import config_from_dict
from shared.data.manifest import read_manifest
from shared.data.splits import kfold_patients, split_patients
from shared.errors import ManifestError
from tests.conftest import tiny_config, write_tiny_multilabel

TASK = config_from_dict({"task": {"type": "multilabel", "labels": ["bright", "stripe"]}}).task


def _edit(manifest: Path, fn) -> Path:
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    out = fn(df)  # edits in place (None) or returns the edited frame
    (df if out is None else out).to_csv(manifest, index=False)
    return manifest


def test_valid_manifest_reads_blanks_as_unknown(tiny_manifest):
    m = read_manifest(tiny_manifest, TASK, check_images=True)
    assert len(m) == 48
    raw = pd.read_csv(tiny_manifest, dtype=str, keep_default_na=False)
    blank = (raw["stripe"] == "").to_numpy()
    assert blank.sum() > 0
    assert np.isnan(m.targets[blank, 1]).all()
    assert not np.isnan(m.targets[~blank, 1]).any()
    assert set(np.unique(m.targets[:, 0])) == {0.0, 1.0}



CASES = {
    "missing file": (lambda df: df.__setitem__("path", df["path"].where(df.index != 2,
                                                                       "img/none.png")),
                     r"line 4: image file not found: img/none.png"),
    "bad value": (lambda df: df.loc.__setitem__((5, "bright"), "2"),
                  r"line 7: label 'bright' has value '2' \(expected 0, 1 or blank"),
    "duplicate path": (lambda df: df.loc.__setitem__((7, "path"), df.loc[6, "path"]),
                       r"line 9: duplicate path 'img/6.png' \(first at line 8\)"),
    "missing label column": (lambda df: df.drop(columns=["stripe"]),
                             r"label column\(s\) named in the config but absent from the CSV: "
                             r"stripe"),
    "patient in two splits": (lambda df: df.__setitem__("split", ["train", "test"] * 24),
                              r"patient 'P000' is in two splits \(test, train\)"),
    "bad modality": (lambda df: df.__setitem__("modality", ["photo"] * 47 + ["xray"]),
                     r"line 49: modality 'xray' is not one of photo, radiograph"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_manifest_gives_clear_error(tiny_manifest, case):
    edit, pattern = CASES[case]
    _edit(tiny_manifest, edit)
    with pytest.raises(ManifestError, match=pattern):
        read_manifest(tiny_manifest, TASK)


def test_corrupt_image_found_by_check(tiny_manifest):
    (tiny_manifest.parent / "img" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    read_manifest(tiny_manifest, TASK)  # existence only: fine
    with pytest.raises(ManifestError, match=r"line 5: .*3\.png: unreadable or corrupt image"):
        read_manifest(tiny_manifest, TASK, check_images=True)


def test_empty_and_header_only(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ManifestError, match="manifest is empty"):
        read_manifest(tmp_path / "empty.csv", TASK)
    (tmp_path / "header.csv").write_text("path,bright,stripe\n")
    with pytest.raises(ManifestError, match="header but no rows"):
        read_manifest(tmp_path / "header.csv", TASK)


def test_unknown_class(tmp_path):
    task = config_from_dict({"task": {"type": "multiclass", "labels": ["a", "b"],
                                      "label_column": "cls"}, "train": {"loss": "ce"}}).task
    root = tmp_path / "mc"
    write_tiny_multilabel(root, n=6)
    _edit(root / "manifest.csv", lambda df: df.__setitem__("cls", ["a", "b", "c", "a", "b", "a"]))
    with pytest.raises(ManifestError, match=r"line 4: unknown class 'c' in 'cls'"):
        read_manifest(root / "manifest.csv", task)


def test_no_patient_column_warns(tiny_manifest, caplog):
    _edit(tiny_manifest, lambda df: df.drop(columns=["patient_id"]))
    m = read_manifest(tiny_manifest, TASK)
    assert "every image is treated as its own patient" in caplog.text
    assert len(set(m.patient_ids)) == len(m)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dentfed.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_cli_check_reports_every_problem_without_traceback(tiny_manifest, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": {"type": "multilabel",
                                            "labels": ["bright", "stripe"]}}))
    ok = _cli("data", "check", str(tiny_manifest), "--config", str(cfg))
    assert ok.returncode == 0, ok.stderr
    assert "| stripe" in ok.stdout and "ok: 48 images" in ok.stdout

    def two_mistakes(df):
        df.loc[1, "bright"] = "yes"
        df.loc[2, "path"] = "img/missing.png"
    _edit(tiny_manifest, two_mistakes)
    bad = _cli("data", "check", str(tiny_manifest), "--config", str(cfg))
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    lines = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2, bad.stderr
    assert "line 3: label 'bright' has value 'yes'" in lines[0]
    assert "line 4: image file not found: img/missing.png" in lines[1]


def test_splits_keep_patients_together(tiny_manifest):
    m = read_manifest(tiny_manifest, TASK)
    s = split_patients(m, 0.2, 0.2, seed=1)
    all_rows = np.concatenate([s["train"], s["val"], s["test"]])
    assert sorted(all_rows) == list(range(len(m)))
    pats = {k: set(m.patient_ids[v]) for k, v in s.items()}
    assert not (pats["train"] & pats["val"]) and not (pats["train"] & pats["test"])
    assert not (pats["val"] & pats["test"])
    again = split_patients(m, 0.2, 0.2, seed=1)
    assert all(np.array_equal(s[k], again[k]) for k in s)
    folds = kfold_patients(m, 3, 0.2, seed=0)
    tests = np.concatenate([f["test"] for f in folds])
    assert sorted(tests) == list(range(len(m)))
    for f in folds:
        assert not set(m.patient_ids[f["test"]]) & set(m.patient_ids[f["train"]])


def test_import_folder_keeps_or_drops_the_folder_split(tmp_path):
    from PIL import Image

    from dental_datasets.folder_import import import_folder

    def tree(root, files):
        for rel in files:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (8, 8), 128).save(root / rel)

    clean = tmp_path / "clean"
    tree(clean, ["train/a/p1_0.png", "train/b/p2_0.png", "test/a/p3_0.png", "test/b/p3_1.png"])
    df = import_folder(clean, tmp_path / "clean.csv", patient_regex=r"^(p\d+)_")
    assert dict(zip(df.patient_id, df.split, strict=True)) == {"p1": "train", "p2": "train",
                                                                "p3": "test"}
    leaky = tmp_path / "leaky"  # patient p1 on both sides, like tooth_crops_treatment
    tree(leaky, ["train/a/p1_0.png", "train/b/p2_0.png", "test/a/p1_1.png", "test/b/p2_1.png"])
    df = import_folder(leaky, tmp_path / "leaky.csv", patient_regex=r"^(p\d+)_")
    assert "split" not in df and set(df.folder_split) == {"train", "test"}
    cfg = tiny_config().model_dump(mode="json")
    cfg["task"] = {"type": "multiclass", "labels": ["a", "b"], "label_column": "label"}
    cfg["train"]["loss"] = "ce"
    m = read_manifest(tmp_path / "leaky.csv", config_from_dict(cfg).task)
    assert m.splits is None and len(m) == 4


def test_import_folder_and_predict_accept_the_same_image_files(tmp_path):
    """One set of suffixes: a .webp or .tif that `predict` reads is imported too."""
    from PIL import Image

    from dental_datasets.folder_import import import_folder
    from dentfed.inference import collect_inputs

    for rel in ("a/p1_0.webp", "a/p1_1.tif", "b/p2_0.jpg", "b/notes.txt"):
        (tmp_path / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (tmp_path / "tree" / rel).write_text("not an image")
        else:
            Image.new("RGB", (8, 8), (90, 90, 90)).save(tmp_path / "tree" / rel)
    df = import_folder(tmp_path / "tree", tmp_path / "m.csv", patient_regex=r"^(p\d+)_")
    names = sorted(Path(p).name for p in collect_inputs(tmp_path / "tree").paths)
    assert sorted(Path(p).name for p in df.path) == names == ["p1_0.webp", "p1_1.tif", "p2_0.jpg"]
