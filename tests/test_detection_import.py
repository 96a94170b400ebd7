"""YOLO and COCO import into detection manifests and back: round trips keep every box, bad input
gives one line per problem and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from dental_datasets import detection_import as di
from dentfed.cli import main
from shared.data.detection import read_detection_manifest
from shared.errors import ManifestError

NAMES = ["11", "21", "implant_a"]


def _yolo(root: Path, labels: dict[str, str], size: tuple[int, int] = (64, 48)) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for stem, text in labels.items():
        Image.fromarray(np.zeros(size[::-1], np.uint8)).save(root / "images" / f"{stem}.png")
        if text is not None:
            (root / "labels" / f"{stem}.txt").write_text(text)
    (root / "data.yaml").write_text(yaml.safe_dump({"names": NAMES}))
    return root


def _same_boxes(a: list, b: list, tol: float = 1e-6) -> bool:
    return len(a) == len(b) and all(x[0] == y[0] and np.allclose(x[1:], y[1:], atol=tol, rtol=0)
                                    for x, y in zip(a, b, strict=True))


def test_yolo_import_export_round_trip(tmp_path: Path) -> None:
    src = _yolo(tmp_path / "yolo", {
        "siteA-p1-0": "0 0.25 0.5 0.125 0.25\n2 0.7 0.3 0.2 0.1\n",
        "siteA-p1-1": "1 0.5 0.5 0.5 0.5",
        "siteB-p2-0": "",             # an image with no teeth
        "siteB-p3-0": None,           # no label file at all: no boxes
        "siteB-p4-0": "0 0.1 0.2 0.3 0.2 0.2 0.4\n",  # a polygon: its bounding box
    })
    out = tmp_path / "m.csv"
    df = di.import_yolo(src, out, patient_regex=r"-(p\d+)-", site_from=r"^(site\w)-")
    assert df.attrs["class_names"] == NAMES
    m = read_detection_manifest(out, NAMES, check_images=True)
    assert m["patient_id"].tolist() == ["p1", "p1", "p2", "p3", "p4"]
    assert m["site"].tolist() == ["siteA"] * 2 + ["siteB"] * 3
    assert _same_boxes(m["boxes"][0], [["11", 12.0, 18.0, 20.0, 30.0],
                                       ["implant_a", 38.4, 12.0, 51.2, 16.8]])
    assert m["boxes"][2] == [] and m["boxes"][3] == []
    assert _same_boxes(m["boxes"][4], [["11", 6.4, 9.6, 19.2, 19.2]])
    # manifest -> YOLO -> manifest: identical boxes; label lines equal the originals
    back = di.export_yolo(out, tmp_path / "yolo2", NAMES)
    assert (back / "labels" / "siteA-p1-0.txt").read_text() == \
        "0 0.25 0.5 0.125 0.25\n2 0.7 0.3 0.2 0.1\n"
    assert (back / "labels" / "siteA-p1-1.txt").read_text() == "1 0.5 0.5 0.5 0.5\n"
    di.import_yolo(back, tmp_path / "m2.csv", patient_regex=r"-(p\d+)-",
                   site_from=r"^(site\w)-")
    m2 = read_detection_manifest(tmp_path / "m2.csv", NAMES)
    assert m2["patient_id"].tolist() == m["patient_id"].tolist()
    assert all(_same_boxes(a, b, 1e-9) for a, b in zip(m["boxes"], m2["boxes"], strict=True))


def test_coco_import_export_round_trip(tmp_path: Path) -> None:
    src = _yolo(tmp_path / "yolo", {"a": "0 0.25 0.5 0.125 0.25\n2 0.7 0.3 0.2 0.1\n",
                                    "b": "", "c": "1 0.33 0.41 0.17 0.29"})
    di.import_yolo(src, tmp_path / "m.csv", site="clinic1")
    m = read_detection_manifest(tmp_path / "m.csv", NAMES)
    coco = di.export_coco(tmp_path / "m.csv", tmp_path / "coco" / "ann.json", NAMES)
    data = json.loads(coco.read_text())
    assert [c["name"] for c in data["categories"]] == NAMES
    assert len(data["annotations"]) == 3 and data["images"][0]["width"] == 64
    assert data["annotations"][0]["bbox"] == [12.0, 18.0, 8.0, 12.0]
    df = di.import_coco(coco, tmp_path / "m2.csv")
    assert df.attrs["class_names"] == NAMES
    m2 = read_detection_manifest(tmp_path / "m2.csv", NAMES, check_images=True)
    assert m2["site"].tolist() == ["clinic1"] * 3  # grouping rides along in the JSON
    assert m2["patient_id"].tolist() == m["patient_id"].tolist()
    assert all(_same_boxes(a, b, 1e-9) for a, b in zip(m["boxes"], m2["boxes"], strict=True))


def test_coco_import_problems_are_one_line_each_and_nothing_is_written(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "x.png")
    data = {"images": [{"id": 1, "file_name": "x.png", "width": 50, "height": 40},
                       {"id": 2, "file_name": "gone.png", "width": 50, "height": 40}],
            "categories": [{"id": 7, "name": "implant_a"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "bbox": [45, 5, 10, 10]},  # outside
                {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 1, 2, 2]},     # category
                {"id": 3, "image_id": 1, "category_id": 7, "bbox": [1, 1, 0, 2]},     # zero w
                {"id": 4, "image_id": 1, "category_id": 7, "bbox": [1, 1, 9, 9],
                 "iscrowd": 1},                                                      # skipped
            ]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    out = tmp_path / "m.csv"
    out.write_text("previous manifest\n")
    with pytest.raises(ManifestError) as err:
        di.import_coco(tmp_path / "ann.json", out)
    probs = err.value.problems
    assert len(probs) == 4, probs
    assert "annotation 2: category_id 9" in probs[0]
    assert "image 1 (x.png): box 1" in probs[1] and "outside the 50x40 image" in probs[1]
    assert "image 1 (x.png): box 2" in probs[2] and "size is not positive" in probs[2]
    assert "image 2: file not found: gone.png" in probs[3]
    assert out.read_text() == "previous manifest\n"  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_yolo_import_errors_and_cli(tmp_path: Path, capsys) -> None:
    src = _yolo(tmp_path / "yolo", {"a": "5 0.5 0.5 0.1 0.1\n0 0.5 0.5\n0 0.5 0.5 0.2 0.2\n"
                                    "0 0.5 0.5 0.2 0.2\n0 0.95 0.5 0.2 0.2\n"})
    out = tmp_path / "m.csv"
    assert main(["data", "import-yolo", str(src), "--out", str(out)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4, lines
    assert "a.txt:1: class 5 is not in names" in lines[0]
    assert "a.txt:2: expected 'class cx cy w h'" in lines[1]
    assert "a.txt: line 4 " in lines[2] and "duplicate of line 3 " in lines[2]
    assert "a.txt: line 5 " in lines[3] and "outside the 64x48 image" in lines[3]
    assert not out.exists()
    src2 = _yolo(tmp_path / "ok", {"c1-a": "2 0.5 0.5 0.2 0.2\n"})
    assert main(["data", "import-yolo", str(src2), "--out", str(out),
                 "--site-from", r"^(c\d)-"]) == 0
    printed = capsys.readouterr().out
    assert "1 images, 1 boxes, 1 patients, 1 sites" in printed
    assert "task.labels (3): [11, 21, implant_a]" in printed
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": {"type": "detection", "labels": NAMES}}))
    assert main(["data", "check", str(out), "--config", str(cfg)]) == 0
    assert "every box inside its image" in capsys.readouterr().out
    cfg.write_text(yaml.safe_dump({"task": {"type": "detection", "labels": ["11", "21"]}}))
    assert main(["data", "check", str(out), "--config", str(cfg)]) == 1
    assert "unknown class 'implant_a'" in capsys.readouterr().err


@pytest.mark.slow  # the real dataset beside the checkout
def test_ufba_teeth_yolo_round_trip(shared_data: Path, tmp_path: Path) -> None:
    from dental_datasets import ufba425_teeth_detection as ufba

    src = shared_data / ufba.FOLDER
    names = ufba.fdi_names(shared_data)
    out = ufba.build_manifest(tmp_path / "teeth.csv", shared_data)
    m = read_detection_manifest(out, names, check_images=False)
    assert len(m) == 318 and m["site"].nunique() == 10
    assert sorted(m["site"].unique()) == sorted(f"cate{k}" for k in range(1, 11))
    back = di.export_yolo(out, tmp_path / "yolo", names)
    # every box line written back equals the original numerically (polygons became boxes)
    for f in sorted((src / "labels").glob("*.txt"))[:80]:
        orig = [ln.split() for ln in f.read_text().splitlines() if ln.strip()]
        new = [ln.split() for ln in (back / "labels" / f.name).read_text().splitlines()]
        assert len(orig) == len(new)
        for o, n in zip(orig, new, strict=True):
            if len(o) == 5:
                assert o[0] == n[0] and np.allclose([float(v) for v in o[1:]],
                                                    [float(v) for v in n[1:]], atol=1e-9)
    di.import_yolo(back, tmp_path / "again.csv", site_from=ufba.SITE_FROM)
    m2 = read_detection_manifest(tmp_path / "again.csv", names)
    assert all(_same_boxes(a, b, 1e-6) for a, b in zip(m["boxes"], m2["boxes"], strict=True))
    assert m2["site"].tolist() == m["site"].tolist()
    # and through COCO: same boxes, same grouping
    coco = di.export_coco(out, tmp_path / "coco" / "teeth.json", names)
    di.import_coco(coco, tmp_path / "from_coco.csv")
    m3 = read_detection_manifest(tmp_path / "from_coco.csv", names)
    assert all(_same_boxes(a, b, 1e-9) for a, b in zip(m["boxes"], m3["boxes"], strict=True))
    assert m3["site"].tolist() == m["site"].tolist()
    assert m3["patient_id"].tolist() == m["patient_id"].tolist()


def test_roboflow_layout_with_splits_and_indexed_names(tmp_path: Path) -> None:
    root = tmp_path / "rf"
    for split, stems in (("train", ["p1_a", "p2_a"]), ("valid", ["p3_a"]), ("test", ["p1_b"])):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir()
        for stem in stems:
            Image.fromarray(np.zeros((20, 40), np.uint8)).save(
                root / split / "images" / f"{stem}.jpg")
            (root / split / "labels" / f"{stem}.txt").write_text("1 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text(yaml.safe_dump({"names": {0: "a", 1: "b"}}))
    df = di.import_yolo(root, tmp_path / "m.csv")
    assert df.attrs["class_names"] == ["a", "b"]
    assert sorted(df["split"]) == ["test", "train", "train", "val"]
    assert df["boxes"].tolist()[0] == [["b", 10.0, 5.0, 30.0, 15.0]]
    # a patient in two source splits: the split is kept only for reference
    df = di.import_yolo(root, tmp_path / "m2.csv", patient_regex=r"^(p\d)_")
    assert "split" not in df and sorted(set(df["source_split"])) == ["test", "train", "val"]
    m = read_detection_manifest(tmp_path / "m2.csv", ["a", "b"])
    assert m["patient_id"].tolist().count("p1") == 2
