"""Real (short) training through the one loop and the `dentfed train` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from shared.data.dataset import make_loader
from shared.data.manifest import read_manifest
from shared.errors import ConfigError
from shared.losses import make_loss
from shared.models import build_model, resolve_device
from shared.training import evaluate, make_optimizer, seed_everything, train_one_epoch
from tests.conftest import tiny_config


def test_training_lowers_the_loss(tiny_manifest):
    cfg = tiny_config()
    seed_everything(0)
    m = read_manifest(tiny_manifest, cfg.task)
    dl = make_loader(m, cfg.data, train=True)
    model = build_model(cfg.model, 2, cfg.data.image_size)
    loss_fn = make_loss(cfg.task, cfg.train, m.targets)
    device = resolve_device("cpu")
    before = evaluate(model, make_loader(m, cfg.data, train=False), loss_fn, cfg.task, device)
    opt = make_optimizer(model, cfg.train)
    for _ in range(6):
        stats = train_one_epoch(model, dl, loss_fn, opt, device)
    after = evaluate(model, make_loader(m, cfg.data, train=False), loss_fn, cfg.task, device)
    assert stats["examples"] == 48 and stats["steps"] == 3
    assert after["loss"] < 0.7 * before["loss"], (before["loss"], after["loss"])
    assert after["macro_auc"] > 0.9


def test_fedprox_term_pulls_towards_start(tiny_manifest):
    cfg = tiny_config()
    m = read_manifest(tiny_manifest, cfg.task)
    moved = {}
    for mu in (0.0, 10.0):
        seed_everything(0)
        model = build_model(cfg.model, 2, cfg.data.image_size)
        start = [p.detach().clone() for p in model.parameters()]
        opt = make_optimizer(model, cfg.train)
        train_one_epoch(model, make_loader(m, cfg.data, train=True), make_loss(cfg.task,
                        cfg.train), opt, torch.device("cpu"), proximal_mu=mu)
        moved[mu] = sum(float((p.detach() - s).norm()) for p, s in zip(model.parameters(), start,
                                                               strict=True))
    assert moved[10.0] < moved[0.0]


@pytest.mark.slow  # CLI subprocess, a full pooled training
def test_train_cli_writes_run_folder(tiny_manifest, tmp_path):
    cfg = tiny_config(epochs=2).model_dump(mode="json")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "train", "--config", str(cfg_path),
                        "--manifest", str(tiny_manifest), "--out", str(out), "--cv", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "2-fold patient-grouped CV" in r.stdout and "±" in r.stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "learning_curve.png",
                                                      "metrics.json", "model.pt",
                                                      "model_card.json", "model_card.md",
                                                      "report.md"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["final"]["macro_auc"] <= 1
    assert set(metrics["final_sd"]) == set(metrics["final"])
    assert len(metrics["folds"]) == 2 and len(metrics["history"]) == 2
    ckpt = torch.load(out / "model.pt", weights_only=False)
    assert ckpt["labels"] == ["bright", "stripe"] and len(ckpt["thresholds"]) == 2
    # never overwrite an existing run
    again = subprocess.run([sys.executable, "-m", "dentfed.cli", "train", "--config",
                            str(cfg_path), "--manifest", str(tiny_manifest), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "exists and is not empty" in again.stderr
    assert not list(tmp_path.glob(".run.partial-*"))


def test_grad_clip_norm_bounds_each_step():
    """train.grad_clip_norm: with plain SGD a clipped step moves the weights by at most
    lr x clip, whatever the loss scale; unclipped it moves by the full gradient."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(8, 4) * 100, torch.randn(8, 1) * 100
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    moved = {}
    for clip in (None, 1.0):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_one_epoch(model, loader, torch.nn.MSELoss(), opt, torch.device("cpu"),
                        grad_clip_norm=clip)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        moved[clip] = float((after - before).norm())
    assert moved[1.0] <= 0.1 * 1.0 + 1e-6
    assert moved[None] > 100 * moved[1.0]


def test_lr_factor_warms_up_linearly_then_decays_by_cosine():
    from shared.training import lr_factor

    got = [lr_factor(s, total=8, warmup=4, schedule="cosine") for s in range(8)]
    assert got[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert got[4] == 1.0 and got[6] == pytest.approx(0.5)
    assert all(a > b for a, b in zip(got[4:-1], got[5:], strict=True))
    assert 0 < got[-1] < 0.2
    constant = [lr_factor(s, 8, 2, "constant") for s in range(8)]
    assert constant == pytest.approx([1 / 3, 2 / 3] + [1.0] * 6)


def _lrs_seen_by_fit(**train) -> tuple[list[float], list[tuple[float, float]]]:
    """Every optimiser step's learning rate and betas in a real `fit` (2 epochs of 4 steps)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    from torch.utils.data import DataLoader, TensorDataset

    from shared.training import fit

    cfg = tiny_config(epochs=2, patience=None, **train)
    torch.manual_seed(0)
    x, y = torch.randn(32, 4), (torch.rand(32, 2) > 0.5).float()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    seen: list[float] = []
    betas: list[tuple[float, float]] = []

    def hook(opt, args, kwargs):
        seen.append(opt.param_groups[0]["lr"])
        betas.append(tuple(opt.param_groups[0]["betas"]))

    handle = register_optimizer_step_pre_hook(hook)
    try:
        fit(torch.nn.Linear(4, 2), loader, loader, make_loss(cfg.task, cfg.train), cfg.task,
            cfg.train, torch.device("cpu"), keep="last")
    finally:
        handle.remove()
    return seen, betas


def test_fit_follows_train_lr_schedule_and_betas():
    """train.warmup_epochs + lr_schedule cosine: fit's 8 steps warm up over the first epoch's
    4 and then decay; the default is the constant rate; train.betas reach AdamW."""
    lrs, betas = _lrs_seen_by_fit(lr=0.01, warmup_epochs=1, lr_schedule="cosine",
                                  betas=[0.9, 0.95])
    assert lrs[:4] == pytest.approx([0.002, 0.004, 0.006, 0.008])
    assert lrs[4] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs[4:-1], lrs[5:], strict=True))
    assert len(lrs) == 8 and 0 < lrs[-1] < 0.003
    assert set(betas) == {(0.9, 0.95)}
    lrs, betas = _lrs_seen_by_fit(lr=0.01)
    assert lrs == [0.01] * 8 and set(betas) == {(0.9, 0.999)}


def test_fit_schedule_spans_epochs_longer_than_the_loader():
    """max_steps_per_epoch above the loader's 4 batches: each epoch takes 6 steps (cycling the
    loader) and the cosine decay is planned over those 12 steps, not over 8 (which left the
    last 4 steps at a learning rate of 0)."""
    lrs, _ = _lrs_seen_by_fit(lr=0.01, lr_schedule="cosine", max_steps_per_epoch=6)
    assert len(lrs) == 12 and lrs[0] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    assert lrs[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 11 / 12)))


def test_train_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="warmup_epochs"):
        tiny_config(epochs=3, warmup_epochs=3)
    with pytest.raises(ConfigError, match="betas"):
        tiny_config(betas=[0.9, 1.0])
