"""`dentfed export`: the ONNX model decides as the PyTorch one, stale exports are ignored, and
`predict --precision auto` with the int8 export keeps fp32's decisions."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from dentfed.cli import main
from dentfed.inference import AUTO_VERIFY_IMAGES, auto_memory_path, load_model, predict_paths

pytest.importorskip("onnxruntime")


@pytest.fixture
def run_copy(tiny_run: Path, tmp_path: Path) -> Path:
    """A copy of the shared tiny run (the export writes beside the model file)."""
    dst = tmp_path / "run"
    dst.mkdir()
    for name in ("model.pt", "model_card.json"):
        shutil.copy(tiny_run / name, dst / name)
    return dst


def test_onnx_export_decides_as_torch(run_copy: Path, tiny_run: Path, capsys):
    images = tiny_run.parent / "data" / "img"
    paths = sorted(images.glob("*.png"))
    torch_pred = predict_paths(load_model(run_copy), paths, batch_size=8, workers=0)
    assert main(["export", str(run_copy), "--calibrate", str(images)]) == 0
    assert "fp32: " in capsys.readouterr().out
    assert (run_copy / "model.onnx").is_file() and (run_copy / "model.int8.onnx").is_file()
    loaded = load_model(run_copy)
    assert set(loaded.onnx) == {"fp32", "int8"}
    onnx_pred = predict_paths(loaded, paths, batch_size=8, workers=1)
    assert onnx_pred.backend == "onnx" and torch_pred.backend == "torch"
    assert np.abs(onnx_pred.probs - torch_pred.probs).max() < 1e-4
    thr = np.asarray(loaded.decision_thresholds())
    clear = (np.abs(torch_pred.probs - thr) > 1e-4).all(axis=1)  # ties may flip by rounding
    assert (onnx_pred.decisions == torch_pred.decisions)[clear].all() and clear.mean() > 0.8
    int8 = predict_paths(loaded, paths, batch_size=8, workers=0, precision="int8")
    assert int8.precision == "int8" and 0 < np.abs(int8.probs - torch_pred.probs).max() < 0.2


def test_auto_with_int8_keeps_fp32_decisions(run_copy: Path, tiny_run: Path, monkeypatch):
    """int8 is forced on (VNNI or not), so the gate and the fp32 re-check run on every CPU."""
    from dentfed import onnx_export

    images = tiny_run.parent / "data" / "img"
    paths = sorted(images.glob("*.png"))
    assert main(["export", str(run_copy), "--calibrate", str(images)]) == 0
    monkeypatch.setattr(onnx_export, "vnni_supported", lambda: True)
    mod = sys.modules[predict_paths.__module__]
    monkeypatch.setattr(mod, "bf16_supported", lambda: False)
    loaded = load_model(run_copy)
    fp32 = predict_paths(loaded, paths, batch_size=8, workers=0, precision="fp32")
    auto = predict_paths(loaded, paths, batch_size=8, workers=1, precision="auto")
    assert (auto.decisions == fp32.decisions).all()
    assert set(auto.auto_check["tried"]) == {"int8"}
    assert not auto.auto_check.get("reused")
    monkeypatch.setattr(mod, "choose_mode", lambda tried, exact: "int8")  # whatever the timing
    auto_memory_path(loaded).unlink()  # the first run's remembered choice: compare again
    auto = predict_paths(loaded, paths, batch_size=8, workers=1, precision="auto")
    check = auto.auto_check
    assert auto.precision == "int8 + fp32 re-check" and check["mode"].startswith("int8")
    assert np.abs(auto.probs - fp32.probs).max() <= check["recheck_margin"]
    assert (auto.decisions == fp32.decisions).all()
    # The next run reuses the choice after verifying it on a few images: no comparison.
    monkeypatch.setattr(mod, "choose_mode", lambda tried, exact: pytest.fail("compared again"))
    again = predict_paths(loaded, paths, batch_size=8, workers=1, precision="auto")
    assert again.auto_check["reused"] and again.precision == "int8 + fp32 re-check"
    assert again.auto_check["images_compared"] == AUTO_VERIFY_IMAGES
    assert (again.decisions == fp32.decisions).all()
    # ... unless the model file changed (its exports then do not match and are not loaded).
    memory = json.loads(auto_memory_path(loaded).read_text())
    memory["key"]["model_sha256"] = ["0" * 64]
    auto_memory_path(loaded).write_text(json.dumps(memory))
    monkeypatch.setattr(mod, "choose_mode", lambda tried, exact: "int8")
    fresh = predict_paths(loaded, paths, batch_size=8, workers=1, precision="auto")
    assert not fresh.auto_check.get("reused") and set(fresh.auto_check["tried"]) == {"int8"}


def test_stale_export_is_not_used(run_copy: Path):
    """An export of an older checkpoint is ignored (the model file's sha256 differs)."""
    import torch

    assert main(["export", str(run_copy)]) == 0
    assert set(load_model(run_copy).onnx) == {"fp32"}
    ckpt = torch.load(run_copy / "model.pt", weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("fc.weight"))
    ckpt["state_dict"][key] += 1.0  # a retrained model in the same folder
    torch.save(ckpt, run_copy / "model.pt")
    assert load_model(run_copy).onnx == {}
