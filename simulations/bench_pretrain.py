"""Self-supervised pretraining benchmark (issue 14): a script, not a test.

Pretraining set: every image of ../shared UFBA-425 panoramics, ../shared tooth crops and the
demo radiographs (labels ignored; `task.type: pretrain`). Encoders:

* random init (no pretraining);
* pooled MAE / pooled MDE: `dentfed train`'s `run_training` on the pretraining set;
* federated MAE / federated MDE: the real ServerApp loop (`server.federation.run_federation`)
  and the real ClientApp over an in-process grid (simulations/bench_quality.py), 4 non-IID
  clinics (Dirichlet over the image source), 1 local epoch per round, rounds = pooled epochs;
* MDE at mask ratio 0.75 (pooled and federated) against the default 0.25;
* federated MDE EMA teacher: federated MDE whose teacher is the coordinator's moving average
  of the global encoders (`pretrain.federated_teacher_momentum`, `--teacher-momentum`);
* federated MDE kept AdamW: federated MDE whose clinics keep their AdamW moments between
  rounds (`federation.keep_optimizer_state`; otherwise each round starts a fresh AdamW).
* federated MDE equal steps: federated MDE whose clinics train with batches of
  --batch-size / --clinics (`federation.batch_size`, 8 by default), so that the averaged
  federation takes as many optimiser steps per pass over the data as pooled training does
  (4 clinics at the pooled batch take a quarter of them: FedAvg of k clinics' steps at batch B
  is, to first order, one step at batch k x B).

Each encoder initialises the same ViT (`model.pretrained: <run folder>`) and is fine-tuned with
the same budget, pooled (union of the clinics' train rows, early stopping on their val rows)
and federated (FedAvg, 4 non-IID clinics, rounds = pooled epochs), on (a) UFBA-425's five
labels (test macro-AUC) and (b) the demo implant systems (test balanced accuracy, per-class
sensitivity/specificity). Every row of one seed shares the clinic splits and the test set (the
union of the clinics' test rows). Seeds vary the splits and the initialisations.

Each encoder is also probed linearly (simulations/linear_probe.py: frozen features, logistic
regression over patient-grouped folds of each whole labelled set), beside the ImageNet
MobileNetV2 of ../shared/weights as a reference; `--finetune-modes none` runs only the probes.

    python -m simulations.bench_pretrain --shared ../shared --seeds 0,1,2 --out runs/bench-pretrain
    python -m simulations.bench_pretrain --quick --seeds 0      # CPU smoke: minutes

The fine-tuning recipe is the same for every row; `--finetune-set` overrides it (e.g. the
product's UFBA-425 federated recipe of configs/ufba-panoramic.yaml). `--finetune-repeats N`
(default 4) fine-tunes every encoder N times (other clinic splits, heads and data orders) and
scores it by the mean, since one fine-tuning's noise is as large as the differences between
encoders.
`--keep` keeps the run folders, and `--encoders-from` fine-tunes the encoders such an
invocation pretrained, without pretraining them again (its pretraining settings must match):

    python -m simulations.bench_pretrain ... --encoders "pooled MDE" --finetune-modes none \
        --keep --out runs/P
    python -m simulations.bench_pretrain ... --encoders "random init,pooled MDE" \
        --encoders-from runs/P --finetune-set federation.keep_optimizer_state=true

`train.device: auto` uses CUDA when present (`--device cpu|cuda` forces one). Prints and writes
(`--out`) pretrain.md (the tables) and pretrain.json (every figure, per seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dental_datasets import tooth_crops
from dental_datasets import ufba425_panoramic as ufba
from server.federation import run_federation
from server.run_folder import write_run_folder
from shared.atomic_files import write_text_atomic
from shared.config import Config, TaskConfig, config_from_dict, load_config, with_overrides
from shared.data.dataset import make_loader
from shared.data.manifest import read_manifest
from shared.models import ENCODER_FILE, build_model, resolve_device
from simulations.bench_quality import InProcessGrid, _override
from simulations.linear_probe import READINGS, cnn_features, encoder_features, probe_score
from simulations.pooled_training import run_training, train_fold
from simulations.simulate import prepare_split
from simulations.task_manifest import resolve_manifest

log = logging.getLogger("dentfed.bench")
REPO = Path(__file__).resolve().parents[1]

# name -> (method, mask ratio, federated, variant); None = random init. Variants of the
# federation: "teacher" (the coordinator's EMA teacher), "adamw" (kept AdamW moments),
# "steps" (clinic batch = batch / clinics).
ENCODERS: dict[str, tuple[str, float, bool, str] | None] = {
    "random init": None,
    "pooled MAE": ("mae", 0.25, False, ""),
    "pooled MDE": ("mde", 0.25, False, ""),
    "federated MAE": ("mae", 0.25, True, ""),
    "federated MDE": ("mde", 0.25, True, ""),
    "pooled MDE mask 0.75": ("mde", 0.75, False, ""),
    "federated MDE mask 0.75": ("mde", 0.75, True, ""),
    # MAE at its own paper's ratio: is MAE's deficit against MDE (at 0.25) its mask ratio?
    "pooled MAE mask 0.75": ("mae", 0.75, False, ""),
    "federated MDE EMA teacher": ("mde", 0.25, True, "teacher"),
    "federated MDE kept AdamW": ("mde", 0.25, True, "adamw"),
    "federated MDE equal steps": ("mde", 0.25, True, "steps"),
}
# The rows issue 14's criteria are checked on: federated MDE at the default mask ratio.
FEDERATED_MDE = [n for n, spec in ENCODERS.items() if spec and spec[:3] == ("mde", 0.25, True)]
# The method questions, each at equal federation: MDE against MAE, and MDE's default
# mask ratio (0.25) against the 0.75 usual for MAE; then MAE at 0.75 against MDE and MAE at 0.25.
METHOD_PAIRS = [("pooled MDE", "pooled MAE"), ("federated MDE", "federated MAE"),
                ("pooled MDE", "pooled MDE mask 0.75"),
                ("federated MDE", "federated MDE mask 0.75"),
                ("pooled MDE", "pooled MAE mask 0.75"), ("pooled MAE", "pooled MAE mask 0.75")]
TASKS = ("ufba", "implants")
METRIC = {"ufba": "macro_auc", "implants": "balanced_accuracy"}


def _common(args: argparse.Namespace, seed: int) -> dict:
    return {
        "data": {"image_size": args.image_size, "modality": "radiograph",
                 "batch_size": args.batch_size},
        "train": {"lr": args.lr, "weight_decay": 0.05, "seed": seed, "device": args.device,
                  "progress": False, "patience": None},
        "tracking": {"enabled": False},
    }


def _vit(args: argparse.Namespace) -> dict:
    return {"name": "vit", "vit": {"size": args.vit, "patch_size": args.patch,
                                   **({"depth": args.depth} if args.depth else {})}}


def _split(clinics: int, seed: int, by: str | None = None) -> dict:
    return {"clinics": clinics, "scheme": "dirichlet", "alpha": 0.5, "seed": seed,
            "test_fraction": 0.2, **({"by": by} if by else {})}


def _federation(rounds: int, clinics: int) -> dict:
    return {"rounds": rounds, "local_epochs": 1, "min_train_clinics": clinics,
            "min_available_clinics": clinics, "min_evaluate_clinics": 0,
            "fraction_evaluate": 0.0}


def demo_radiographs() -> tuple[Path, Config]:
    """The demo implant radiographs (generated into the repo's data/ on first use) and their
    config, wherever the script is started from."""
    cfg = load_config(REPO / "configs" / "demo-radiographs.yaml")
    cfg = with_overrides(cfg, {"data.manifest": str(REPO / str(cfg.data.manifest))})
    return resolve_manifest(cfg, None), cfg


PRETRAINING_SOURCES = ("ufba425", "tooth_crops", "demo_radiographs")


def pretraining_manifest(shared: Path, work: Path, limit: int | None, seed: int,
                         only: tuple[str, ...] = PRETRAINING_SOURCES) -> Path:
    """One unlabelled manifest: UFBA-425 panoramics, tooth crops and demo radiographs (or the
    `only` ones), with `source` (also the `site`) naming where each image comes from."""
    build = {
        "ufba425": lambda: ufba.build_manifest(work / "ufba.csv", shared),
        "tooth_crops": lambda: tooth_crops.build_manifest(work / "crops.csv", shared),
        "demo_radiographs": lambda: demo_radiographs()[0],
    }
    sources = {name: build[name]() for name in only}
    rng = np.random.default_rng(seed)
    frames = []
    for name, path in sources.items():
        m = read_manifest(path, TaskConfig(type="pretrain"), default_modality="radiograph")
        idx = np.arange(len(m))
        if limit is not None and len(m) > limit:
            idx = np.sort(rng.choice(len(m), limit, replace=False))
        frames.append(pd.DataFrame({
            "path": [m.paths[i] for i in idx],
            "patient_id": [f"{name}:{m.patient_ids[i]}" for i in idx],
            "site": name, "source": name, "modality": "radiograph"}))
    out = work / "pretrain.csv"
    write_text_atomic(out, pd.concat(frames).to_csv(index=False))
    return out


def finetune_manifest(task: str, shared: Path, work: Path, limit: int | None, seed: int
                      ) -> tuple[Path, dict]:
    """(manifest, task section) of a fine-tuning task."""
    if task == "ufba":
        path = ufba.build_manifest(work / "ufba-labelled.csv", shared)
        spec = {"type": "multilabel", "labels": list(ufba.LABELS)}
    else:
        path, cfg = demo_radiographs()
        spec = cfg.task.model_dump(mode="json")
    if limit is not None:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        if len(df) > limit:
            df = df.sample(n=limit, random_state=seed)
            root = Path(path).parent
            df["path"] = [str(p if Path(p).is_absolute() else (root / p).resolve())
                          for p in df["path"]]
            path = work / f"{task}-subset.csv"
            write_text_atomic(path, df.to_csv(index=False))
    return Path(path), spec


def pretrain_config(spec: tuple[str, float, bool, str], args: argparse.Namespace,
                    seed: int) -> dict:
    """The raw config of one pretraining row (`ENCODERS` spec): a row's variant changes one
    setting of its federation or of its pretraining, nothing else."""
    method, ratio, federated, variant = spec
    raw = {"task": {"type": "pretrain"}, **_common(args, seed), "model": _vit(args),
           "pretrain": {"method": method, "mask_ratio": ratio,
                        "decoder_dim": args.decoder_dim, "decoder_depth": args.decoder_depth}}
    raw["train"].update(epochs=args.pretrain_epochs, lr=args.pretrain_lr,
                        betas=args.pretrain_betas, lr_schedule=args.pretrain_schedule,
                        warmup_epochs=args.pretrain_warmup)
    raw["pretrain"]["norm_pix_loss"] = args.norm_pix_loss
    if variant == "teacher":
        raw["pretrain"]["federated_teacher_momentum"] = args.teacher_momentum
    if federated:
        raw["split"] = _split(args.clinics, seed, by="source")
        raw["federation"] = {**_federation(args.pretrain_epochs, args.clinics),
                             "lr_schedule": args.pretrain_schedule,
                             "warmup_rounds": args.pretrain_warmup,
                             **({"keep_optimizer_state": True} if variant == "adamw" else {}),
                             **({"batch_size": max(1, args.batch_size // args.clinics)}
                                if variant == "steps" else {})}
    return raw


def pretrain(name: str, spec: tuple[str, float, bool, str], manifest: Path,
             args: argparse.Namespace, seed: int, work: Path) -> tuple[Path, list[float]]:
    """One pretraining run; returns its run folder (encoder.pt inside) and its loss curve."""
    out = work / f"pre-{name.replace(' ', '-')}-s{seed}"
    raw = pretrain_config(spec, args, seed)
    if not spec[2]:
        res = run_training(config_from_dict(raw, source=name), manifest, out)
        return out, [h["val_loss"] for h in res["history"]]
    cfg = config_from_dict(raw, source=name)
    split_dir = work / f"split-pretrain-s{seed}"
    if not split_dir.is_dir():
        prepare_split(cfg, manifest, split_dir)
    res = run_federation(InProcessGrid(split_dir, args.clinics), cfg,
                         split_dir / "server_test.csv")
    write_run_folder(res, out)
    # rounds 1..last, as the pooled curve's epochs 1..last (round 0 is the untrained model)
    return out, [res.evaluator.history[r]["loss"] for r in sorted(res.evaluator.history) if r]


# Settings an encoder's pretraining depends on: --encoders-from reuses an encoder only when
# they agree (its fine-tuning settings may differ).
PRETRAIN_SETTING = ("vit", "image_size", "patch", "depth", "decoder_dim", "decoder_depth",
                    "batch_size", "clinics", "pretrain_epochs", "pretrain_lr",
                    "pretrain_schedule", "pretrain_warmup", "pretrain_betas",
                    "teacher_momentum", "norm_pix_loss", "limit", "pretrain_sources", "quick")


def kept_encoder(name: str, seed: int, dirs: list[Path], args: argparse.Namespace
                 ) -> tuple[Path, list[float]]:
    """The encoder file and pretraining loss curve of row `name`, seed `seed`, from the first
    of `dirs` (earlier invocations' --out, run with --keep) that pretrained it. Other
    pretraining settings, or a folder without the encoder file, is an error."""
    mine = {k: str(v) for k, v in vars(args).items()}
    for d in dirs:
        meta = d / "pretrain.json"
        if not meta.is_file():
            raise SystemExit(f"error: --encoders-from {d}: no pretrain.json there")
        data = json.loads(meta.read_text())
        row = data["results"].get(name, {}).get("seeds", {}).get(str(seed))
        if row is None or "pretrain_loss" not in row:
            continue
        if diff := [k for k in PRETRAIN_SETTING if data["args"].get(k) != mine[k]]:
            raise SystemExit(f"error: --encoders-from {d} pretrained {name!r} with other "
                             f"settings: {', '.join(diff)}")
        encoder = d / f"runs-seed{seed}" / f"pre-{name.replace(' ', '-')}-s{seed}" / ENCODER_FILE
        if not encoder.is_file():
            raise SystemExit(f"error: {encoder} not found (was {d} run with --keep?)")
        return encoder, row["pretrain_loss"]
    raise SystemExit(f"error: no {name!r} encoder of seed {seed} in --encoders-from "
                     + ", ".join(map(str, dirs)))


def finetune_seeds(seed: int, repeats: int) -> list[int]:
    """The fine-tuning seeds of an encoder seed: the seed itself, then seed + 1000, + 2000, ...
    Each varies the fine-tuning's clinic split, head and data order, not the encoder; their
    mean is the encoder's figure, with less of the fine-tuning's own noise."""
    return [seed + 1000 * k for k in range(repeats)]


def finetune(task: str, encoder: Path | None, manifest: Path, spec: dict,
             args: argparse.Namespace, seed: int, work: Path, federated: bool) -> dict:
    """Fine-tune one encoder (None: random init); the test metrics of the final model."""
    raw = {"task": spec, **_common(args, seed),
           "model": {**_vit(args), "dropout": 0.1,
                     **({"pretrained": str(encoder)} if encoder is not None else {})},
           "split": _split(args.clinics, seed),
           "federation": _federation(args.finetune_epochs, args.clinics)}
    raw["train"]["epochs"] = args.finetune_epochs
    raw["train"]["loss"] = "weighted_bce" if spec["type"] == "multilabel" else "ce"
    cfg = config_from_dict(raw, source=f"fine-tune {task}")
    if args.finetune_set:
        cfg = _override(cfg, args.finetune_set)
    split_dir = work / f"split-{task}-s{seed}"
    if not split_dir.is_dir():
        prepare_split(cfg, manifest, split_dir)
    if federated:
        res = run_federation(InProcessGrid(split_dir, args.clinics), cfg,
                             split_dir / "server_test.csv")
        return res.evaluator.history[max(res.evaluator.history)]
    m = read_manifest(manifest, cfg.task, default_modality="radiograph")
    split = _clinic_split(cfg, m, split_dir)
    return train_fold(cfg, m, split, seed).test


def probe(task: str, encoder: Path | None, manifest: Path, spec: dict,
          args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Linear probe of one encoder (None: the seed's random init) on the whole labelled set
    (simulations/linear_probe.py): {"<reading>": mean, "<reading>/sd": sd over the folds}."""
    raw = {"task": spec, **_common(args, seed),
           "model": {**_vit(args), **({"pretrained": str(encoder)} if encoder else {})}}
    cfg = config_from_dict(raw, source=f"probe {task}")
    m = read_manifest(manifest, cfg.task, default_modality="radiograph")
    torch.manual_seed(seed)
    vit = build_model(cfg.model, len(cfg.task.labels), cfg.data.image_size)
    feats = encoder_features(vit, make_loader(m, cfg.data, train=False),
                             resolve_device(args.device))
    out: dict[str, float] = {}
    for reading, x in feats.items():
        out[reading], out[f"{reading}/sd"] = probe_score(x, m.targets, m.patient_ids,
                                                          cfg.task.type, folds=args.probe_folds)
    return out


REFERENCE_WEIGHTS = "weights/torchvision_mobilenet_v2_features_in1k.pth"


def reference_probe(task: str, manifest: Path, spec: dict, args: argparse.Namespace,
                    weights: Path) -> tuple[float, float]:
    """Linear probe of the ImageNet MobileNetV2 features (frozen, global average pool) at the
    benchmark's image size: what a good encoder scores on the same folds."""
    raw = {"task": spec, **_common(args, 0),
           "model": {"name": "mobilenet_v2", "pretrained": str(weights),
                     "pretrained_prefix": "features."}}
    cfg = config_from_dict(raw, source=f"reference probe {task}")
    m = read_manifest(manifest, cfg.task, default_modality="radiograph")
    model = build_model(cfg.model, len(cfg.task.labels), cfg.data.image_size)
    x = cnn_features(model.features, make_loader(m, cfg.data, train=False),
                     resolve_device(args.device))
    return probe_score(x, m.targets, m.patient_ids, cfg.task.type, folds=args.probe_folds)


def _clinic_split(cfg: Config, m, split_dir: Path) -> dict[str, np.ndarray]:
    """Row indices of the union of the clinics' train / val / test rows (the pooled row sees
    exactly the federation's data and is scored on the same test set)."""
    where = {p: i for i, p in enumerate(m.paths)}
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in range(cfg.split.clinics):
        local = pd.read_csv(split_dir / f"clinic_{c}" / "manifest.csv", dtype=str,
                            keep_default_na=False)
        for s in ("train", "val"):
            parts[s] += [where[p] for p in local.loc[local["split"] == s, "path"]]
    test = pd.read_csv(split_dir / "server_test.csv", dtype=str, keep_default_na=False)
    parts["test"] = [where[p] for p in test["path"]]
    return {k: np.asarray(v, dtype=np.int64) for k, v in parts.items()}


def _cell(values: list[float | None]) -> str:
    """mean +- sd over seeds; None = not run (--tasks, --finetune-modes)."""
    if all(v is None for v in values):
        return "not run"
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], float)
    if not len(a):
        return "undef"
    return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")


