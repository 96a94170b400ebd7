"""Split one labelled dataset into N virtual clinics, by patient (never splitting a patient).

Schemes: `site` (one clinic per site, or sites grouped), `iid`, `dirichlet` (label skew: each
stratum's patients spread over clinics with Dirichlet(alpha) proportions), `quantity` (clinic
sizes ~ Dirichlet(alpha), labels IID) and `pathological` (each clinic sees only
`classes_per_clinic` strata). Within each clinic, patients are split train/val/test; the union
of clinic test sets is the server's (pooled) test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from shared.atomic_files import atomic_file, write_text_atomic  # noqa: E402
from shared.config import Config  # noqa: E402
from shared.data.manifest import Manifest  # noqa: E402
from shared.data.splits import split_patients, strata  # noqa: E402
from shared.errors import ConfigError, ManifestError  # noqa: E402


@dataclass
class ClinicSplit:
    """Row indices into the source manifest, per clinic and split."""

    clinics: list[dict[str, np.ndarray]]

    @property
    def n(self) -> int:
        return len(self.clinics)


def patient_strata(m: Manifest, raw: pd.DataFrame, by: str | None) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Unique patients and one stratum label per patient (column `by`, else the class or the
    rarest positive label of the patient's first image)."""
    patients, first = np.unique(m.patient_ids.astype(str), return_index=True)
    if by is not None:
        if by not in raw.columns:
            raise ConfigError(f"split.by column '{by}' is not in the manifest")
        values = raw[by].astype(str).to_numpy()[first]
    else:
        values = strata(m, np.arange(len(m)))[first].astype(str)
    return patients, values


