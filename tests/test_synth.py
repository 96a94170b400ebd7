"""Tests for the synthetic demo-data generator (dental_datasets.synth)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dental_datasets.synth import (
    ANOMALY_LABELS,
    IMPLANT_SYSTEMS,
    generate_anomalies,
    generate_implants,
)

ANOM_COLS = ["path", "patient_id", "site", "modality", *ANOMALY_LABELS]
IMPL_COLS = ["path", "patient_id", "site", "modality", "implant_system"]


def _read(manifest: Path) -> pd.DataFrame:
    return pd.read_csv(manifest, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def anomalies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_anomalies(tmp_path_factory.mktemp("anom"), n=40, seed=3, image_size=64)


@pytest.fixture(scope="module")
def implants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_implants(tmp_path_factory.mktemp("impl"), n=40, seed=3, image_size=64)


@pytest.mark.parametrize(("which", "cols", "mode", "modality"), [
    ("anomalies", ANOM_COLS, "RGB", "photo"),
    ("implants", IMPL_COLS, "L", "radiograph"),
])
def test_manifest_and_images(request: pytest.FixtureRequest, which: str, cols: list[str],
                             mode: str, modality: str) -> None:
    manifest: Path = request.getfixturevalue(which)
    assert manifest.name == "manifest.csv" and manifest.is_file()
    df = _read(manifest)
    assert len(df) == 40
    assert list(df.columns) == cols
    assert set(df["modality"]) == {modality}
    assert df["path"].is_unique
    assert df["patient_id"].str.fullmatch(r"P\d{4}").all()
    assert df["site"].str.fullmatch(r"site_\d+").all()
    for rel in df["path"]:
        assert not Path(rel).is_absolute() and rel.startswith("images/")
        with Image.open(manifest.parent / rel) as im:
            assert im.size == (64, 64)
            assert im.mode == mode
    # all images of a patient come from one site; patients have several images
    assert (df.groupby("patient_id")["site"].nunique() == 1).all()
    assert df.groupby("patient_id").size().max() > 1
    # no temporary files left next to the manifest
    assert not [p for p in manifest.parent.iterdir() if p.name.endswith(".tmp")]


def test_anomaly_label_cells(anomalies: Path) -> None:
    df = _read(anomalies)
    for lab in ANOMALY_LABELS:
        assert set(df[lab]) <= {"0", "1", ""}, lab
    # known labels are a per-patient property
    for _, g in df.groupby("patient_id"):
        for lab in ANOMALY_LABELS:
            assert len(set(g[lab]) - {""}) <= 1, lab


def test_implant_classes(tmp_path: Path) -> None:
    df = _read(generate_implants(tmp_path, n=60, seed=1, image_size=48))
    assert set(df["implant_system"]) == set(IMPLANT_SYSTEMS)


def test_every_label_has_positives_and_negatives(tmp_path: Path) -> None:
    df = _read(generate_anomalies(tmp_path, n=200, seed=0, image_size=48))
    assert len(df) == 200
    for lab in ANOMALY_LABELS:
        vals = set(df[lab])
        assert {"0", "1"} <= vals, f"{lab}: {vals}"
    blanks = sum(int((df[lab] == "").sum()) for lab in ANOMALY_LABELS)
    assert 0 < blanks < 0.1 * df.shape[0] * len(ANOMALY_LABELS)


@pytest.mark.parametrize("gen", [generate_anomalies, generate_implants])
def test_deterministic_for_a_seed(tmp_path: Path, gen) -> None:
    a = gen(tmp_path / "a", n=12, seed=7, image_size=48)
    b = gen(tmp_path / "b", n=12, seed=7, image_size=48)
    c = gen(tmp_path / "c", n=12, seed=8, image_size=48)
    assert a.read_bytes() == b.read_bytes()
    rel = _read(a)["path"].iloc[0]
    assert (a.parent / rel).read_bytes() == (b.parent / rel).read_bytes()
    assert (a.parent / rel).read_bytes() != (c.parent / rel).read_bytes()
    da, dc = _read(a), _read(c)
    assert not da.equals(dc)


def test_no_labels_blank_when_unknown_fraction_zero(tmp_path: Path) -> None:
    df = _read(generate_anomalies(tmp_path, n=10, image_size=32, unknown_fraction=0.0))
    assert not (df[list(ANOMALY_LABELS)] == "").any().any()


@pytest.mark.parametrize("gen", [generate_anomalies, generate_implants])
def test_bad_arguments(tmp_path: Path, gen) -> None:
    with pytest.raises(ValueError, match="n must be at least 1"):
        gen(tmp_path, n=0)
    with pytest.raises(ValueError, match="image_size"):
        gen(tmp_path, n=5, image_size=16)
    assert not (tmp_path / "manifest.csv").exists()


def test_implant_detection_boxes_sit_on_bright_fixtures(tmp_path: Path) -> None:

    import numpy as np

    from dental_datasets.synth import generate_implant_detection
    from dentfed.cli import main
    from shared.data.detection import read_detection_manifest

    assert main(["data", "synth", "--task", "implant-detection", "--out", str(tmp_path / "d"),
                 "--n", "30", "--seed", "2", "--image-size", "96"]) == 0
    manifest = tmp_path / "d" / "manifest.csv"
    df = read_detection_manifest(manifest, IMPLANT_SYSTEMS, check_images=True)
    counts = df["boxes"].map(len)
    assert len(df) == 30 and counts.between(1, 4).all() and counts.nunique() > 1
    assert {b[0] for bs in df["boxes"] for b in bs} == set(IMPLANT_SYSTEMS)
    assert df["site"].nunique() > 1 and df["patient_id"].nunique() < 30
    for _, g in df.groupby("patient_id"):  # one patient's views show the same fixtures
        assert len({tuple(b[0] for b in bs) for bs in g["boxes"]}) == 1
    for rel, boxes in zip(df["path"], df["boxes"], strict=True):
        arr = np.asarray(Image.open(manifest.parent / rel), dtype=np.float32)
        assert arr.shape == (96, 96)
        for _, x1, y1, x2, y2 in boxes:
            inside = arr[int(y1) + 1:int(y2) - 1, int(x1) + 1:int(x2) - 1].mean()
            assert x2 - x1 >= 6 and y2 - y1 >= 15
            assert inside > arr.mean() + 20  # the fixture is the bright thing in its box
    again = generate_implant_detection(tmp_path / "e", n=30, seed=2, image_size=96)
    assert again.read_text() == manifest.read_text()
    with pytest.raises(ValueError, match="at least 96"):
        generate_implant_detection(tmp_path / "f", n=5, image_size=64)
