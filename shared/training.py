"""The one training loop: every caller (pooled training, clinics, baselines) trains and evaluates
through `train_one_epoch`, `predict`/`evaluate` and `fit`."""

from __future__ import annotations

import copy
import logging
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from shared.config import DpSgdConfig, TaskConfig, TrainConfig
from shared.dp_sgd import (
    PrivacyBudgetSpent,
    check_budget,
    make_private,
    noise_for,
    sample_rate_of,
)
from shared.metrics import multiclass_metrics, multilabel_metrics
from shared.models import probabilities, set_train_mode

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress(iterable, enabled: bool, desc: str, total: int | None = None):
    """A tqdm bar on a terminal; silent in logs, CI and pipes."""
    return tqdm(iterable, desc=desc, total=total, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None
                   ) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (frozen ones get no optimizer state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=cfg.weight_decay,
                             amsgrad=cfg.amsgrad)


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    max_steps: int | None = None,
    proximal_mu: float = 0.0,
    progress: bool = False,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over `loader` (or `max_steps` batches). With proximal_mu > 0 the FedProx term
    mu/2 * ||w - w_global||^2 is added, w_global being the weights at the start of the call."""
    set_train_mode(model)
    anchors = None
    if proximal_mu > 0:
        anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
    total, n, steps = 0.0, 0, 0
    bar = _progress(loader, progress, desc,
                    total=min(len(loader), max_steps) if max_steps else len(loader))
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        objective = loss
        if anchors is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in anchors)
            objective = loss + proximal_mu / 2 * prox
        objective.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        n += len(x)
        steps += 1
        if max_steps and steps >= max_steps:
            break
    return {"loss": total / max(n, 1), "examples": float(n), "steps": float(steps)}


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, loss_fn: nn.Module | None,
            device: torch.device, task_type: str, progress: bool = False
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Probabilities (sigmoid or softmax), targets and mean loss over `loader`."""
    model.eval()
    probs, targets, total, n = [], [], 0.0, 0
    for x, y in _progress(loader, progress, "eval"):
        x, y = x.to(device), y.to(device)
        logits = model(x)
        if loss_fn is not None:
            total += float(loss_fn(logits, y)) * len(x)
        n += len(x)
        p = probabilities(logits, task_type)
        probs.append(p.float().cpu().numpy())
        targets.append(y.cpu().numpy())
    return np.concatenate(probs), np.concatenate(targets), total / max(n, 1)


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module | None, task: TaskConfig,
             device: torch.device, thresholds: list[float] | None = None,
             progress: bool = False) -> dict[str, float]:
    """Loss plus the task's full metric set on `loader`."""
    probs, targets, loss = predict(model, loader, loss_fn, device, task.type, progress)
    if task.type == "multilabel":
        m = multilabel_metrics(probs, targets, task.labels, thresholds)
    else:
        m = multiclass_metrics(probs, targets.astype(int), task.labels)
    return {"loss": loss, **m}


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    epsilon: float | None = None  # DP-SGD: privacy loss over every epoch trained (at delta)
    stop_reason: str | None = None


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: nn.Module,
    task: TaskConfig,
    cfg: TrainConfig,
    device: torch.device,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    privacy: DpSgdConfig | None = None,
) -> FitResult:
    """Train for cfg.epochs with early stopping on validation loss (cfg.patience); the model ends
    with the weights of its best validation epoch. With `privacy`, every step is DP-SGD (Opacus)
    and each epoch's row carries the epsilon spent so far; an epoch that would pass max_epsilon
    is not started."""
    model.to(device)
    opt = make_optimizer(model, cfg)
    result = FitResult()
    best_loss, best_state, bad = float("inf"), None, 0
    private = None
    step_model, step_loader, step_opt = model, train_loader, opt
    if privacy is not None:
        q = sample_rate_of(train_loader)
        per_epoch = min(cfg.max_steps_per_epoch or len(train_loader), len(train_loader))
        private = make_private(model, opt, train_loader, privacy,
                               noise_for(privacy, q, cfg.epochs * per_epoch))
        step_model, step_loader, step_opt = private.module, private.loader, private.optimizer
        result.epsilon = 0.0
    try:
        for epoch in range(1, cfg.epochs + 1):
            if private is not None:
                try:
                    check_budget(private.current(), privacy, private.noise_multiplier,
                                 private.sample_rate, per_epoch)
                except PrivacyBudgetSpent as e:
                    log.warning("epoch %d not started: %s", epoch, e)
                    result.stopped_early, result.stop_reason = True, str(e)
                    break
            tr = train_one_epoch(step_model, step_loader, loss_fn, step_opt, device,
                                 max_steps=cfg.max_steps_per_epoch, progress=cfg.progress,
                                 desc=f"epoch {epoch}/{cfg.epochs}")
            val = evaluate(model, val_loader, loss_fn, task, device)
            row = {"epoch": float(epoch), "train_loss": tr["loss"],
                   **{f"val_{k}": v for k, v in val.items()}}
            if private is not None:
                result.epsilon = row["epsilon"] = private.current().epsilon(privacy.delta)
            result.history.append(row)
            if on_epoch:
                on_epoch(row)
            if val["loss"] < best_loss - 1e-6:
                best_loss, bad, result.best_epoch = val["loss"], 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if cfg.patience and bad >= cfg.patience:
                    result.stopped_early = True
                    break
    finally:
        if private is not None:
            private.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
