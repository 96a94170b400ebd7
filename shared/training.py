"""The one training loop: every caller (pooled training, clinics, baselines) trains through the
`Trainer` driver (epochs/steps, DP-SGD wrapping) over `train_one_epoch`, and evaluates through
`predict`/`evaluate`; `fit` is pooled training with early stopping on top of it."""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from shared.config import DpSgdConfig, TaskConfig, TrainConfig
from shared.dp_sgd import (
    DpAccount,
    PrivacyBudgetSpent,
    PrivateTraining,
    check_budget,
    make_private,
    noise_for,
    sample_rate_of,
)
from shared.metrics import detection_metrics, multiclass_metrics, multilabel_metrics
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
    """`train.optimizer` (AdamW, or SGD with momentum) over the trainable parameters only
    (frozen ones get no optimizer state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr or cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr or cfg.lr, weight_decay=cfg.weight_decay,
                             amsgrad=cfg.amsgrad, betas=cfg.betas)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate's multiplier at step `step` (0-based) of `total` (optimiser steps of
    pooled training, or rounds: `shared.fedio.round_lr`): a linear warm-up over the first
    `warmup` steps (1/(warmup+1), ..., warmup/(warmup+1)), then constant or a cosine decay from
    1 (the first step after the warm-up) towards 0 (reached one step after the last)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    left = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, left) / left))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
                   ) -> torch.optim.lr_scheduler.LambdaLR | None:
    """`train.lr_schedule` and `warmup_epochs` as a per-step scheduler over `train.epochs`
    (None: a constant rate, nothing to step)."""
    if cfg.lr_schedule == "constant" and not cfg.warmup_epochs:
        return None
    total, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, warmup, cfg.lr_schedule))


def optimizer_state_arrays(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """The optimiser's per-parameter state (momentum buffers, Adam moments and step counts) as
    named arrays '<param index>.<name>', e.g. for a clinic's persistent Flower state."""
    return {k: v.detach().cpu().numpy().copy() if torch.is_tensor(v) else np.asarray(v)
            for k, v in _named_state(optimizer).items()}


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """`optimizer_state_arrays` as tensors, without copies on the CPU: the optimiser's own, so
    use them (e.g. torch.save them) before its next step."""
    return {k: v.detach().cpu() if torch.is_tensor(v) else torch.as_tensor(v)
            for k, v in _named_state(optimizer).items()}


