"""Detection manifests (validation, one line per bad box) and the box-aware dataset, including
the horizontal flip that swaps left and right FDI quadrants."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from shared import fdi
from shared.config import config_from_dict
from shared.data.detection import (
    DetectionDataset,
    boxes_to_json,
    detection_collate,
    parse_boxes,
    read_detection_manifest,
    write_detection_manifest,
)
from shared.errors import ConfigError, ManifestError

FDI4 = ["18", "28", "38", "48"]


def _image(path: Path, w: int, h: int, bright: list[tuple[int, int, int, int]]) -> None:
    arr = np.full((h, w), 20, np.uint8)
    for x1, y1, x2, y2 in bright:
        arr[y1:y2, x1:x2] = 240
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _manifest(tmp_path: Path, rows: list[dict]) -> Path:
    out = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(out, index=False)
    return out


def test_config_accepts_detection_and_numbers_as_class_names() -> None:
    cfg = config_from_dict({"task": {"type": "detection", "labels": [18, 28, "implant_a"]}})
    assert cfg.task.labels == ["18", "28", "implant_a"]
    with pytest.raises(ConfigError, match="label_column is only for multiclass"):
        config_from_dict({"task": {"type": "detection", "labels": ["a"], "label_column": "x"}})
    with pytest.raises(ConfigError, match="background"):
        config_from_dict({"task": {"type": "detection", "labels": ["background", "a"]}})


def test_fdi_basics_and_flip_permutation() -> None:
    assert len(fdi.PERMANENT) == 32 and fdi.PERMANENT[0] == "11" and fdi.PERMANENT[-1] == "48"
    assert [fdi.mirror(t) for t in ("18", "28", "48", "38", "11", "55")] == \
        ["28", "18", "38", "48", "21", "65"]
    assert fdi.quadrant("36") == 3 and fdi.position("36") == 6
    assert len(fdi.MIRROR) == 52 and fdi.MIRROR["48"] == "38" and fdi.MIRROR["85"] == "75"
    assert all(fdi.MIRROR[fdi.MIRROR[n]] == n for n in fdi.MIRROR)
    assert not fdi.is_fdi("19") and not fdi.is_fdi("56") and not fdi.is_fdi("implant")
    perm = fdi.flip_permutation(fdi.PERMANENT)
    flipped = [fdi.PERMANENT[perm[k]] for k in range(32)]
    assert flipped[:8] == [f"2{p}" for p in range(1, 9)]        # 1x -> 2x
    assert flipped[16:24] == [f"4{p}" for p in range(1, 9)]     # 3x -> 4x
    assert sorted(perm) == list(range(32))
    assert fdi.flip_permutation(["system_a", "system_b"]) is None
    assert fdi.flip_permutation(["11", "21", "implant"]) == [1, 0, 2]
    with pytest.raises(ValueError, match="18 \\(mirror 28\\)"):
        fdi.flip_permutation(["18", "11", "21"])


def test_read_manifest_parses_boxes_and_fills_defaults(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 40, 30, [])
    _image(tmp_path / "b.png", 40, 30, [])
    m = _manifest(tmp_path, [
        {"path": "a.png", "patient_id": "P1", "boxes": '[["18", 1, 2, 10.5, 20]]'},
        {"path": "b.png", "patient_id": "P2", "boxes": "[]"},
    ])
    df = read_detection_manifest(m, FDI4, check_images=True)
    assert df["boxes"].tolist() == [[["18", 1.0, 2.0, 10.5, 20.0]], []]
    assert df["site"].tolist() == ["all", "all"]
    # write -> read gives the same boxes
    out = write_detection_manifest(df, tmp_path / "copy.csv")
    assert read_detection_manifest(out, FDI4)["boxes"].tolist() == df["boxes"].tolist()
    assert parse_boxes(boxes_to_json([["11", 0.1, 0.2, 0.30000000000000004, 7]])) == \
        [["11", 0.1, 0.2, 0.3, 7.0]]  # float noise beyond 12 digits dropped


def test_each_bad_box_is_one_line_naming_the_row(tmp_path: Path) -> None:
    for name in "abcdefg":
        _image(tmp_path / f"{name}.png", 40, 30, [])
    rows = [
        {"path": "a.png", "patient_id": "P1", "boxes": '[["18", 1, 2, 10, 20]]'},      # fine
        {"path": "b.png", "patient_id": "P2", "boxes": '[["18", 10, 2, 10, 20]]'},     # zero w
        {"path": "c.png", "patient_id": "P3", "boxes": '[["99", 1, 2, 10, 20]]'},      # class
        {"path": "d.png", "patient_id": "P4",
         "boxes": '[["28", 1, 2, 10, 20], ["28", 1, 2, 10, 20]]'},                    # duplicate
        {"path": "e.png", "patient_id": "P5", "boxes": '[["18", 1, 2]]'},              # shape
        {"path": "f.png", "patient_id": "P6", "boxes": "not json"},
        {"path": "g.png", "patient_id": "P7", "boxes": '[["18", 5, 5, 4, 3]]'},        # negative
    ]
    with pytest.raises(ManifestError) as err:
        read_detection_manifest(_manifest(tmp_path, rows), FDI4)
    probs = err.value.problems
    assert len(probs) == 6, probs
    assert "line 3" in probs[0] and "size is not positive" in probs[0]
    assert "line 4" in probs[1] and "unknown class '99'" in probs[1]
    assert "line 5" in probs[2] and "duplicate of box 1" in probs[2]
    assert "line 6" in probs[3] and "not [label, x1, y1, x2, y2]" in probs[3]
    assert "line 7" in probs[4] and "not valid JSON" in probs[4]
    assert "line 8" in probs[5] and "size is not positive" in probs[5]
    # outside the image is only known once the image is opened
    m = _manifest(tmp_path, [{"path": "a.png", "patient_id": "P1",
                              "boxes": '[["18", 1, 2, 41, 20], ["28", -3, 0, 5, 5]]'}])
    read_detection_manifest(m, FDI4)  # sizes not checked without check_images
    with pytest.raises(ManifestError) as err:
        read_detection_manifest(m, FDI4, check_images=True)
    assert len(err.value.problems) == 2
    assert all("line 2" in p and "outside the 40x30 image" in p for p in err.value.problems)


def test_dataset_resizes_boxes_and_labels_from_one(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 80, 40, [(8, 4, 24, 20)])
    _image(tmp_path / "b.png", 80, 40, [])
    m = _manifest(tmp_path, [
        {"path": "a.png", "patient_id": "P1", "boxes": '[["28", 8, 4, 24, 20]]'},
        {"path": "b.png", "patient_id": "P2", "boxes": "[]"},
    ])
    df = read_detection_manifest(m, FDI4)
    ds = DetectionDataset(df, tmp_path, 32, train=False, augment=True, class_names=FDI4)
    x, t = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() < x.max() <= 1
    assert torch.allclose(t["boxes"], torch.tensor([[3.2, 3.2, 9.6, 16.0]]))
    assert t["labels"].tolist() == [2] and t["labels"].dtype == torch.int64
    x2, t2 = ds[1]
    assert t2["boxes"].shape == (0, 4) and t2["labels"].shape == (0,)
    images, targets = detection_collate([ds[0], ds[1]])
    assert len(images) == 2 and targets[1]["boxes"].shape == (0, 4)


def _flip_runs(ds: DetectionDataset, n: int = 40) -> list[tuple[float, str, float]]:
    """(box centre x, label name, mean brightness inside the box) over n augmented draws."""
    torch.manual_seed(0)
    out = []
    for _ in range(n):
        x, t = ds[0]
        (x1, y1, x2, y2), = t["boxes"].tolist()
        inside = x[0, int(y1) + 2:int(y2) - 2, int(x1) + 2:int(x2) - 2].mean().item()
        out.append(((x1 + x2) / 2, ds.class_names[t["labels"].item() - 1], inside))
    return out


def test_flip_swaps_fdi_quadrants_and_moves_the_box(tmp_path: Path) -> None:
    # the patient's upper right third molar (18) sits at the image's upper left
    _image(tmp_path / "a.png", 64, 64, [(2, 4, 18, 24)])
    m = _manifest(tmp_path, [{"path": "a.png", "patient_id": "P1",
                              "boxes": '[["18", 2, 4, 18, 24]]'}])
    ds = DetectionDataset(read_detection_manifest(m, FDI4), tmp_path, 64, train=True,
                          augment=True, class_names=FDI4)
    runs = _flip_runs(ds)
    left = [r for r in runs if r[0] < 32]
    right = [r for r in runs if r[0] >= 32]
    assert left and right  # both outcomes happened
    assert {r[1] for r in left} == {"18"} and {r[1] for r in right} == {"28"}
    assert min(r[2] for r in runs) > 0.6  # the box still covers the bright tooth


def test_flip_without_the_mirror_class_is_switched_off(tmp_path: Path, caplog) -> None:
    _image(tmp_path / "a.png", 64, 64, [(2, 4, 18, 24)])
    m = _manifest(tmp_path, [{"path": "a.png", "patient_id": "P1",
                              "boxes": '[["18", 2, 4, 18, 24]]'}])
    names = ["18", "11", "21"]
    with caplog.at_level(logging.WARNING):
        ds = DetectionDataset(read_detection_manifest(m, names), tmp_path, 64, train=True,
                              class_names=names)
    assert "horizontal flip switched off" in caplog.text
    runs = _flip_runs(ds, 20)
    assert all(r[0] < 32 and r[1] == "18" for r in runs)


def test_flip_keeps_labels_that_are_not_teeth(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 64, [(2, 4, 18, 24)])
    m = _manifest(tmp_path, [{"path": "a.png", "patient_id": "P1",
                              "boxes": json.dumps([["system_b", 2, 4, 18, 24]])}])
    names = ["system_a", "system_b"]
    ds = DetectionDataset(read_detection_manifest(m, names), tmp_path, 64, train=True,
                          class_names=names)
    runs = _flip_runs(ds)
    assert any(r[0] >= 32 for r in runs) and {r[1] for r in runs} == {"system_b"}

