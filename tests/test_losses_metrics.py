from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from shared.config import config_from_dict
from shared.losses import MaskedBCE, MaskedFocal, MaskedSoftDice, make_loss, pos_weight_from
from shared.metrics import multiclass_metrics, multilabel_metrics, tune_thresholds

NAN = float("nan")


@pytest.mark.parametrize("loss_fn", [MaskedBCE(), MaskedBCE(torch.tensor([3.0, 0.5])),
                                     MaskedFocal(), MaskedSoftDice()],
                         ids=["bce", "weighted_bce", "focal", "dice"])
def test_masked_losses_ignore_blank_labels(loss_fn):
    targets = torch.tensor([[1.0, NAN], [0.0, 1.0], [NAN, 0.0]])
    logits = torch.tensor([[0.3, 2.0], [-1.0, 0.5], [4.0, -0.2]], requires_grad=True)
    loss = loss_fn(logits, targets)
    assert torch.isfinite(loss)
    loss.backward()
    unknown = torch.isnan(targets)
    assert (logits.grad[unknown] == 0).all()
    assert (logits.grad[~unknown] != 0).all()
    # a different value at an unknown position changes nothing
    other = logits.detach().clone()
    other[unknown] = -9.0
    assert torch.allclose(loss_fn(other, targets), loss.detach())
    # and the blank is not read as 0: filling it with 0 gives another loss
    assert not torch.allclose(loss_fn(logits.detach(), torch.nan_to_num(targets, 0.0)),
                              loss.detach())


def test_masked_bce_matches_hand_value():
    t = torch.tensor([[1.0, NAN]])
    x = torch.tensor([[0.0, 5.0]])
    assert math.isclose(float(MaskedBCE()(x, t)), math.log(2), rel_tol=1e-6)


def test_pos_weight_from_training_frequencies():
    t = np.array([[1, 0], [0, 0], [0, NAN], [0, 1]], dtype=np.float32)
    w = pos_weight_from(t)
    assert w.tolist() == pytest.approx([3.0, 2.0])
    cfg = config_from_dict({"task": {"type": "multilabel", "labels": ["a", "b"]},
                            "train": {"loss": "weighted_bce"}})
    loss = make_loss(cfg.task, cfg.train, t)
    assert loss.pos_weight.tolist() == pytest.approx([3.0, 2.0])


def test_multilabel_metrics_hand_checked():
    # label a: probs .9 .8 .3 .1 for y 1 0 1 0 -> at 0.5: TP1 FP1 FN1 -> P=R=F1=0.5
    # AUC: pairs (pos,neg): (.9>.8)(.9>.1)(.3<.8)(.3>.1) = 3/4
    # label b: the one positive row is unknown -> no known positive -> undefined, not 0
    probs = np.array([[.9, .2], [.8, .7], [.3, .1], [.1, .4]])
    targets = np.array([[1, NAN], [0, 0], [1, 0], [0, 0]])
    m = multilabel_metrics(probs, targets, ["a", "b"], thresholds=[0.25, 0.5])
    assert m["precision/a"] == pytest.approx(0.5)
    assert m["recall/a"] == pytest.approx(0.5)
    assert m["f1/a"] == pytest.approx(0.5)
    assert m["auc/a"] == pytest.approx(0.75)
    assert m["ap/a"] == pytest.approx((1 + 2 / 3) / 2)
    # threshold .25: predicted .9 .8 .3 -> TP2 FP1 -> P=2/3 R=1 F1=.8
    assert m["f1_tuned/a"] == pytest.approx(0.8)
    for k in ("auc/b", "f1/b", "precision/b", "recall/b", "ap/b"):
        assert math.isnan(m[k]), k
    assert m["macro_auc"] == pytest.approx(0.75)  # mean over defined labels only


def test_tuned_threshold_maximises_f1():
    probs = np.array([[.9], [.8], [.3], [.1]])
    targets = np.array([[1.0], [0.0], [1.0], [0.0]])
    (thr,) = tune_thresholds(probs, targets)
    assert thr == pytest.approx(0.3)
    assert tune_thresholds(probs, np.zeros_like(targets)) == [0.5]


def test_multiclass_metrics_hand_checked():
    # y:    0 0 1 1 2 2 ; pred: 0 1 1 1 2 0
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    m = multiclass_metrics(probs, y, ["x", "y", "z"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["sensitivity/x"] == pytest.approx(0.5)
    # class x: TP1 FN1 FP1 TN3 -> spec 3/4, acc 4/6
    assert m["specificity/x"] == pytest.approx(0.75)
    assert m["accuracy/x"] == pytest.approx(4 / 6)
    assert m["specificity/y"] == pytest.approx(3 / 4)
    assert m["sensitivity/y"] == pytest.approx(1.0)
    # a class absent from the split is undefined
    m2 = multiclass_metrics(probs[:4], y[:4], ["x", "y", "z"])
    assert math.isnan(m2["sensitivity/z"]) and math.isnan(m2["auc/z"])
