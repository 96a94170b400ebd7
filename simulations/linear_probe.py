"""Linear probe of a ViT encoder: frozen features, logistic regression, patient-grouped k-fold.

Fine-tuning a small ViT on a few hundred labelled images moves by 5-25 points between seeds
(docs/pretraining.md), more than any difference between encoders. A linear probe measures what
the encoder alone brings, with little noise: every image's features are computed once by the
frozen encoder, then a logistic regression per label (multi-label) or one multinomial one
(multi-class) is fitted and scored over k patient-grouped folds of the whole labelled set.
Two readings per encoder: the class token (what the classification ViT's head sees) and the
mean of the patch tokens (MAE's fine-tuning pools this way); both after the encoder's final
LayerNorm. A CNN's pooled features (`cnn_features`) give a reference: the ImageNet MobileNetV2
shows what a good encoder scores on the same folds. Used by simulations/bench_pretrain.py; a
benchmark tool, not part of the product.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.vision_transformer import VisionTransformer

from shared.masked_modeling import encode
from shared.metrics import multiclass_metrics, multilabel_metrics

READINGS = ("class token", "mean of patches")


@torch.no_grad()
def encoder_features(vit: VisionTransformer, loader: DataLoader, device: torch.device
                     ) -> dict[str, np.ndarray]:
    """{reading: [N, D]} for every image of the (unshuffled) loader, encoder frozen."""
    vit = vit.to(device).eval()
    cls, mean = [], []
    for x, _ in loader:
        h, _ = encode(vit, x.to(device))
        cls.append(h[:, 0].float().cpu())
        mean.append(h[:, 1:].mean(1).float().cpu())
    return {"class token": torch.cat(cls).numpy(), "mean of patches": torch.cat(mean).numpy()}


@torch.no_grad()
def cnn_features(features: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    """[N, C]: a CNN's feature extractor (e.g. MobileNetV2's `features`), frozen, global
    average pooled: the reference encoder of the pretraining benchmark."""
    features = features.to(device).eval()
    out = [features(x.to(device)).mean((2, 3)).float().cpu() for x, _ in loader]
    return torch.cat(out).numpy()


def probe_score(features: np.ndarray, targets: np.ndarray, groups: np.ndarray,
                task_type: str, folds: int = 5, c: float = 0.1) -> tuple[float, float]:
    """(mean, sd) over `folds` patient-grouped folds: macro-AUC over the labels for a
    multi-label task (NaN targets = unknown, left out of that label), balanced accuracy for a
    multi-class one. Features are standardised on each fold's training part; `c` is the
    inverse L2 strength of the logistic regressions."""
    scores = []
    for train, test in GroupKFold(folds).split(features, groups=groups):
        scale = StandardScaler().fit(features[train])
        x_tr, x_te = scale.transform(features[train]), scale.transform(features[test])
        if task_type == "multiclass":
            k = int(targets.max()) + 1
            clf = LogisticRegression(C=c, max_iter=2000).fit(x_tr, targets[train])
            probs = np.zeros((len(test), k))
            probs[:, clf.classes_] = clf.predict_proba(x_te)
            scores.append(multiclass_metrics(probs, targets[test],
                                             [str(i) for i in range(k)])["balanced_accuracy"])
            continue
        # the project's metric (shared/metrics.py); a label with one class in this fold's
        # training part cannot be fitted and is left out, as one with one class in its test part
        probs = np.full((len(test), targets.shape[1]), 0.5)
        y_te = targets[test].copy()
        for j in range(targets.shape[1]):
            known = ~np.isnan(targets[train, j])
            y_tr = targets[train][known, j]
            if len(np.unique(y_tr)) < 2:
                y_te[:, j] = np.nan
                continue
            clf = LogisticRegression(C=c, max_iter=2000).fit(x_tr[known], y_tr)
            probs[:, j] = clf.predict_proba(x_te)[:, 1]
        auc = multilabel_metrics(probs, y_te, [str(j) for j in range(targets.shape[1])])
        if not np.isnan(auc["macro_auc"]):
            scores.append(auc["macro_auc"])
    a = np.asarray(scores, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0