def _named_state(optimizer: torch.optim.Optimizer) -> dict[str, object]:
    return {f"{i}.{name}": v for i, st in optimizer.state_dict()["state"].items()
            for name, v in st.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer,
                         arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Restore what `optimizer_state_arrays` (or `optimizer_state_tensors`) saved; the
    optimiser's own hyper-parameters (this round's learning rate) are kept. Tensors are taken
    as they are (the optimiser owns them afterwards), arrays are copied."""
    sd = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, a in arrays.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = (a if torch.is_tensor(a)
                                              else torch.from_numpy(np.array(a, copy=True)))
    sd["state"] = state
    optimizer.load_state_dict(sd)


class GradCorrection:
    """A fixed tensor added to each parameter's gradient before every optimiser step
    (SCAFFOLD's c - c_i), keeping the running sum of the raw (uncorrected) minibatch gradients
    so the caller can form the mean gradient along the local trajectory."""

    def __init__(self, pairs: list[tuple[nn.Parameter, torch.Tensor]]):
        self.pairs = pairs
        self.raw_sums = [torch.zeros_like(c) for _, c in pairs]
        self.steps = 0

    @torch.no_grad()
    def apply(self) -> None:
        for (p, c), acc in zip(self.pairs, self.raw_sums, strict=True):
            if p.grad is not None:
                acc.add_(p.grad)
                p.grad.add_(c)
        self.steps += 1


def is_detection_batch(y: object) -> bool:
    """A detection batch's targets are a list/tuple of {"boxes", "labels"} dicts."""
    return isinstance(y, list | tuple) and (not y or isinstance(y[0], dict))


def _to_device(x: object, y: object, device: torch.device) -> tuple[object, object]:
    if is_detection_batch(y):
        return ([im.to(device, non_blocking=True) for im in x],
                [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in y])
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def _forward_loss(model: nn.Module, loss_fn: nn.Module, x: object, y: object
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """The batch's loss and, for a detector (which takes the targets and returns its loss
    dict in training mode), each loss component."""
    if is_detection_batch(y):
        losses = model(x, y)
        return loss_fn(losses, y), {k: float(v.detach()) for k, v in losses.items()}
    return loss_fn(model(x), y), {}


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    max_steps: int | None = None,
    proximal_mu: float = 0.0,
    grad_correction: GradCorrection | None = None,
    progress: bool = False,
    desc: str = "train",
    grad_clip_norm: float | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> dict[str, float]:
    """One pass over `loader` (or `max_steps` batches). With proximal_mu > 0 the FedProx term
    mu/2 * ||w - w_global||^2 is added, w_global being the weights at the start of the call.
    `grad_correction` is applied to the gradients before each step (SCAFFOLD's c - c_i);
    `scheduler` is stepped after every optimiser step."""
    set_train_mode(model)
    anchors = None
    if proximal_mu > 0:
        anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
    total, n, steps = 0.0, 0, 0
    parts: dict[str, float] = {}
    bar = _progress(loader, progress, desc,
                    total=min(len(loader), max_steps) if max_steps else len(loader))
    for x, y in bar:
        x, y = _to_device(x, y, device)
        optimizer.zero_grad(set_to_none=True)
        loss, components = _forward_loss(model, loss_fn, x, y)
        for k, v in components.items():
            parts[k] = parts.get(k, 0.0) + v * len(x)
        objective = loss
        if anchors is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in anchors)
            objective = loss + proximal_mu / 2 * prox
        objective.backward()
        if grad_correction is not None:
            grad_correction.apply()
        if grad_clip_norm is not None:
            nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                     grad_clip_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(x)
        n += len(x)
        steps += 1
        if max_steps and steps >= max_steps:
            break
    out = {"loss": total / max(n, 1), "examples": float(n), "steps": float(steps)}
    out.update({f"loss_{k.removeprefix('loss_')}": v / max(n, 1) for k, v in parts.items()})
    if parts:
        log.debug("%s: %s", desc, ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
    return out


@torch.inference_mode()
def predict_detections(model: nn.Module, loader: DataLoader, loss_fn: nn.Module | None,
                       device: torch.device, progress: bool = False
                       ) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]],
                                  float]:
    """A detector's boxes (eval mode: boxes, scores, labels 1..K per image, on the CPU), the
    targets, and with `loss_fn` the mean loss: the training-mode loss dict on the same batches
    with BatchNorm kept in eval (detectors report losses only in training mode)."""
    preds, targets, total, n = [], [], 0.0, 0
    for x, y in _progress(loader, progress, "eval"):
        x, y = _to_device(x, y, device)
        if loss_fn is not None:
            set_train_mode(model)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
            total += float(loss_fn(model(x, y), y)) * len(x)
        model.eval()
        n += len(x)
        preds += [{k: v.cpu() for k, v in p.items()} for p in model(x)]
        targets += [{k: v.cpu() for k, v in t.items()} for t in y]
    model.eval()
    return preds, targets, total / max(n, 1)


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
    """Loss plus the task's full metric set on `loader` (a pretrain task: the masked-modelling
    loss only, masks drawn by a fixed generator)."""
    if task.type == "detection":
        preds, boxes, loss = predict_detections(model, loader, loss_fn, device, progress)
        return {"loss": loss, **detection_metrics(preds, boxes, task.labels)}
    if task.type == "pretrain":
        model.eval()
        total, n = 0.0, 0
        with torch.inference_mode():
            for x, _ in _progress(loader, progress, "eval"):
                total += float(model(x.to(device))) * len(x)
                n += len(x)
        return {"loss": total / max(n, 1)}
    probs, targets, loss = predict(model, loader, loss_fn, device, task.type, progress)
    if task.type == "multilabel":
        m = multilabel_metrics(probs, targets, task.labels, thresholds)
    else:
        m = multiclass_metrics(probs, targets.astype(int), task.labels)
    return {"loss": loss, **m}


