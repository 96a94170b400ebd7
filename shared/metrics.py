"""Task metrics from scikit-learn, as a flat {name: float} dict (NaN = undefined).

Multi-label: per label `f1/<label>`, `precision/<label>`, `recall/<label>`, `auc/<label>`,
`ap/<label>` at threshold 0.5, the same with `_tuned` at per-label thresholds tuned on
validation, and `macro_*` means over the labels where the metric is defined. Unknown (NaN)
targets are masked. A label with no known positive in the split is undefined (NaN), not 0.
Multi-class: accuracy, balanced accuracy, macro-F1, one-vs-rest ROC-AUC, per-class
sensitivity, specificity and accuracy. Detection: COCO mAP/mAR (torchmetrics) and, at one
operating point, per-class sensitivity and specificity of the boxes (`box_classification`).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

NAN = float("nan")


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else NAN


def tune_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per-label threshold that maximises F1 on (validation) data; 0.5 where undefined."""
    out = []
    for j in range(probs.shape[1]):
        known = ~np.isnan(targets[:, j])
        y, p = targets[known, j], probs[known, j]
        if y.sum() == 0 or y.sum() == len(y):
            out.append(0.5)
            continue
        prec, rec, thr = precision_recall_curve(y, p)
        f1 = 2 * prec[:-1] * rec[:-1] / np.maximum(prec[:-1] + rec[:-1], 1e-12)
        out.append(float(thr[int(np.argmax(f1))]))
    return out


def _binary_metrics(y: np.ndarray, p: np.ndarray, thr: float) -> dict[str, float]:
    pred = (p >= thr).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "f1": float(f1_score(y, pred, zero_division=0)),
            "precision": float(precision_score(y, pred, zero_division=0)),
            "recall": float(recall_score(y, pred, zero_division=0)),
        }


def multilabel_metrics(probs: np.ndarray, targets: np.ndarray, labels: list[str],
                       thresholds: list[float] | None = None) -> dict[str, float]:
    """Per-label and macro metrics; targets may hold NaN for unknown labels."""
    out: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    for j, name in enumerate(labels):
        known = ~np.isnan(targets[:, j])
        y, p = targets[known, j].astype(int), probs[known, j]
        has_pos, has_neg = y.sum() > 0, (y == 0).sum() > 0
        vals: dict[str, float] = {}
        if has_pos:
            vals.update(_binary_metrics(y, p, 0.5))
            vals["ap"] = float(average_precision_score(y, p))
            if thresholds is not None:
                tuned = _binary_metrics(y, p, thresholds[j])
                vals.update({f"{k}_tuned": v for k, v in tuned.items()})
        vals["auc"] = float(roc_auc_score(y, p)) if has_pos and has_neg else NAN
        for key in ("f1", "precision", "recall", "ap", "auc"):
            vals.setdefault(key, NAN)
        if thresholds is not None:
            for key in ("f1_tuned", "precision_tuned", "recall_tuned"):
                vals.setdefault(key, NAN)
        for key, v in vals.items():
            out[f"{key}/{name}"] = v
            per.setdefault(key, []).append(v)
    for key, vs in per.items():
        out[f"macro_{key}"] = _nanmean(vs)
    return out


def multiclass_metrics(probs: np.ndarray, targets: np.ndarray,
                       classes: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1, OvR ROC-AUC and per-class sens/spec/accuracy."""
    pred = probs.argmax(axis=1)
    k = len(classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "accuracy": float(accuracy_score(targets, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(targets, pred)),
            "macro_f1": float(f1_score(targets, pred, labels=range(k), average="macro",
                                       zero_division=0)),
        }
    cm = confusion_matrix(targets, pred, labels=list(range(k)))
    n = cm.sum()
    aucs = []
    for c, name in enumerate(classes):
        tp = cm[c, c]
        fn = cm[c].sum() - tp
        fp = cm[:, c].sum() - tp
        tn = n - tp - fn - fp
        out[f"sensitivity/{name}"] = float(tp / (tp + fn)) if tp + fn else NAN
        out[f"specificity/{name}"] = float(tn / (tn + fp)) if tn + fp else NAN
        out[f"accuracy/{name}"] = float((tp + tn) / n) if n else NAN
        y = (targets == c).astype(int)
        auc = float(roc_auc_score(y, probs[:, c])) if 0 < y.sum() < len(y) else NAN
        out[f"auc/{name}"] = auc
        aucs.append(auc)
    out["macro_auc"] = _nanmean(aucs)
    return out


def detection_metrics(preds: list[dict[str, object]], targets: list[dict[str, object]],
                      labels: list[str]) -> dict[str, float]:
    """COCO-style box metrics from torchmetrics' MeanAveragePrecision (pycocotools backend):
    `map_50` (mAP at IoU 0.5, the headline), `map` (mAP@0.5:0.95), `map_75`, `mar_100`, and per
    label `ap/<label>` (AP@0.5:0.95) and `ar/<label>` (AR@100). `preds`: per image boxes [N, 4]
    xyxy, scores, labels 1..K; `targets`: boxes and labels. NaN where undefined (no box of that
    label in the targets)."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", class_metrics=True, backend="pycocotools")
    metric.update([{k: torch.as_tensor(v) for k, v in p.items()} for p in preds],
                  [{k: torch.as_tensor(v) for k, v in t.items()} for t in targets])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = metric.compute()

    def val(t: torch.Tensor) -> float:
        v = float(t)
        return NAN if v < 0 else v  # pycocotools' -1: undefined

    out = {k: val(res[k]) for k in ("map_50", "map", "map_75", "mar_1", "mar_10", "mar_100")}
    classes = [int(c) for c in torch.atleast_1d(res["classes"]).tolist()]
    ap = torch.atleast_1d(res["map_per_class"]).tolist()
    ar = torch.atleast_1d(res["mar_100_per_class"]).tolist()
    per = {c: (a, r) for c, a, r in zip(classes, ap, ar, strict=True)}
    for k, name in enumerate(labels, start=1):
        a, r = per.get(k, (-1.0, -1.0))
        out[f"ap/{name}"] = NAN if a < 0 else float(a)
        out[f"ar/{name}"] = NAN if r < 0 else float(r)
    out.update(box_classification(preds, targets, labels))
    return out


