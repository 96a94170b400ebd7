"""`dentfed predict` and the model card: real trained models, real files, the CLI's exit codes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from dentfed.cli import main
from dentfed.inference import load_model, predict_paths
from shared.config import config_from_dict
from shared.data.dataset import make_loader
from shared.data.manifest import read_manifest
from shared.model_card import build_card, card_markdown, privacy_summary
from shared.training import predict
from tests.conftest import tiny_config, write_tiny_multilabel


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """`dentfed ...` in this process (a subprocess would pay torch's import each time)."""
    def run(*args: str) -> Result:
        capsys.readouterr()
        rc = main(list(args))
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)
    return run


def test_train_saves_a_model_card_with_counts_only(tiny_run: Path):
    card = json.loads((tiny_run / "model_card.json").read_text())
    ckpt = torch.load(tiny_run / "model.pt", weights_only=True)
    assert card["task"] == {"type": "multilabel", "labels": ["bright", "stripe"]}
    assert card["thresholds"] == pytest.approx(ckpt["thresholds"])
    assert card["architecture"]["name"] == "resnet18" and card["frozen_stages"] == 0
    data = card["data"]
    assert data["images"] == 48 and data["patients"] == 24
    assert sum(s["images"] for s in data["splits"].values()) == 48
    train = data["splits"]["train"]["images"]
    for counts in data["train_label_counts"].values():
        assert counts["positive"] + counts["negative"] + counts["unknown"] == train
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert card["metrics"]["values"]["macro_auc"] == pytest.approx(metrics["final"]["macro_auc"])
    assert card["privacy"] is None
    text = (tiny_run / "model_card.json").read_text() + (tiny_run / "model_card.md").read_text()
    assert "img/" not in text and "P00" not in text and "tmp" not in text  # no paths, no ids


def test_card_reports_epsilon_only_when_the_run_recorded_dp():
    no_dp = tiny_config().model_dump(mode="json")
    assert no_dp["privacy"] == {"dp_sgd": None, "central": None, "secagg": None}
    assert privacy_summary(no_dp, {"final": {"macro_auc": 0.9}}) is None
    assert privacy_summary({}, {}) is None
    assert privacy_summary({"privacy": {"secagg": {"num_shares": 3}}}, {}) is None  # not DP
    dp_sgd = {"privacy": {"dp_sgd": {"delta": 1e-5, "noise_multiplier": 1.1}}}
    pooled = privacy_summary(dp_sgd, {"privacy": {"epsilon": 3.2}})
    assert pooled["epsilon"] == 3.2 and pooled["delta"] == 1e-5
    assert privacy_summary(dp_sgd, {"privacy": {"epsilon": [2.0, 3.5]}})["epsilon"] == 3.5
    fed = privacy_summary(dp_sgd, {"privacy": {"epsilon_max": 4.0, "epsilon_per_clinic": {}}})
    assert fed["epsilon"] == 4.0
    central = privacy_summary({"privacy": {"central": {"delta": 1e-3}}},
                              {"central_dp": {"epsilon": 7.5}})
    assert central["epsilon"] == 7.5
    cfg = tiny_config()
    cfg.privacy = type(cfg.privacy).model_validate(dp_sgd["privacy"])
    card = build_card(cfg, kind="pooled", checkpoint="model.pt", thresholds=None,
                      data={"images": 3}, metrics={"privacy": {"epsilon": 7.5}, "final": {}},
                      evaluated_on="test")
    assert card["privacy"]["epsilon"] == 7.5
    assert "epsilon 7.5" in card_markdown(card)


def test_predict_matches_the_training_loop_and_decides_at_tuned_thresholds(tiny_run: Path):
    loaded = load_model(tiny_run)
    m = read_manifest(tiny_run.parent / "data" / "manifest.csv", loaded.cfg.task)
    expected, _, _ = predict(loaded.model, make_loader(m, loaded.cfg.data, train=False), None,
                             torch.device("cpu"), "multilabel")
    got = predict_paths(loaded, [Path(p) for p in m.paths], batch_size=7, workers=1)
    assert got.n_failed == 0 and got.precision == "fp32"
    assert np.allclose(got.probs, expected, atol=1e-5)
    thr = np.array(loaded.thresholds)
    assert thr.shape == (2,) and not np.allclose(thr, 0.5)
    assert (got.decisions == (got.probs >= thr).astype(np.int8)).all()
    # a tuned threshold is a validation image's own score: ties may flip by float rounding
    clear = np.abs(expected - thr) > 1e-4
    assert (got.decisions == (expected >= thr))[clear].all() and clear.mean() > 0.8