def _assign(scheme: str, n: int, patients: np.ndarray, strata: np.ndarray, sites: np.ndarray,
            alpha: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """Clinic index per patient."""
    p = len(patients)
    if scheme == "iid":
        order = rng.permutation(p)
        out = np.empty(p, dtype=int)
        out[order] = np.arange(p) % n
        return out
    if scheme == "site":
        uniq, counts = np.unique(sites, return_counts=True)
        if len(uniq) < n:
            raise ConfigError(f"scheme 'site' needs at least {n} sites; the manifest has "
                              f"{len(uniq)} ({', '.join(uniq)})")
        load = np.zeros(n)
        clinic_of_site = {}
        for s in uniq[np.argsort(-counts, kind="stable")]:  # biggest site to emptiest clinic
            c = int(np.argmin(load))
            clinic_of_site[s] = c
            load[c] += counts[uniq == s][0]
        return np.array([clinic_of_site[s] for s in sites])
    if scheme == "quantity":
        for _ in range(100):
            share = rng.dirichlet(np.full(n, alpha))
            counts = np.floor(share * p).astype(int)
            counts[np.argmax(share)] += p - counts.sum()
            if counts.min() >= 3:
                break
        else:
            raise ConfigError(f"quantity skew with alpha={alpha} keeps leaving a clinic with "
                              "fewer than 3 patients (train, val, test); raise split.alpha")
        order = rng.permutation(p)
        return np.repeat(np.arange(n), counts)[np.argsort(order)]
    classes = np.unique(strata)
    if scheme == "pathological":
        if k * n < len(classes):
            raise ConfigError(f"pathological split: {n} clinics x {k} classes cannot cover "
                              f"{len(classes)} strata; raise split.classes_per_clinic")
        owners = {c: [] for c in classes}
        shuffled = rng.permutation(classes)
        for i in range(n * k):
            owners[shuffled[i % len(classes)]].append(i // k)
        out = np.empty(p, dtype=int)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(strata == c))
            own = sorted(set(owners[c]))
            out[idx] = np.array(own)[np.arange(len(idx)) % len(own)]
        return out
    if scheme == "dirichlet":
        for _ in range(200):
            out = np.empty(p, dtype=int)
            for c in classes:
                idx = rng.permutation(np.flatnonzero(strata == c))
                share = rng.dirichlet(np.full(n, alpha))
                cuts = (np.cumsum(share) * len(idx)).astype(int)[:-1]
                for clinic, part in enumerate(np.split(idx, cuts)):
                    out[part] = clinic
            if np.bincount(out, minlength=n).min() >= 3:
                return out
        raise ConfigError(f"dirichlet split with alpha={alpha} keeps leaving a clinic with "
                          "fewer than 3 patients (train, val, test); raise split.alpha or use "
                          "fewer clinics")
    raise ConfigError(f"unknown split scheme {scheme}")


def split_clinics(m: Manifest, raw: pd.DataFrame, cfg: Config) -> ClinicSplit:
    """Deterministic for split.seed: per-clinic train/val/test row indices."""
    s = cfg.split
    rng = np.random.default_rng(s.seed)
    patients, strata = patient_strata(m, raw, s.by)
    if len(patients) < 3 * s.clinics:
        raise ManifestError(f"{m.source}: {len(patients)} patients are too few for "
                            f"{s.clinics} clinics (need at least 3 per clinic)")
    _, first = np.unique(m.patient_ids.astype(str), return_index=True)
    clinic_of = _assign(s.scheme, s.clinics, patients, strata, m.sites[first].astype(str),
                        s.alpha, s.classes_per_clinic, rng)
    lookup = dict(zip(patients, clinic_of, strict=True))
    row_clinic = np.array([lookup[str(pid)] for pid in m.patient_ids])
    clinics = []
    for c in range(s.clinics):
        rows = np.flatnonzero(row_clinic == c)
        sub = m.subset(rows)
        sub.splits = None  # a source split column is re-made per clinic
        parts = split_patients(sub, cfg.data.val_fraction, s.test_fraction, s.seed + 1 + c)
        clinics.append({k: rows[v] for k, v in parts.items()})
    return ClinicSplit(clinics)


def _label_counts(m: Manifest, rows: np.ndarray) -> np.ndarray:
    if m.task.type == "pretrain":
        return np.zeros(0, dtype=int)
    if m.task.type == "multiclass":
        return np.bincount(m.targets[rows], minlength=len(m.task.labels))
    return np.nansum(m.targets[rows] == 1, axis=0)


def summary_table(m: Manifest, split: ClinicSplit) -> pd.DataFrame:
    rows = {}
    for c, parts in enumerate(split.clinics):
        allr = np.concatenate(list(parts.values()))
        row = {"patients": len(set(m.patient_ids[allr])),
               **{f"{k} images": len(v) for k, v in parts.items()}}
        row.update(dict(zip(m.task.labels, _label_counts(m, allr).tolist(), strict=True)))
        rows[f"clinic {c}"] = row
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.loc["total"] = df.sum()
    return df


def plot_distribution(m: Manifest, split: ClinicSplit, path: Path) -> None:
    counts = np.stack([_label_counts(m, np.concatenate(list(p.values())))
                       for p in split.clinics]).astype(float)
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * split.n + 3), 4))
    bottom = np.zeros(split.n)
    for j, name in enumerate(m.task.labels):
        ax.bar(np.arange(split.n), counts[:, j], bottom=bottom, label=name)
        bottom += counts[:, j]
    ax.set(xticks=np.arange(split.n), xticklabels=[f"clinic {c}" for c in range(split.n)],
           ylabel="images (positives per label)" if m.task.type == "multilabel" else "images",
           title="Label distribution per clinic")
    if len(m.task.labels):  # a pretrain task has no labels to stack
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_split(m: Manifest, raw: pd.DataFrame, split: ClinicSplit, out: Path) -> pd.DataFrame:
    """clinic_<k>/manifest.csv (train+val rows, split column), clinic_<k>/test.csv,
    server_test.csv (all clinic test rows), summary.md and label_distribution.png.
    Paths are written absolute so the manifests work from anywhere."""
    out.mkdir(parents=True, exist_ok=True)
    df = raw.copy()
    df["path"] = m.paths
    tests = []
    for c, parts in enumerate(split.clinics):
        d = out / f"clinic_{c}"
        local = pd.concat([df.iloc[parts["train"]].assign(split="train"),
                           df.iloc[parts["val"]].assign(split="val")])
        write_text_atomic(d / "manifest.csv", local.to_csv(index=False))
        test = df.iloc[parts["test"]].drop(columns=["split"], errors="ignore")
        write_text_atomic(d / "test.csv", test.to_csv(index=False))
        tests.append(test)
    write_text_atomic(out / "server_test.csv", pd.concat(tests).to_csv(index=False))
    table = summary_table(m, split)
    write_text_atomic(out / "summary.md", table.to_markdown() + "\n")
    plot_distribution(m, split, out / "label_distribution.png")
    return table


def read_raw(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def skew(m: Manifest, split: ClinicSplit) -> float:
    """Mean total-variation distance between each clinic's label distribution and the
    overall one (0 = identical)."""
    counts = np.stack([_label_counts(m, np.concatenate(list(p.values())))
                       for p in split.clinics]).astype(float)
    total = counts.sum(axis=0) / counts.sum()
    dists = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    return float(np.mean(0.5 * np.abs(dists - total).sum(axis=1)))
