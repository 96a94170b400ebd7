"""The pretraining benchmark's linear probe (simulations/linear_probe.py): its class-token
reading is what the classification ViT's head sees, and its score finds a signal and not noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.config import config_from_dict
from shared.models import build_model
from simulations.linear_probe import cnn_features, encoder_features, probe_score


def test_class_token_reading_is_what_the_head_sees():
    cfg = config_from_dict({"task": {"type": "multilabel", "labels": ["a", "b"]},
                            "data": {"image_size": 32},
                            "model": {"name": "vit",
                                      "vit": {"size": "tiny", "patch_size": 8, "depth": 2}}})
    torch.manual_seed(0)
    vit = build_model(cfg.model, 2, 32).eval()
    x = torch.randn(6, 3, 32, 32)
    feats = encoder_features(vit, DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4),
                             torch.device("cpu"))
    head = vit.heads
    vit.heads = nn.Identity()
    with torch.no_grad():
        seen = vit(x)
    vit.heads = head
    assert feats["class token"].shape == (6, vit.hidden_dim)
    np.testing.assert_allclose(feats["class token"], seen.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(feats["mean of patches"], feats["class token"])


def _data(seed: int, signal: bool, multiclass: bool):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(60), 3)
    n = len(patients)
    if multiclass:
        y = rng.integers(0, 3, n)
        onehot = np.eye(3)[y]
    else:
        y = rng.integers(0, 2, (n, 2)).astype(float)
        onehot = y
    x = rng.normal(size=(n, 16))
    if signal:
        x[:, : onehot.shape[1]] += 3 * onehot
    return x, y, patients


@pytest.mark.parametrize("multiclass", [False, True])
def test_probe_score_finds_a_signal_and_not_noise(multiclass):
    chance = 1 / 3 if multiclass else 0.5
    x, y, groups = _data(0, True, multiclass)
    mean, sd = probe_score(x, y, groups, "multiclass" if multiclass else "multilabel")
    assert mean > 0.9 and sd < 0.1
    x, y, groups = _data(1, False, multiclass)
    mean, _ = probe_score(x, y, groups, "multiclass" if multiclass else "multilabel")
    assert abs(mean - chance) < 0.15


def test_probe_leaves_unknown_labels_out():
    x, y, groups = _data(2, True, False)
    y[::4, 1] = np.nan
    mean, _ = probe_score(x, y, groups, "multilabel")
    assert mean > 0.9


def test_cnn_reference_features_are_the_global_average_pool():
    torch.manual_seed(0)
    features = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU())
    x = torch.randn(7, 3, 16, 16)
    got = cnn_features(features, DataLoader(TensorDataset(x, torch.zeros(7)), batch_size=3),
                       torch.device("cpu"))
    with torch.no_grad():
        want = features(x).mean((2, 3)).numpy()
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got, want, rtol=1e-6)