def tables(results: dict, seeds: list[int]) -> str:
    """Markdown: one row per encoder, fine-tuned pooled and federated, per task; then the
    implant per-class sensitivity/specificity of the federated fine-tuning."""
    head = ("| encoder | UFBA-425 macro-AUC, pooled FT | UFBA-425 macro-AUC, federated FT "
            "| implants bal. acc., pooled FT | implants bal. acc., federated FT "
            "| pretraining loss, epoch/round 1 -> last |")
    lines = [head, "|---|---|---|---|---|---|"]
    for name, r in results.items():
        cells = [_cell([s[t][mode].get(METRIC[t], math.nan) if mode in s.get(t, {}) else None
                        for s in r["seeds"].values()])
                 for t in TASKS for mode in ("pooled", "federated")]
        curves = [s.get("pretrain_loss") for s in r["seeds"].values() if s.get("pretrain_loss")]
        curve = (f"{np.mean([c[0] for c in curves]):.3f} -> {np.mean([c[-1] for c in curves]):.3f}"
                 if curves else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {curve} |")
    text = "\n".join(lines) + "\n" + probe_table(results)
    classes = sorted({k.split("/", 1)[1] for r in results.values()
                      for s in r["seeds"].values()
                      for k in s.get("implants", {}).get("federated", {})
                      if k.startswith("sensitivity/")})
    if classes:
        text += ("\nDemo implant systems, federated fine-tuning: per-class sensitivity / "
                 "specificity (mean over seeds)\n\n| encoder | " + " | ".join(classes)
                 + " |\n|---|" + "---|" * len(classes) + "\n")
        for name, r in results.items():
            per = []
            for c in classes:
                sens = [s["implants"]["federated"].get(f"sensitivity/{c}", math.nan)
                        for s in r["seeds"].values()]
                spec = [s["implants"]["federated"].get(f"specificity/{c}", math.nan)
                        for s in r["seeds"].values()]
                per.append(f"{np.nanmean(sens):.2f} / {np.nanmean(spec):.2f}")
            text += f"| {name} | " + " | ".join(per) + " |\n"
    return text


def probe_table(results: dict) -> str:
    """Markdown: the linear probes (frozen encoder), mean +- sd over seeds of each seed's
    k-fold mean; empty when none ran."""
    if not any("probe" in s.get(t, {}) for r in results.values() for s in r["seeds"].values()
               for t in TASKS):
        return ""
    cols = [(t, reading) for t in TASKS for reading in READINGS]
    names = {"ufba": "UFBA-425 macro-AUC", "implants": "implants bal. acc."}
    text = ("\nLinear probe (frozen encoder, logistic regression, patient-grouped folds of the "
            "whole labelled set; simulations/linear_probe.py)\n\n| encoder | "
            + " | ".join(f"{names[t]}, {reading}" for t, reading in cols)
            + " |\n|---|" + "---|" * len(cols) + "\n")
    for name, r in results.items():
        cells = [_cell([s[t]["probe"][reading] if "probe" in s.get(t, {}) else None
                        for s in r["seeds"].values()]) for t, reading in cols]
        text += f"| {name} | " + " | ".join(cells) + " |\n"
    return text


def reference_line(reference: dict[str, tuple[float, float]]) -> str:
    if not reference:
        return ""
    names = {"ufba": "UFBA-425 macro-AUC", "implants": "implants bal. acc."}
    return ("\nReference: the ImageNet MobileNetV2 (../shared/" + REFERENCE_WEIGHTS + "), frozen, "
            "global average pool, the same probe and folds: " + ", ".join(
                f"{names[t]} {m:.3f} ± {sd:.3f} over the folds" for t, (m, sd) in
                reference.items()) + "\n")


def criteria(results: dict) -> str:
    """Issue 14's two checks where their rows ran, paired by seed: federated MDE minus random
    init (points of the metric x 100) and federated MDE / pooled MDE, per task and fine-tuning,
    then the same on the linear probes; the same for every variant of federated MDE
    (FEDERATED_MDE), and each minus federated MDE; then the method questions (METHOD_PAIRS)."""
    def metric(name: str, t: str, mode: str) -> dict[int, float]:
        out = {}
        for seed, s in results.get(name, {}).get("seeds", {}).items():
            got = s.get(t, {})
            if mode in READINGS:
                if mode in got.get("probe", {}):
                    out[seed] = got["probe"][mode]
            elif METRIC[t] in got.get(mode, {}):
                out[seed] = got[mode][METRIC[t]]
        return out

    lines = []
    for t in TASKS:
        for mode in ("pooled", "federated", *READINGS):
            what = f"linear probe ({mode})" if mode in READINGS else f"{mode} fine-tuning"
            rnd, pooled, plain = (metric(n, t, mode) for n in
                                  ("random init", "pooled MDE", "federated MDE"))
            goal = "; goal >= 5" if (t, mode) == ("ufba", "federated") else ""
            for name in FEDERATED_MDE:
                fed = metric(name, t, mode)
                if seeds := sorted(fed.keys() & rnd.keys()):
                    d = [100 * (fed[k] - rnd[k]) for k in seeds]
                    lines.append(f"- {t}, {what}: {name} - random init = "
                                 f"{_cell(d)} points (seeds {seeds}{goal})")
                if seeds := sorted(fed.keys() & pooled.keys()):
                    r = [fed[k] / pooled[k] for k in seeds]
                    lines.append(f"- {t}, {what}: {name} / pooled MDE = {_cell(r)} "
                                 f"(seeds {seeds}{'; goal >= 0.98' if goal else ''})")
                if name != "federated MDE" and (seeds := sorted(fed.keys() & plain.keys())):
                    d = [100 * (fed[k] - plain[k]) for k in seeds]
                    lines.append(f"- {t}, {what}: {name} - federated MDE = {_cell(d)} points "
                                 f"(seeds {seeds})")
            for name, ref in METHOD_PAIRS:
                a, b = metric(name, t, mode), metric(ref, t, mode)
                if seeds := sorted(a.keys() & b.keys()):
                    d = [100 * (a[k] - b[k]) for k in seeds]
                    lines.append(f"- {t}, {what}: {name} - {ref} = {_cell(d)} points "
                                 f"(seeds {seeds})")
    return ("\nPaired by seed:\n\n" + "\n".join(lines) + "\n") if lines else ""


def repeat_tables(results: dict) -> str:
    """With --finetune-repeats: every fine-tuning run per encoder seed, then the differences
    paired by encoder seed and fine-tuning seed (the same split, head and data order): each
    row minus random init, each federated MDE row minus pooled MDE and minus federated MDE,
    and the method questions (METHOD_PAIRS: MDE minus MAE, mask 0.25 minus 0.75)."""
    text = ""
    for t in TASKS:
        for mode in ("pooled", "federated"):
            runs = {name: {int(seed): s[t][mode]["repeats"] for seed, s in r["seeds"].items()
                           if "repeats" in s.get(t, {}).get(mode, {})}
                    for name, r in results.items()}
            runs = {name: v for name, v in runs.items() if v}
            if not runs:
                continue
            seeds = sorted({seed for v in runs.values() for seed in v})
            text += (f"\n{t}, {mode} fine-tuning, {METRIC[t]} of each run (fine-tuning seeds s, "
                     "s + 1000, ...) and their mean, per encoder seed s\n\n| encoder | "
                     + " | ".join(f"seed {s}" for s in seeds) + " | all runs |\n|---|"
                     + "---|" * (len(seeds) + 1) + "\n")
            for name, v in runs.items():
                cells = [f"{np.mean(v[s]):.3f} ({', '.join(f'{x:.3f}' for x in v[s])})"
                         if s in v else "not run" for s in seeds]
                text += (f"| {name} | " + " | ".join(cells) + " | "
                         + _cell([x for s in v for x in v[s]]) + " |\n")
            pairs = [(name, "random init") for name in runs if name != "random init"]
            pairs += [(name, ref) for name in FEDERATED_MDE
                      for ref in ("pooled MDE", "federated MDE") if name != ref]
            pairs += METHOD_PAIRS
            lines = []
            for name, ref in pairs:
                if name not in runs or ref not in runs:
                    continue
                d = [100 * (a - b) for s in sorted(runs[name].keys() & runs[ref].keys())
                     for a, b in zip(runs[name][s], runs[ref][s], strict=True)]
                if d:
                    lines.append(f"- {t}, {mode} fine-tuning: {name} - {ref} = {_cell(d)} "
                                 f"points over {len(d)} runs, ahead in "
                                 f"{sum(x > 0 for x in d)}")
            text += ("\nPaired by encoder seed and fine-tuning seed:\n\n" + "\n".join(lines)
                     + "\n") if lines else ""
    return text


# Settings that must agree for invocations to be combined (seeds and encoders may differ).
SAME_SETTING = ("vit", "image_size", "patch", "depth", "decoder_dim", "decoder_depth",
                "batch_size", "clinics", "pretrain_epochs", "pretrain_lr", "pretrain_schedule",
                "pretrain_warmup", "pretrain_betas", "norm_pix_loss", "finetune_epochs", "lr",
                "limit", "pretrain_sources", "finetune_limit", "probe_folds", "quick",
                "finetune_set", "finetune_repeats")
# What a file written before a setting existed meant by its absence.
SETTING_BEFORE = {"finetune_set": "", "finetune_repeats": "1"}


def _merge(into: dict, row: dict, where: str) -> None:
    """Add one invocation's results of a row and seed to those already read: other tasks or
    fine-tuning modes join them (a pooled and a federated fine-tuning of the same encoders
    make one row with both columns); the same entry with other figures is a clash. "seconds"
    (the invocation's time for the row) is kept from the first file."""
    for key, value in row.items():
        if key == "seconds":
            into.setdefault(key, value)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, f"{where}, {key}")
        elif key in into and into[key] != value:
            raise SystemExit(f"error: {where}, {key}: the file differs from an earlier file")
        else:
            into[key] = value