def _one_box_per_object(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices kept by class-agnostic NMS (torchvision's): a detector may put two boxes of
    different classes on one object; the best-scored one is its decision."""
    import torch
    from torchvision.ops import nms

    keep = nms(torch.as_tensor(boxes, dtype=torch.float32),
               torch.as_tensor(scores, dtype=torch.float32), iou)
    return keep.numpy().astype(int)


def box_classification(preds: list[dict[str, object]], targets: list[dict[str, object]],
                       labels: list[str], *, iou: float = 0.5,
                       score_threshold: float = 0.5) -> dict[str, float]:
    """Per-class sensitivity and specificity of a detector at one operating point, as the
    implant papers report them (fixture found and its system named).

    Per image, detections scoring >= `score_threshold` are reduced to one per object
    (class-agnostic NMS at `iou`) and matched one-to-one to the true boxes at IoU >= `iou`
    (Hungarian). Every true box is then an object with a true class and a called class (the
    matched detection's label, or none when missed), and every unmatched detection an object
    of true class 'none' called its label (a false alarm). For class c:
    `sensitivity/c` = true c boxes called c / true c boxes; `specificity/c` = objects not of
    class c (other classes' boxes and false alarms) not called c / such objects. Also
    `box_recall` (true boxes found, any class), `box_precision` (kept detections that match
    a true box) and `box_accuracy` (found boxes called by their class)."""
    from shared.fdi import match_teeth

    pairs: list[tuple[int, int]] = []  # (true, called) class indices 1..k; 0 = none
    for p, t in zip(preds, targets, strict=True):
        pb = np.asarray(_np(p["boxes"]), dtype=float).reshape(-1, 4)
        ps, pl = np.asarray(_np(p["scores"]), dtype=float), np.asarray(_np(p["labels"]), int)
        tb = np.asarray(_np(t["boxes"]), dtype=float).reshape(-1, 4)
        tl = np.asarray(_np(t["labels"]), dtype=int)
        ok = ps >= score_threshold
        pb, ps, pl = pb[ok], ps[ok], pl[ok]
        if len(pb):
            keep = _one_box_per_object(pb, ps, iou)
            pb, pl = pb[keep], pl[keep]
        matched = match_teeth(pb, tb, iou) if len(pb) and len(tb) else []
        called = {ti: int(pl[pi]) for pi, ti in matched}
        pairs += [(int(c), called.get(j, 0)) for j, c in enumerate(tl)]
        hit = {pi for pi, _ in matched}
        pairs += [(0, int(pl[i])) for i in range(len(pb)) if i not in hit]
    arr = np.asarray(pairs, dtype=int).reshape(-1, 2)
    true, called = arr[:, 0], arr[:, 1]
    out: dict[str, float] = {}
    for c, name in enumerate(labels, start=1):
        pos, neg = true == c, true != c
        out[f"sensitivity/{name}"] = float((called[pos] == c).mean()) if pos.any() else NAN
        out[f"specificity/{name}"] = float((called[neg] != c).mean()) if neg.any() else NAN
    real, found = true > 0, called > 0
    out["box_recall"] = float(found[real].mean()) if real.any() else NAN
    out["box_precision"] = float(real[found].mean()) if found.any() else NAN
    both = real & found
    out["box_accuracy"] = float((true[both] == called[both]).mean()) if both.any() else NAN
    return out


def _np(x: object) -> np.ndarray:
    detach = getattr(x, "detach", None)
    return detach().cpu().numpy() if detach is not None else np.asarray(x)


def headline(task_type: str) -> str:
    """The metric a run is summarised (and models are compared) by."""
    if task_type == "detection":
        return "map_50"
    if task_type == "pretrain":
        return "loss"  # the masked-modelling loss: lower is better (see higher_is_better)
    return "macro_auc" if task_type == "multilabel" else "balanced_accuracy"


def higher_is_better(key: str) -> bool:
    return key != "loss"