def test_predict_cli_folder_skips_unreadable_images(tiny_run: Path, tmp_path: Path, cli):
    images = tmp_path / "photos"
    images.mkdir()
    src = tiny_run.parent / "data" / "img"
    for i in range(5):
        (images / f"{i}.png").write_bytes((src / f"{i}.png").read_bytes())
    (images / "P0042_broken.jpg").write_bytes(b"this is not a jpeg")
    out = tmp_path / "pred"
    r = cli("predict", "--model", str(tiny_run), str(images), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert "1 of 6 images could not be read" in r.stderr
    assert "P0042" not in r.stderr + r.stdout  # the file name stays in the user's CSV only
    df = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert len(df) == 6 and (df["status"] == "ok").sum() == 5
    bad = df[df["status"] == "unreadable"].iloc[0]
    assert bad["image"] == "P0042_broken.jpg" and "unreadable or corrupt" in bad["error"]
    data = json.loads((out / "predictions.json").read_text())
    assert data["failed"] == 1 and data["images"] == 6
    assert data["model"]["thresholds"] == pytest.approx(
        torch.load(tiny_run / "model.pt", weights_only=True)["thresholds"])
    ok = [p for p in data["predictions"] if p["status"] == "ok"]
    for p in ok:
        thr = dict(zip(data["model"]["labels"], data["model"]["thresholds"], strict=True))
        assert p["predicted"] == [lab for lab, v in p["probabilities"].items() if v >= thr[lab]]
    r = cli("predict", "--model", str(tiny_run), str(images), "--out", str(out))
    assert r.returncode == 1 and "not empty" in r.stderr  # never overwrites


def test_predict_refuses_a_model_of_another_task(tiny_run: Path, tmp_path: Path, cli):
    other = tiny_config().model_dump(mode="json")
    other["task"] = {"type": "multiclass", "labels": ["filling", "none"], "label_column": "y"}
    other["train"]["loss"] = "ce"
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    img = tiny_run.parent / "data" / "img" / "0.png"
    r = cli("predict", "--model", str(tiny_run), str(img), "--out", str(tmp_path / "o"),
             "--config", str(tmp_path / "other.yaml"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "the model's task does not match" in r.stderr and "filling" in r.stderr
    manifest = tmp_path / "xrays.csv"
    pd.DataFrame({"path": [str(img)], "modality": ["radiograph"]}).to_csv(manifest, index=False)
    r = cli("predict", "--model", str(tiny_run), str(manifest), "--out", str(tmp_path / "o"))
    assert r.returncode == 1 and "trained on photos" in r.stderr and "radiograph" in r.stderr


def test_predict_card_prints_the_card(tiny_run: Path, cli):
    r = cli("predict", "--model", str(tiny_run), "--card")
    assert r.returncode == 0, r.stderr
    assert "labels: bright, stripe" in r.stdout and "thresholds: bright" in r.stdout
    assert "differential privacy: not used" in r.stdout and "train: images 30" in r.stdout


def test_predict_manifest_multiclass_vit_without_the_pretrained_file(tmp_path: Path, cli):
    """A ViT trained from a local weights file is rebuilt for inference without that file."""
    from shared.model_file import save_model_file
    from shared.models import build_model

    cfg = config_from_dict({
        "task": {"type": "multiclass", "labels": ["a", "b", "c"], "label_column": "y"},
        "data": {"image_size": 32},
        "model": {"name": "vit", "vit": {"size": "tiny", "patch_size": 8, "depth": 1}},
        "train": {"loss": "ce"}})
    weights = tmp_path / "vit_in1k.pth"
    torch.save(build_model(cfg.model, 3, 32).state_dict() | {
        "heads.head.weight": torch.zeros(1000, 192), "heads.head.bias": torch.zeros(1000)},
        weights)
    cfg.model.pretrained = str(weights)
    model = build_model(cfg.model, 3, 32)
    run = tmp_path / "run"
    run.mkdir()
    save_model_file(run / "model.pt", model, cfg, None)
    weights.unlink()
    manifest = write_tiny_multilabel(tmp_path / "data", n=4)
    out = tmp_path / "pred"
    r = cli("predict", "--model", str(run), str(manifest), "--out", str(out))
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out / "predictions.csv")
    assert len(df) == 4 and np.allclose(df[["p_a", "p_b", "p_c"]].sum(axis=1), 1, atol=1e-4)
    assert (df[["pred_a", "pred_b", "pred_c"]].sum(axis=1) == 1).all()
    with torch.inference_mode():
        x = torch.zeros(1, 3, 32, 32)
        assert torch.allclose(load_model(run).model(x), model.eval()(x), atol=1e-5)


def test_federated_run_folder_has_a_card_with_per_clinic_counts(tmp_path: Path, cli):
    """The coordinator's run folder (server/run_folder.py) from a real central evaluator and the
    clinics' recorded replies; then `predict` on its model_final.pt."""
    from server.federation import CentralEvaluator, FederationResult, RoundRecord, RoundRecorder
    from server.run_folder import write_run_folder
    from shared.fedio import build_global_model, model_arrays

    cfg = tiny_config()
    manifest = write_tiny_multilabel(tmp_path / "data", n=16)
    model = build_global_model(cfg)
    ev = CentralEvaluator(cfg, manifest, model)
    ev(0, model_arrays(model))
    ev(1, model_arrays(model))
    rec = RoundRecorder()
    rec.clinic(101), rec.clinic(202)  # node ids -> anonymous indices 0, 1
    rec.rounds[1] = RoundRecord(1, train={0: {"num-examples": 30.0, "train_loss": 0.6},
                                          1: {"num-examples": 12.0, "train_loss": 0.7}},
                                evaluate={0: {"num-examples": 6.0}, 1: {"num-examples": 3.0}},
                                sampled=2)
    res = FederationResult(cfg, ev, rec, {1: {"train_loss": 0.64}}, {}, 1.0, 1000, 1000)
    out = tmp_path / "fedrun"
    write_run_folder(res, out)
    card = json.loads((out / "model_card.json").read_text())
    assert card["kind"] == "federated" and card["checkpoint"] == "model_final.pt"
    assert card["data"]["per_clinic"] == {"0": {"train_images": 30, "validation_images": 6},
                                          "1": {"train_images": 12, "validation_images": 3}}
    assert card["data"]["server_test_images"] == 16 and card["thresholds"] is None
    assert card["federation"]["strategy"] == "fedavg"
    assert "101" not in json.dumps(card["data"])  # Flower node ids never appear
    r = cli("predict", "--model", str(out), str(manifest), "--out", str(tmp_path / "p"))
    assert r.returncode == 0, r.stderr
    data = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert data["model"]["checkpoint"] == "model_final.pt"
    assert data["model"]["thresholds"] == [0.5, 0.5]
    assert "0.5" in data["model"]["threshold_source"]


def test_bench_inference_runs_and_compares_with_the_plain_loop(tmp_path: Path, capsys,
                                                               monkeypatch):
    from simulations.bench_inference import main as bench

    monkeypatch.setenv("DENTFED_SHARED", str(tmp_path / "absent"))  # synthetic images
    assert bench(["--n", "6", "--image-size", "32", "--batch-size", "4", "--workers", "0",
                  "--repeats", "1", "--threads", "1", "--shared", str(tmp_path / "no")]) == 0
    out = capsys.readouterr().out
    assert "6 images (synthetic)" in out
    rows = [line for line in out.splitlines() if line.startswith(("plain", "dentfed"))]
    assert len(rows) == 7 and rows[1].split()[-2] == "100.0%"  # torch fp32 = itself
    assert rows[2].split()[-2] == "100.0%"  # the ONNX export decides as torch does
    assert rows[5].split()[-2] == "100.0%"  # auto: decisions of fp32
    assert rows[6].split()[-2] == "100.0%"  # auto with its remembered choice, too
    assert rows[3].count("%") == 2 and "auto used: " in out
    assert "auto remembered used: " in out


def test_auto_precision_keeps_fp32_decisions(tiny_run: Path, monkeypatch):
    """auto may use bf16 only where it cannot change a decision: borderline scores are
    recomputed in fp32. bf16 is forced on, so the comparison and re-check path run on every
    CPU (autocast works without native bf16, only slower); without it a CPU lacking native bf16
    would make the test trivially true."""
    import sys

    mod = sys.modules[predict_paths.__module__]
    monkeypatch.setattr(mod, "bf16_supported", lambda: True)
    # bf16 even where the timing says fp32 is as fast (a tiny model; emulated bf16)
    monkeypatch.setattr(mod, "choose_mode", lambda tried, exact: "bf16")
    loaded = load_model(tiny_run)
    paths = sorted((tiny_run.parent / "data" / "img").glob("*.png"))
    fp32 = predict_paths(loaded, paths, batch_size=8, workers=0, precision="fp32")
    auto = predict_paths(loaded, paths, batch_size=8, workers=0, precision="auto")
    assert (auto.decisions == fp32.decisions).all()
    check = auto.auto_check
    assert check is not None and check["used"], check  # the tiny model stays within 0.05
    assert auto.precision == "bf16 + fp32 re-check" and check["images_compared"] > 0
    assert check["mode"].startswith("bf16")
    assert check["rechecked_in_fp32"] >= 0
    assert np.abs(auto.probs - fp32.probs).max() <= check["recheck_margin"]
    bf16 = predict_paths(loaded, paths, batch_size=8, workers=0, precision="bf16")
    assert bf16.precision == "bf16" and np.abs(bf16.probs - fp32.probs).max() < 0.1


def test_predict_writes_nothing_when_interrupted(tiny_run: Path, tmp_path: Path, monkeypatch):
    """All or nothing: a failure after predictions.csv leaves no output folder at all."""
    from dentfed import predict as predict_mod

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    manifest = write_tiny_multilabel(tmp_path / "data", n=4)
    monkeypatch.setattr(predict_mod, "write_saliency", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict_mod.run_predict(tiny_run, manifest, tmp_path / "pred", workers=0,
                                saliency=True)
    assert not (tmp_path / "pred").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pred")]