class Trainer:
    """The one epoch/step driver, used by pooled training (`fit`) and by every clinic round:
    optimiser steps through `train_one_epoch`, wrapped by Opacus (DP-SGD) when `privacy` is
    given. `planned_steps` is what the noise is calibrated over when only target_epsilon is
    configured. Use as a context manager (Opacus' hooks are removed on exit)."""

    def __init__(self, model: nn.Module, loader: DataLoader, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, device: torch.device, *,
                 privacy: DpSgdConfig | None = None, planned_steps: int = 1,
                 account: DpAccount | None = None, progress: bool = False,
                 grad_clip_norm: float | None = None,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
        self.model, self.loss_fn, self.device, self.progress = model, loss_fn, device, progress
        self.scheduler = scheduler
        self.grad_clip_norm = None if privacy is not None else grad_clip_norm
        self.privacy = privacy
        self.private: PrivateTraining | None = None
        self.step_model, self.loader, self.optimizer = model, loader, optimizer
        if privacy is not None:
            q = sample_rate_of(loader)
            self.private = make_private(model, optimizer, loader, privacy,
                                        noise_for(privacy, q, planned_steps), account)
            self.step_model = self.private.module
            self.loader, self.optimizer = self.private.loader, self.private.optimizer

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.private is not None:
            self.private.close()
            self.private = None

    def check_budget(self, steps: int) -> None:
        """PrivacyBudgetSpent when `steps` more DP-SGD steps would pass max_epsilon (no-op
        without DP-SGD); call before training."""
        if self.private is not None and self.privacy is not None:
            check_budget(self.private.current(), self.privacy, self.private.noise_multiplier,
                         self.private.sample_rate, steps)

    def account(self) -> DpAccount | None:
        """The DP-SGD account including every step taken so far (None without DP-SGD)."""
        return self.private.current() if self.private is not None else None

    def run(self, epochs: int = 1, max_steps: int | None = None, *, proximal_mu: float = 0.0,
            grad_correction: GradCorrection | None = None,
            desc: str = "train") -> dict[str, float]:
        """`epochs` passes over the loader, or, with `max_steps`, exactly that many steps
        (as many passes as it takes). Returns mean loss, examples seen and steps taken."""
        sums: dict[str, float] = {}  # loss and (detectors) its components, times examples
        seen, steps = 0.0, 0
        passes = epochs if max_steps is None else 10**6
        for _ in range(passes):
            left = None if max_steps is None else max_steps - steps
            stats = train_one_epoch(self.step_model, self.loader, self.loss_fn, self.optimizer,
                                    self.device, max_steps=left, proximal_mu=proximal_mu,
                                    grad_correction=grad_correction, progress=self.progress,
                                    desc=desc, grad_clip_norm=self.grad_clip_norm,
                                    scheduler=self.scheduler)
            for k, v in stats.items():
                if k.startswith("loss"):
                    sums[k] = sums.get(k, 0.0) + v * stats["examples"]
            seen += stats["examples"]
            steps += int(stats["steps"])
            if max_steps is not None and (steps >= max_steps or stats["steps"] == 0):
                break
        out = {k: v / max(seen, 1) for k, v in sums.items()}
        out.setdefault("loss", 0.0)
        return {**out, "examples": seen, "steps": float(steps)}


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
    keep: Literal["best", "last"] = "best",
) -> FitResult:
    """Train for cfg.epochs with early stopping on validation loss (cfg.patience); the model ends
    with the weights of its best validation epoch. keep="last": a fixed schedule, no early
    stopping, the last epoch's weights (pretraining: MDE's validation loss is measured against
    targets that move with the teacher, so its epochs do not compare). With `privacy`, every
    step is DP-SGD (Opacus) and each epoch's row carries the epsilon spent so far; an epoch that
    would pass max_epsilon is not started."""
    model.to(device)
    result = FitResult()
    best_loss, best_state, bad = float("inf"), None, 0
    # An epoch is exactly max_steps_per_epoch steps when set, cycling a shorter loader (the
    # pooled baseline of a federation whose clinics take more steps than it has batches)
    per_epoch = cfg.max_steps_per_epoch or len(train_loader)
    optimizer = make_optimizer(model, cfg)
    with Trainer(model, train_loader, loss_fn, optimizer, device,
                 privacy=privacy, planned_steps=cfg.epochs * per_epoch,
                 progress=cfg.progress, grad_clip_norm=cfg.grad_clip_norm,
                 scheduler=make_scheduler(optimizer, cfg, per_epoch)) as trainer:
        if privacy is not None:
            result.epsilon = 0.0
        for epoch in range(1, cfg.epochs + 1):
            try:
                trainer.check_budget(per_epoch)
            except PrivacyBudgetSpent as e:
                log.warning("epoch %d not started: %s", epoch, e)
                result.stopped_early, result.stop_reason = True, str(e)
                break
            tr = trainer.run(1, cfg.max_steps_per_epoch, desc=f"epoch {epoch}/{cfg.epochs}")
            val = evaluate(model, val_loader, loss_fn, task, device)
            row = {"epoch": float(epoch), "train_loss": tr["loss"],
                   **{f"train_{k}": v for k, v in tr.items() if k.startswith("loss_")},
                   **{f"val_{k}": v for k, v in val.items()}}
            account = trainer.account()
            if account is not None and privacy is not None:
                result.epsilon = row["epsilon"] = account.epsilon(privacy.delta)
            result.history.append(row)
            if on_epoch:
                on_epoch(row)
            if keep == "last":
                result.best_epoch = epoch
            elif val["loss"] < best_loss - 1e-6:
                best_loss, bad, result.best_epoch = val["loss"], 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if cfg.patience and bad >= cfg.patience:
                    result.stopped_early = True
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
