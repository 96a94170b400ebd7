"""Patient-grouped splits: a patient's images always land in exactly one split or fold."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from shared.data.manifest import Manifest
from shared.errors import ManifestError

Split = dict[str, np.ndarray]


def strata(m: Manifest, idx: np.ndarray) -> np.ndarray:
    """A class per row for stratification: the class (multiclass), or the rarest positive label
    of the row (multilabel, and detection by its per-label presence; -1 for none) so rare
    labels reach every split."""
    if m.task.type in ("multiclass", "pretrain"):  # pretrain: one stratum
        return m.targets[idx]
    t = np.nan_to_num(m.targets[idx], nan=0.0)
    prevalence = t.sum(axis=0)
    order = np.argsort(prevalence)
    out = np.full(len(idx), -1)
    for j in order[::-1]:
        out[t[:, j] == 1] = j
    return out


def hold_out(m: Manifest, idx: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """Split idx into (rest, held) with about `fraction` of the patients held, grouped."""
    groups = m.patient_ids[idx]
    n_groups = len(set(groups))
    if n_groups < 2:
        raise ManifestError(f"{m.source}: only {n_groups} patient(s); need at least 2 to split")
    k = max(2, round(1 / fraction))
    y = strata(m, idx)
    if n_groups >= k and np.bincount(np.unique(y, return_inverse=True)[1]).max() >= k:
        skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        with warnings.catch_warnings():  # rare strata: best effort, grouping still exact
            warnings.simplefilter("ignore", UserWarning)
            rest, held = next(skf.split(np.zeros(len(idx)), y, groups))
    else:  # too few patients per stratum to stratify: grouped random split
        gss = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        rest, held = next(gss.split(np.zeros(len(idx)), groups=groups))
    return idx[rest], idx[held]


def split_patients(m: Manifest, val_fraction: float, test_fraction: float, seed: int) -> Split:
    """Train/val/test row indices. A manifest `split` column is honoured; a missing val split is
    carved out of train by patient."""
    all_idx = np.arange(len(m))
    if m.splits is not None:
        parts = {s: all_idx[m.splits == s] for s in ("train", "val", "test")}
        if len(parts["train"]) == 0:
            raise ManifestError(f"{m.source}: the split column has no 'train' rows")
        if len(parts["val"]) == 0:
            parts["train"], parts["val"] = hold_out(m, parts["train"], val_fraction, seed)
        return parts
    rest, test = hold_out(m, all_idx, test_fraction, seed)
    train, val = hold_out(m, rest, val_fraction / (1 - test_fraction), seed + 1)
    return {"train": train, "val": val, "test": test}


def kfold_patients(m: Manifest, k: int, val_fraction: float, seed: int) -> list[Split]:
    """Patient-grouped, stratified K-fold: each fold's test set is one fold; val comes from the
    remaining patients."""
    groups = m.patient_ids
    if len(set(groups)) < k:
        raise ManifestError(f"{m.source}: {len(set(groups))} patients cannot make {k} folds")
    all_idx = np.arange(len(m))
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    folds = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fold_idx = list(skf.split(all_idx, strata(m, all_idx), groups))
    for f, (rest, test) in enumerate(fold_idx):
        train, val = hold_out(m, all_idx[rest], val_fraction, seed + 1 + f)
        folds.append({"train": train, "val": val, "test": all_idx[test]})
    return folds
