"""Detectors from the one factory, trained by the one loop, scored with mAP, federated with only
trainable arrays on the wire. Tiny real images: bright squares ('11') and wide bars ('21')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from flwr.app import Context, Message, RecordDict
from PIL import Image

from client.app import app as client_app
from shared.config import config_from_dict
from shared.fedio import (
    build_global_model,
    config_record,
    exchanged_keys,
    expected_shapes,
    model_arrays,
)
from shared.metrics import box_classification, detection_metrics
from shared.models import build_model, frozen_prefixes, trainable_state_keys
from shared.training import evaluate, fit, seed_everything

WEIGHTS = "weights/torchvision_mobilenet_v2_features_in1k.pth"


def write_tiny_detection(root: Path, n: int = 24, size: int = 96, seed: int = 0) -> Path:
    """n images, one per patient, each with 1-3 objects: '11' = a bright 20x20 square, '21' =
    a 36x12 bar; boxes in original pixels; two sites."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 50, (size, size, 3)).astype(np.uint8)
        boxes = []
        for k in range(int(rng.integers(1, 4))):
            label = "11" if (i + k) % 2 == 0 else "21"
            w, h = (20, 20) if label == "11" else (36, 12)
            x1 = int(rng.integers(0, size - w))
            y1 = int(rng.integers(0, size - h))
            if any(not (x1 + w <= b[1] or b[3] <= x1 or y1 + h <= b[2] or b[4] <= y1)
                   for b in boxes):
                continue  # no overlaps
            arr[y1:y1 + h, x1:x1 + w] = 220 if label == "11" else 140
            boxes.append([label, x1, y1, x1 + w, y1 + h])
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "patient_id": f"P{i:03d}", "site": f"s{i % 2}",
                     "boxes": json.dumps(boxes)})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def det_config(**over) -> dict:
    raw = {
        "task": {"type": "detection", "labels": ["11", "21"]},
        "data": {"image_size": 96, "batch_size": 4, "augment": False, "val_fraction": 0.25,
                 "test_fraction": 0.25},
        "model": {"name": "fasterrcnn_mobilenet_v2_fpn", "freeze": 4,
                  "detection": {"box_head_size": 64, "box_batch_size_per_image": 64,
                                "roi_sampling_ratio": 1, "rpn_proposals": 100}},
        "train": {"epochs": 1, "lr": 0.01, "optimizer": "sgd", "progress": False,
                  "max_steps_per_epoch": 3},
        "federation": {"rounds": 2, "local_steps": 2, "min_train_clinics": 2,
                       "min_available_clinics": 2, "min_evaluate_clinics": 2},
        "split": {"clinics": 2, "scheme": "site", "test_fraction": 0.25},
        "simulation": {"max_concurrent": 1},
        "tracking": {"enabled": False},
    }
    for k, v in over.items():
        raw[k] = {**raw.get(k, {}), **v}
    return raw


@pytest.fixture
def det_manifest(tmp_path: Path) -> Path:
    return write_tiny_detection(tmp_path / "det")


@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v2_fpn", "fasterrcnn_resnet18_fpn",
                                  "retinanet_mobilenet_v2_fpn", "ssdlite_mobilenet_v3_large"])
def test_factory_builds_detectors_that_train_and_predict(name):
    cfg = config_from_dict(det_config(model={"name": name, "freeze": 1})).model
    torch.manual_seed(0)
    model = build_model(cfg, 2, 64)
    assert frozen_prefixes(model)  # model.freeze works on detector backbones
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(trainable_state_keys(model))
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5, 30, 40]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    model.train()
    losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "scores", "labels"}


