"""Losses. Multi-label losses take logits [B, L] and targets [B, L] with NaN = unknown label;
unknown entries contribute nothing (masked), so a blank in the manifest is never read as 0."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from shared.config import TaskConfig, TrainConfig


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    n = mask.sum()
    if n == 0:  # a batch with no known label: zero loss that still keeps the graph
        return (values * 0).sum()
    return (values * mask).sum() / n


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's own known labels, then over the batch: a sample's loss does not
    depend on the other samples (DP-SGD's per-sample gradients need that)."""
    m = mask.to(values.dtype)
    per = (values * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    return per.mean() if len(per) else (values * 0).sum()


class MaskedBCE(nn.Module):
    """BCE with logits; optional pos_weight per label (weighted BCE)."""

    def __init__(self, pos_weight: torch.Tensor | None = None, per_sample: bool = False):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.reduce = _per_sample_mean if per_sample else _masked_mean

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = ~torch.isnan(targets)
        t = torch.nan_to_num(targets, nan=0.0)
        pw = None if self.pos_weight is None else self.pos_weight.to(logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw, reduction="none")
        return self.reduce(loss, mask)


class MaskedFocal(nn.Module):
    """Sigmoid focal loss (torchvision.ops) over known labels."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, per_sample: bool = False):
        super().__init__()
        self.gamma, self.alpha = gamma, -1.0 if alpha is None else alpha
        self.reduce = _per_sample_mean if per_sample else _masked_mean

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = ~torch.isnan(targets)
        t = torch.nan_to_num(targets, nan=0.0)
        loss = sigmoid_focal_loss(logits, t, alpha=self.alpha, gamma=self.gamma, reduction="none")
        return self.reduce(loss, mask)


class MaskedSoftDice(nn.Module):
    """Soft multi-label dice: 1 - mean over labels of (2 sum(p t) + s) / (sum(p) + sum(t) + s),
    sums over the batch's known entries of each label (the OFC study's best loss)."""

    def __init__(self, smooth: float = 1.0):
        super().__init__()
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        mask = (~torch.isnan(targets)).to(logits.dtype)
        t = torch.nan_to_num(targets, nan=0.0) * mask
        p = torch.sigmoid(logits) * mask
        inter = (p * t).sum(dim=0)
        denom = p.sum(dim=0) + t.sum(dim=0)
        dice = (2 * inter + self.smooth) / (denom + self.smooth)
        known = mask.sum(dim=0) > 0
        if not known.any():
            return (logits * 0).sum()
        return 1 - dice[known].mean()


class DetectionLoss(nn.Module):
    """A detector computes its own losses in training mode (RPN objectness and box regression,
    box classification and regression for Faster R-CNN; focal classification and box regression
    for RetinaNet; SSD's): the objective is their sum, as torchvision's reference recipes."""

    def forward(self, losses: dict[str, torch.Tensor], targets: object = None) -> torch.Tensor:
        return sum(losses.values(), torch.zeros((), device=next(iter(losses.values())).device))


def pos_weight_from(targets: np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """negatives / positives per label over known entries of the training targets."""
    pos = np.nansum(targets == 1, axis=0).astype(np.float64)
    neg = np.nansum(targets == 0, axis=0).astype(np.float64)
    w = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(w, 1.0 / max_weight, max_weight), dtype=torch.float32)


def make_loss(task: TaskConfig, train: TrainConfig,
              train_targets: np.ndarray | None = None, per_sample: bool = False) -> nn.Module:
    """The loss the config names; weighted BCE needs the training targets for pos_weight.
    per_sample (DP-SGD): multi-label losses average each sample's known labels separately."""
    if task.type == "detection":
        return DetectionLoss()
    if task.type == "pretrain":  # the masked-image model's forward is its loss
        from shared.masked_modeling import PretrainObjective

        return PretrainObjective()
    if task.type == "multiclass":
        return nn.CrossEntropyLoss(label_smoothing=train.label_smoothing)
    if train.loss == "bce":
        return MaskedBCE(per_sample=per_sample)
    if train.loss == "weighted_bce":
        if train_targets is None:
            raise ValueError("weighted_bce needs the training targets")
        return MaskedBCE(pos_weight_from(train_targets))
    if train.loss == "focal":
        return MaskedFocal(train.focal_gamma, train.focal_alpha, per_sample=per_sample)
    if train.loss == "dice":
        return MaskedSoftDice()
    raise ValueError(f"unknown loss {train.loss}")