def combine(paths: list[Path]) -> tuple[str, dict]:
    """The tables and paired lines of several invocations' pretrain.json (the same setting,
    other seeds, encoders or fine-tuning modes: e.g. rows run side by side on one thread
    each), as one run would print them. An entry present twice must hold the same figures
    (the benchmark is deterministic per seed); a clash is an error, not a silent choice."""
    results: dict = {}
    first = None
    for path in paths:
        data = json.loads(Path(path).read_text())
        setting = {k: data["args"].get(k, SETTING_BEFORE.get(k)) for k in SAME_SETTING}
        if first is None:
            first = (path, setting)
        elif setting != first[1]:
            diff = sorted(k for k in SAME_SETTING if setting[k] != first[1][k])
            raise SystemExit(f"error: {path} has another setting than {first[0]}: {diff}")
        for name, r in data["results"].items():
            seeds = results.setdefault(name, {"seeds": {}})["seeds"]
            for seed, row in r["seeds"].items():
                _merge(seeds.setdefault(int(seed), {}), row, f"{path}: {name}, seed {seed}")
    for r in results.values():
        r["seeds"] = dict(sorted(r["seeds"].items()))
    all_seeds = sorted({s for r in results.values() for s in r["seeds"]})
    text = (f"combined from {len(paths)} invocations; seeds {all_seeds}\n\n"
            + tables(results, all_seeds) + criteria(results) + repeat_tables(results))
    return text, results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path,
                    default=Path(os.environ.get("DENTFED_SHARED", REPO.parent / "shared")))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-pretrain"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke: 32 px, 2-block ViT, 2 pretraining and 2 fine-tuning "
                    "epochs, at most 120 images per pretraining source")
    ap.add_argument("--encoders", help="comma list of rows (default all): "
                    + ", ".join(ENCODERS))
    ap.add_argument("--tasks", default=",".join(TASKS),
                    help="comma list of fine-tuning tasks (default all): " + ", ".join(TASKS))
    ap.add_argument("--finetune-modes", default="pooled,federated",
                    help="comma list: pooled, federated (default both); none: only the linear "
                    "probes")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--vit", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--depth", type=int, help="ViT blocks (default: the size's 12)")
    ap.add_argument("--decoder-dim", type=int, default=128)
    ap.add_argument("--decoder-depth", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--clinics", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    # The paper's optimiser (warm-up, cosine, betas 0.9/0.95). 1e-3 (the default before stop
    # 31) left every encoder below its random init in the probes; docs/pretraining.md.
    ap.add_argument("--pretrain-lr", type=float, default=1e-4)
    ap.add_argument("--pretrain-schedule", choices=["constant", "cosine"], default="cosine",
                    help="pretraining learning rate after the warm-up, per step (pooled) or "
                    "per round (federated)")
    ap.add_argument("--pretrain-warmup", type=int, default=2,
                    help="pretraining warm-up epochs (pooled) or rounds (federated); at most "
                    "the epochs less one")
    ap.add_argument("--pretrain-betas", type=lambda v: [float(b) for b in v.split(",")],
                    default=[0.9, 0.95], help="AdamW betas of pretraining")
    ap.add_argument("--teacher-momentum", type=float, default=0.9,
                    help="the EMA-teacher row's pretrain.federated_teacher_momentum, per round "
                    "(0.9 = 0.996^26: the pooled teacher's memory at ~26 steps an epoch)")
    ap.add_argument("--norm-pix-loss", action="store_true",
                    help="MAE: per-patch normalised pixel targets (pretrain.norm_pix_loss)")
    ap.add_argument("--finetune-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=5e-4, help="fine-tuning learning rate")
    ap.add_argument("--finetune-set", default="",
                    help="overrides of every fine-tuning config, pooled and federated, the "
                    "same for every row (section.key=value,...; values as YAML), e.g. "
                    "federation.keep_optimizer_state=true,federation.batch_size=8")
    ap.add_argument("--finetune-repeats", type=int, metavar="N",
                    help="fine-tune each encoder of seed s N times, with seeds s, s + 1000, ... "
                    "(other clinic splits, heads and data orders, the same encoder), and score "
                    "it by their mean: one fine-tuning's noise was larger than the criterion "
                    "(default 4; 1 with --quick or --finetune-modes none)")
    ap.add_argument("--encoders-from", nargs="+", type=Path, metavar="DIR",
                    help="fine-tune (and probe) the encoders that earlier invocations run with "
                    "--keep pretrained (their --out folders) instead of pretraining them again; "
                    "their pretraining settings must match")
    ap.add_argument("--limit", type=int, help="at most this many images per pretraining source")
    ap.add_argument("--pretrain-sources", default=",".join(PRETRAINING_SOURCES),
                    help="comma list of the pretraining images' sources (default all): "
                    + ", ".join(PRETRAINING_SOURCES))
    ap.add_argument("--finetune-limit", type=int,
                    help="at most this many images per fine-tuning set (default all)")
    ap.add_argument("--probe-folds", type=int, default=5,
                    help="patient-grouped folds of the linear probe (0: no probe)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders under --out")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="run nothing: print (and write under --out) the tables and paired "
                    "lines of these invocations' pretrain.json files together")
    args = ap.parse_args(argv)
    if args.combine:
        text, results = combine(args.combine)
        print(text)
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "pretrain.md", text)
        write_text_atomic(args.out / "pretrain.json", json.dumps(
            {"combined": [str(p) for p in args.combine], "results": results}, indent=1))
        return 0
    if args.finetune_repeats is None:  # nothing to repeat without fine-tuning (probes only)
        args.finetune_repeats = 1 if args.quick or args.finetune_modes == "none" else 4
    if args.quick:
        args.image_size, args.depth = 32, args.depth or 2
        args.pretrain_epochs, args.finetune_epochs = 2, 2
        args.limit = args.limit or 120
    args.pretrain_warmup = min(args.pretrain_warmup, args.pretrain_epochs - 1)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("dentfed.bench").setLevel(logging.INFO)
    # progress: a line per federated round and per pooled epoch (100 of them take ~30 min)
    logging.getLogger("dentfed.server").setLevel(logging.INFO)
    logging.getLogger("simulations.pooled_training").setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # "federated evaluation skipped" is meant
    if not ufba.manifest_path(args.shared).is_file():
        print(f"error: ../shared data not found under {args.shared} (--shared)", file=sys.stderr)
        return 1
    names = [n.strip() for n in args.encoders.split(",")] if args.encoders else list(ENCODERS)
    unknown = [n for n in names if n not in ENCODERS]
    if unknown:
        ap.error(f"unknown --encoders {unknown}; choose from {list(ENCODERS)}")
    tasks = [t.strip() for t in args.tasks.split(",")]
    modes = ([] if args.finetune_modes == "none"
             else [m.strip() for m in args.finetune_modes.split(",")])
    if not tasks or set(tasks) - set(TASKS):
        ap.error(f"--tasks {args.tasks!r}: choose from {list(TASKS)}")
    if set(modes) - {"pooled", "federated"} or not (modes or args.probe_folds):
        ap.error(f"--finetune-modes {args.finetune_modes!r}: choose from pooled, federated "
                 "(none: the linear probes only)")
    if args.finetune_repeats < 1:
        ap.error("--finetune-repeats must be at least 1")
    sources = tuple(x.strip() for x in args.pretrain_sources.split(","))
    if not sources or set(sources) - set(PRETRAINING_SOURCES):
        ap.error(f"--pretrain-sources {args.pretrain_sources!r}: choose from "
                 f"{list(PRETRAINING_SOURCES)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    if args.encoders_from:  # every kept encoder found before hours of fine-tuning, not after
        for seed in seeds:
            for name in names:
                if ENCODERS[name] is not None:
                    kept_encoder(name, seed, args.encoders_from, args)
    results: dict = {n: {"seeds": {}} for n in names}
    t_all = time.perf_counter()
    reference: dict[str, tuple[float, float]] = {}
    for seed in seeds:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        pre_manifest = pretraining_manifest(args.shared, work, args.limit, seed, sources)
        ft = {t: finetune_manifest(t, args.shared, work, args.finetune_limit, seed)
              for t in tasks}
        weights = args.shared / REFERENCE_WEIGHTS
        if args.probe_folds and weights.is_file() and not reference:
            for task in tasks:
                reference[task] = reference_probe(task, *ft[task], args, weights)
                log.info("reference (ImageNet MobileNetV2): %s linear probe %.4f ± %.4f",
                         task, *reference[task])
        for name in names:
            t0 = time.perf_counter()
            row: dict = {}
            encoder = None
            if ENCODERS[name] is not None and args.encoders_from:
                encoder, row["pretrain_loss"] = kept_encoder(name, seed, args.encoders_from,
                                                             args)
                log.info("seed %d %s: the encoder of %s", seed, name, encoder)
            elif ENCODERS[name] is not None:
                run, curve = pretrain(name, ENCODERS[name], pre_manifest, args, seed, work)
                encoder, row["pretrain_loss"] = run / ENCODER_FILE, curve
                log.info("seed %d %s: pretraining loss %s (%.0f s)", seed, name,
                         " ".join(f"{v:.3f}" for v in curve), time.perf_counter() - t0)
            for task in tasks:
                manifest, spec = ft[task]
                row[task] = {}
                if args.probe_folds:
                    row[task]["probe"] = probe(task, encoder, manifest, spec, args, seed)
                    log.info("seed %d %s: %s linear probe %s", seed, name, task, ", ".join(
                        f"{r} {row[task]['probe'][r]:.4f}" for r in READINGS))
                for mode in modes:
                    runs = []
                    for ft_seed in finetune_seeds(seed, args.finetune_repeats):
                        res = finetune(task, encoder, manifest, spec, args, ft_seed, work,
                                       mode == "federated")
                        runs.append({k: float(v) for k, v in res.items()
                                     if isinstance(v, int | float)})
                        log.info("seed %d %s: %s %s fine-tuning (seed %d) %s %.4f", seed, name,
                                 task, mode, ft_seed, METRIC[task],
                                 runs[-1].get(METRIC[task], math.nan))
                    row[task][mode] = {k: float(np.mean([r[k] for r in runs]))
                                       for k in runs[0] if all(k in r for r in runs)}
                    if len(runs) > 1:
                        row[task][mode]["repeats"] = [r.get(METRIC[task]) for r in runs]
            row["seconds"] = time.perf_counter() - t0
            results[name]["seeds"][seed] = row
        if args.keep:
            shutil.move(str(work), str(args.out / f"runs-seed{seed}"))
    shutil.rmtree(work, ignore_errors=True)
    setting = (f"ViT-{args.vit} ({args.depth or 12} blocks), {args.image_size} px, patch "
               f"{args.patch}; pretraining {args.pretrain_epochs} epochs/rounds (lr "
               f"{args.pretrain_lr:g}, {args.pretrain_schedule}"
               + (f" after {args.pretrain_warmup} warm-up" if args.pretrain_warmup else "")
               + f", betas {args.pretrain_betas[0]:g}/{args.pretrain_betas[1]:g}"
               + (", norm_pix_loss" if args.norm_pix_loss else "")
               + f"), fine-tuning {args.finetune_epochs} epochs/rounds (lr "
               f"{args.lr:g}" + (f"; {args.finetune_set}" if args.finetune_set else "")
               + (f"; mean of {args.finetune_repeats} fine-tuning seeds an encoder"
                  if args.finetune_repeats > 1 else "")
               + f"), {args.clinics} clinics, seeds {seeds}"
               + (f", at most {args.limit} images per source" if args.limit else "")
               + (f", pretraining on {'/'.join(sources)} only"
                  if len(sources) < len(PRETRAINING_SOURCES) else "")
               + (f"; fine-tuning only {'/'.join(tasks)}, {'/'.join(modes) or 'none'}"
                  if len(tasks) < len(TASKS) or len(modes) < 2 else "")
               + (f"; linear probes over {args.probe_folds} patient-grouped folds"
                  if args.probe_folds else "")
               + (" [--quick smoke]" if args.quick else "")
               + (f"; encoders pretrained by {', '.join(map(str, args.encoders_from))}"
                  if args.encoders_from else ""))
    text = (f"{setting}; {time.perf_counter() - t_all:.0f} s in all\n\n"
            + tables(results, seeds) + reference_line(reference) + criteria(results)
            + repeat_tables(results))
    print(text)
    write_text_atomic(args.out / "pretrain.md", text)
    write_text_atomic(args.out / "pretrain.json", json.dumps(
        {"setting": setting, "args": {k: str(v) for k, v in vars(args).items()},
         "results": results, "reference_probe": reference}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