def test_anchor_aspect_ratios_from_the_config():
    """Tall anchors (height/width 4) for implant fixtures; the RPN head predicts per anchor."""
    cfg = config_from_dict(det_config(model={"detection": {
        "anchor_aspect_ratios": [1.0, 2.0, 4.0]}})).model
    model = build_model(cfg, 2, 64)
    gen = model.rpn.anchor_generator
    assert all(tuple(r) == (1.0, 2.0, 4.0) for r in gen.aspect_ratios)
    cell = gen.cell_anchors[-1]  # the largest level's 3 anchors, centred on 0
    h, w = cell[:, 3] - cell[:, 1], cell[:, 2] - cell[:, 0]
    assert torch.allclose(h / w, torch.tensor([1.0, 2.0, 4.0]), rtol=0.1)
    assert model.rpn.head.cls_logits.out_channels == 3
    with pytest.raises(Exception, match="anchor_aspect_ratios"):
        config_from_dict(det_config(model={"detection": {"anchor_aspect_ratios": [0.0]}}))


def test_backbone_weights_from_a_local_file_and_frozen_bn_never_travel(shared_data):
    path = shared_data / WEIGHTS
    cfg = config_from_dict(det_config(model={"pretrained": str(path), "freeze": 0})).model
    model = build_model(cfg, 2, 64)
    state = torch.load(path, weights_only=True)
    own = model.state_dict()
    assert torch.equal(own["backbone.body.0.0.weight"], state["0.0.weight"])
    assert torch.equal(own["backbone.body.18.1.running_var"], state["18.1.running_var"])
    keys = trainable_state_keys(model)
    # FrozenBatchNorm2d buffers (fixed, never trained) are not exchanged
    assert not [k for k in keys if k.endswith(("running_mean", "running_var"))]
    assert "backbone.body.0.0.weight" in keys  # freeze 0: the convolutions do train


def test_detection_metrics_perfect_and_missed():
    t = [{"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 40, 30]]),
          "labels": torch.tensor([1, 2])}]
    perfect = [{"boxes": t[0]["boxes"], "scores": torch.tensor([0.9, 0.8]),
                "labels": t[0]["labels"]}]
    m = detection_metrics(perfect, t, ["11", "21"])
    assert m["map_50"] == pytest.approx(1.0) and m["map"] == pytest.approx(1.0)
    assert m["ap/11"] == pytest.approx(1.0) and m["ap/21"] == pytest.approx(1.0)
    half = [{"boxes": t[0]["boxes"][:1], "scores": torch.tensor([0.9]),
             "labels": torch.tensor([1])}]
    m = detection_metrics(half, t, ["11", "21"])
    assert m["ap/11"] == pytest.approx(1.0) and m["ap/21"] == pytest.approx(0.0)
    assert m["map_50"] == pytest.approx(0.5)


def test_box_sensitivity_and_specificity_per_class_on_a_hand_made_image():
    """Three true fixtures a, b, c: a found twice (a 0.9 and b 0.6 on the same box: one
    decision, a), b found but called a, c scored below 0.5 (missed), one false alarm called c."""
    A, B, C, D = [0.0, 0, 10, 20], [30, 0, 40, 20], [60, 0, 70, 20], [90, 0, 99, 20]
    t = [{"boxes": torch.tensor([A, B, C]), "labels": torch.tensor([1, 2, 3])}]
    p = [{"boxes": torch.tensor([A, A, B, C, D]),
          "scores": torch.tensor([0.9, 0.6, 0.8, 0.3, 0.7]),
          "labels": torch.tensor([1, 2, 1, 3, 3])}]
    m = box_classification(p, t, ["a", "b", "c"])
    assert m["sensitivity/a"] == 1.0 and m["sensitivity/b"] == 0.0
    assert m["sensitivity/c"] == 0.0
    # negatives of a: the b box (called a), the c box (missed), the false alarm (called c)
    assert m["specificity/a"] == pytest.approx(2 / 3)
    assert m["specificity/b"] == 1.0  # nothing was called b once the duplicate was merged
    assert m["specificity/c"] == pytest.approx(2 / 3)  # the false alarm
    assert m["box_recall"] == pytest.approx(2 / 3) and m["box_precision"] == pytest.approx(2 / 3)
    assert m["box_accuracy"] == 0.5
    perfect = [{"boxes": t[0]["boxes"], "scores": torch.tensor([0.9, 0.9, 0.9]),
                "labels": t[0]["labels"]}]
    m = detection_metrics(perfect, t, ["a", "b", "c"])  # part of every detection evaluation
    assert all(m[f"{k}/{c}"] == 1.0 for k in ("sensitivity", "specificity") for c in "abc")


def test_one_training_loop_learns_boxes(det_manifest):
    """fit() (the one loop) on a detector: the loss falls and the components are logged;
    evaluate() reports mAP."""
    from shared.data.dataset import make_loader
    from shared.data.manifest import read_manifest
    from shared.losses import make_loss

    cfg = config_from_dict(det_config(train={"epochs": 3, "max_steps_per_epoch": 3,
                                             "patience": None}))
    seed_everything(0)
    m = read_manifest(det_manifest, cfg.task)
    assert m.boxes is not None and m.targets.shape == (24, 2)
    train_dl = make_loader(m, cfg.data, train=True)
    model = build_model(cfg.model, 2, cfg.data.image_size)
    val = m.subset(np.arange(4))
    res = fit(model, train_dl, make_loader(val, cfg.data, train=False),
              make_loss(cfg.task, cfg.train), cfg.task, cfg.train, torch.device("cpu"))
    h = res.history
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert {"train_loss_classifier", "train_loss_objectness"} <= set(h[0])
    out = evaluate(model, make_loader(val, cfg.data, train=False), None, cfg.task,
                   torch.device("cpu"))
    assert {"map_50", "map", "mar_100", "ap/11", "ar/21"} <= set(out)
    assert 0.0 <= out["map_50"] <= 1.0


@pytest.fixture
def _task_identity():
    """Messages are stamped with the process's run/node identity (a Flower runtime sets it)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _context(manifest) -> Context:
    return Context(run_id=1, node_id=1, node_config={"manifest": str(manifest)},
                   state=RecordDict(), run_config={})


def test_clinic_detection_reply_carries_only_trainable_arrays(det_manifest, _task_identity):
    cfg = config_from_dict(det_config())
    model = build_global_model(cfg)
    conf = config_record(cfg, model)
    conf["server-round"] = 1
    msg = Message(RecordDict({"arrays": model_arrays(model), "config": conf}), dst_node_id=1,
                  message_type="train")
    reply = client_app(msg, _context(det_manifest))
    assert not reply.has_error(), reply.error
    (arrays,) = reply.content.array_records.values()
    assert set(arrays.keys()) == set(exchanged_keys(model))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(arrays.keys())
    shapes = expected_shapes(model)
    assert all(tuple(a.shape) == shapes[k] for k, a in arrays.items())
    (metrics,) = reply.content.metric_records.values()
    assert "train_loss_classifier" in metrics and "train_loss" in metrics
    before = model_arrays(model)
    assert any(not np.allclose(before[k].numpy(), arrays[k].numpy()) for k in arrays)


@pytest.mark.slow  # a real Flower simulation (2 clinics, 2 rounds) inside `--compare`
def test_real_detection_compare_with_a_two_round_federated_run(tmp_path):
    """`dentfed simulate --compare` on a detection task: pooled, local-only and FedAvg
    detectors on one 2-clinic split of tiny box images, scored with mAP@0.5 on each clinic's
    test set and the pooled one; its FedAvg row is a real 2-round Flower run whose replies
    carry only the trainable arrays."""
    import math

    manifest = write_tiny_detection(tmp_path / "det", n=16, size=64)
    raw = det_config(data={"image_size": 64}, federation={"rounds": 2, "local_steps": 1})
    cfg_path = tmp_path / "det.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                        str(cfg_path), "--manifest", str(manifest), "--out", str(out),
                        "--compare", "--strategies", "fedavg", "--seeds", "0"],
                       capture_output=True, text=True, timeout=540)
    assert r.returncode == 0, r.stderr[-3000:]
    long = pd.read_csv(out / "compare.csv")
    assert set(long["metric"]) == {"map_50"}
    assert set(long["method"]) == {"Pooled", "Local 0", "Local 1", "fedavg"}
    assert set(long["test_set"]) == {"clinic 0", "clinic 1", "pooled"}
    assert len(long) == 4 * 3
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in long["value"])
    md = (out / "compare.md").read_text()
    assert "map_50" in md and "| Pooled " in md and "| Local 1 " in md and "| fedavg " in md
    runs = {x["method"]: x for x in json.loads((out / "compare.json").read_text())["runs"]}
    assert runs["Local 0"]["train_images"] < runs["Pooled"]["train_images"]

    fed = out / "federated/seed_0/fedavg"
    data = json.loads((fed / "metrics.json").read_text())
    assert [h["round"] for h in data["history"]] == [0, 1, 2]
    assert "map_50" in data["final"] and data["headline"] == "map_50"
    model = build_global_model(config_from_dict(raw))
    fp32 = sum(4 * int(np.prod(s)) for s in expected_shapes(model).values())
    for h in data["history"][1:]:
        assert h["clinics_replied"] == 2 and not h["clinics_rejected"]
        assert h["bytes_received"] == 2 * fp32  # trainable arrays only
    assert data["upload_bytes_per_clinic_round"] < data["full_model_bytes"]
    assert (fed / "model_final.pt").is_file()


def test_predict_on_a_detector_writes_boxes_and_survives_a_broken_image(tmp_path,
                                                                         det_manifest):
    from dentfed.predict import run_predict
    from shared.model_file import save_model_file

    cfg = config_from_dict(det_config(model={"detection": {"box_head_size": 64,
                                                           "score_thresh": 0.0,
                                                           "detections_per_img": 5}}))
    torch.manual_seed(0)
    model = build_model(cfg.model, 2, cfg.data.image_size)
    save_model_file(tmp_path / "model.pt", model, cfg, thresholds=None)
    images = tmp_path / "in"
    images.mkdir()
    for i in (0, 1):
        (images / f"{i}.png").write_bytes((det_manifest.parent / "img" / f"{i}.png")
                                          .read_bytes())
    (images / "2.png").write_bytes(b"not a png at all")
    out = tmp_path / "pred"
    res = run_predict(tmp_path / "model.pt", images, out, batch_size=2, min_score=0.0,
                      fhir=True)
    assert res["images"] == 3 and res["failed"] == 1
    data = json.loads((out / "predictions.json").read_text())
    by_name = {p["image"]: p for p in data["predictions"]}
    assert by_name["2.png"]["status"] == "unreadable" and by_name["2.png"]["error"]
    for name in ("0.png", "1.png"):
        rec = by_name[name]
        assert rec["status"] == "ok"
        assert {Path(f).name.split(".", 1)[1] for f in rec["files"]} == \
            {"boxes.png", "chart.png", "fhir.json"}  # FDI labels: a chart too
        assert all((out / f).is_file() for f in rec["files"])
        for b in rec["boxes"]:  # original-image pixels (96 px images)
            assert b["label"] in ("11", "21") and 0 <= b["score"] <= 1
            assert all(-1 <= v <= 97 for v in b["box"])
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["image", "status", "error", "label", "score", "x1", "y1",
                                   "x2", "y2"]
    assert set(table["image"]) == {"0.png", "1.png", "2.png"}
    assert res["boxes"] == len(table.dropna(subset=["label"]))


def test_serve_shows_a_detectors_boxes_and_chart_without_storing(tmp_path, det_manifest):
    from fastapi.testclient import TestClient

    from dentfed.serve import create_app
    from shared.model_file import save_model_file

    cfg = config_from_dict(det_config(model={"detection": {"box_head_size": 64,
                                                           "score_thresh": 0.0,
                                                           "detections_per_img": 5}}))
    torch.manual_seed(0)
    save_model_file(tmp_path / "model.pt", build_model(cfg.model, 2, 96), cfg, None)
    data = (det_manifest.parent / "img" / "0.png").read_bytes()
    before = set(tmp_path.rglob("*"))
    with TestClient(create_app(tmp_path / "model.pt")) as c:
        page = c.get("/").text
        assert "saliency" not in page  # no saliency option for a detector
        r = c.post("/api/predict", files={"file": ("P001.png", data, "image/png")})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["task"] == "detection" and not res["numbered"]  # 2 of the 32 FDI numbers
        assert res["boxes_image"].startswith("data:image/png;base64,")
        assert res["chart"].startswith("data:image/png;base64,")
        assert res["fhir"]["resourceType"] == "Bundle" and "P001" not in r.text
        assert all(len(b["box"]) == 4 and b["label"] in ("11", "21") for b in res["boxes"])
        html_page = c.post("/predict", files={"file": ("x.png", data, "image/png")}).text
        assert 'id="boxes"' in html_page and 'id="chart"' in html_page
    assert set(tmp_path.rglob("*")) == before  # the upload was not written anywhere


def test_predict_and_serve_renumber_a_tooth_models_findings_consistently():
    """The wiring of shared.fdi.consistent_numbering (tested there on hand-made cases): a
    32-tooth model's duplicate 16 is renumbered before the score cut-off; a model with other
    classes keeps its labels."""
    from types import SimpleNamespace

    from dentfed.inference import finalise_findings, numbers_teeth
    from shared import fdi

    teeth = SimpleNamespace(task_type="detection", labels=list(fdi.PERMANENT))
    other = SimpleNamespace(task_type="detection", labels=["11", "21"])
    assert numbers_teeth(teeth) and not numbers_teeth(other)
    # upper right quadrant, left to right in the image: 17 16 16 (the last one is 15)
    found = [fdi.finding("17", [10, 10, 30, 60], 0.9), fdi.finding("16", [32, 10, 52, 60], 0.9),
             fdi.finding("16", [54, 10, 74, 60], 0.8), fdi.finding("46", [10, 70, 30, 120], 0.9),
             fdi.finding("11", [200, 10, 220, 60], 0.2)]
    out = finalise_findings(teeth, found, min_score=0.5)
    labels = [f["label"] for f in sorted(out, key=lambda f: f["box"][0]) if f["box"][1] < 65]
    assert labels == ["17", "16", "15"]
    assert all(f["score"] >= 0.5 for f in out)
    assert [f["label"] for f in finalise_findings(other, found, min_score=0.5)] == \
        ["17", "16", "16", "46"]


def test_bench_detection_combines_invocations_and_scores_the_criteria(tmp_path):
    """A seed's rows run in two processes and a second seed run apart make one table; each
    federated row is put against pooled and the best local model of the same seed; a row
    run twice for one seed, or other settings, is refused."""
    from simulations.bench_detection import SETTINGS, combine

    settings = {k: 1 for k in SETTINGS}

    def write(name: str, rows: dict, **changed) -> Path:
        path = tmp_path / f"{name}.json"
        seeds = sorted({s for v in rows.values() for s in v})
        path.write_text(json.dumps({"info": f"seeds {seeds}", "settings": {**settings, **changed},
                                    "rows": {r: [{"map_50": v[s], "seconds": 1.0, "seed": s}
                                                 for s in sorted(v)]
                                             for r, v in rows.items()}}))
        return path

    a = write("a", {"Pooled": {0: 0.80}, "FedAvg": {0: 0.78}})
    b = write("b", {"Local 0": {0: 0.70}, "Local 1": {0: 0.79}})
    c = write("c", {"Pooled": {1: 0.90}, "FedAvg": {1: 0.72}})
    text = combine([a, b, c])
    assert "- FedAvg mAP@0.5 / Pooled: 0.975, 0.800 (seeds [0, 1]; goal >= 0.95)" in text
    assert "- FedAvg mAP@0.5 - best local model: -0.010 (seeds [0]; goal > 0)" in text
    assert text.index("| Pooled |") < text.index("| Local 0 |") < text.index("| FedAvg |")
    with pytest.raises(SystemExit, match="FedAvg seed 0"):
        combine([a, write("d", {"FedAvg": {0: 0.5}})])
    with pytest.raises(SystemExit, match="settings"):
        combine([a, write("e", {"Local 2": {0: 0.5}}, image_size=2)])
