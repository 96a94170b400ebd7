"""Pooled (centralised) training: `dentfed train`. Also the building block of the local-only and
pooled baselines, so it only composes the shared data layer, factory, loop and metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.tracking import log_run_folder
from shared.atomic_files import atomic_folder, write_json, write_text_atomic
from shared.config import Config, dump_config
from shared.data.dataset import make_loader
from shared.data.manifest import Manifest
from shared.data.splits import Split, kfold_patients, split_patients
from shared.errors import ConfigError, DentfedError
from shared.losses import make_loss
from shared.metrics import headline, tune_thresholds
from shared.model_card import build_card, label_counts, write_card
from shared.model_file import save_model_file
from shared.models import build_model, pretrain_of, resolve_device
from shared.pretrain_outputs import loss_curve_markdown, write_pretrain_outputs
from shared.report_tables import metrics_table, plot_learning_curves, render_table
from shared.training import evaluate, fit, predict, seed_everything
from simulations.task_manifest import load_task_manifest

log = logging.getLogger(__name__)


@dataclass
class FoldResult:
    test: dict[str, float]
    thresholds: list[float] | None
    history: list[dict[str, float]]
    best_epoch: int
    model: torch.nn.Module
    seconds: float
    sizes: dict[str, int]
    epsilon: float | None = None  # DP-SGD: privacy loss of this fold's training data
    stopped: str | None = None  # DP-SGD: why training stopped before cfg.train.epochs
    test_manifest: Manifest | None = None  # pretrain: the reconstruction figure's images


def train_fold(cfg: Config, m: Manifest, split: Split, seed: int) -> FoldResult:
    """Train on split['train'], early-stop on split['val'], tune thresholds on val, test."""
    t0 = time.perf_counter()
    seed_everything(seed)
    device = resolve_device(cfg.train.device)
    train_m, val_m, test_m = (m.subset(split[s]) for s in ("train", "val", "test"))
    dp = cfg.privacy.dp_sgd
    model = build_model(cfg.model, len(cfg.task.labels), cfg.data.image_size,
                        dp_compatible=dp is not None, pretrain=pretrain_of(cfg))
    loss_fn = make_loss(cfg.task, cfg.train, train_m.targets, per_sample=dp is not None)
    train_dl = make_loader(train_m, cfg.data, train=True, seed=seed)
    val_dl = make_loader(val_m, cfg.data, train=False)
    test_dl = make_loader(test_m, cfg.data, train=False)

    def show(row: dict[str, float]) -> None:
        key = f"val_{headline(cfg.task.type)}"
        more = "" if key == "val_loss" else f"  {key} {row.get(key, float('nan')):.4f}"
        log.info("epoch %d  train_loss %.4f  val_loss %.4f%s", row["epoch"],
                 row["train_loss"], row["val_loss"], more)

    # Pretraining keeps its last epoch, as a federated pretraining keeps its final round.
    res = fit(model, train_dl, val_dl, loss_fn, cfg.task, cfg.train, device, on_epoch=show,
              privacy=dp, keep="last" if cfg.task.type == "pretrain" else "best")
    thresholds = None
    if cfg.task.type == "multilabel":
        probs, targets, _ = predict(model, val_dl, None, device, cfg.task.type)
        thresholds = tune_thresholds(probs, targets)
    test = evaluate(model, test_dl, loss_fn, cfg.task, device, thresholds)
    sizes = {s: len(split[s]) for s in ("train", "val", "test")}
    return FoldResult(test, thresholds, res.history, res.best_epoch, model.cpu(),
                      time.perf_counter() - t0, sizes, res.epsilon, res.stop_reason, test_m)


def data_summary(m: Manifest, split: Split, cv: int | None) -> dict:
    """Counts only (no ids, no paths) for the model card: the saved model's split."""
    parts = {s: {"images": len(split[s]), "patients": int(len(set(m.patient_ids[split[s]])))}
             for s in ("train", "val", "test")}
    out = {"images": len(m), "patients": int(len(set(m.patient_ids))), "splits": parts,
           "train_label_counts": label_counts(m.task.type, m.task.labels,
                                              m.targets[split["train"]])}
    if cv:
        out["cv_folds"] = cv
        out["note"] = "splits and label counts are those of the last fold (the saved model)"
    return out


def _privacy_line(cfg: Config, folds: list[FoldResult]) -> str:
    dp = cfg.privacy.dp_sgd
    if dp is None:
        return ""
    eps = max(fr.epsilon or 0.0 for fr in folds)
    return (f"\nDP-SGD (Opacus): epsilon {eps:.3f} at delta {dp.delta:g} for the training "
            f"images{' (largest over folds)' if len(folds) > 1 else ''}, max_grad_norm "
            f"{dp.max_grad_norm:g}\n")


def run_training(cfg: Config, manifest: str | Path | None, out_dir: str | Path,
                 cv: int | None = None, seed: int | None = None) -> dict:
    """Run `dentfed train`; writes the run folder atomically and returns metrics.json's content."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DentfedError(f"output folder {out_dir} exists and is not empty; choose another --out")
    seed = cfg.train.seed if seed is None else seed
    m = load_task_manifest(cfg, manifest)
    if cv is not None and cv < 2:
        raise ConfigError("--cv needs at least 2 folds")
    splits = (kfold_patients(m, cv, cfg.data.val_fraction, seed) if cv
              else [split_patients(m, cfg.data.val_fraction, cfg.data.test_fraction, seed)])
    folds: list[FoldResult] = []
    for f, split in enumerate(splits):
        if cv:
            log.info("fold %d/%d", f + 1, cv)
        folds.append(train_fold(cfg, m, split, seed + f))

    keys = list(folds[0].test)
    stack = {k: np.array([fr.test[k] for fr in folds], dtype=float) for k in keys}
    final = {k: (float(np.nanmean(v)) if not np.all(np.isnan(v)) else float("nan"))
             for k, v in stack.items()}
    final_sd = ({k: (float(np.nanstd(v, ddof=1)) if np.sum(~np.isnan(v)) > 1 else float("nan"))
                 for k, v in stack.items()} if cv else None)
    result = {
        "task": cfg.task.type,
        "headline": headline(cfg.task.type),
        "final": final,
        **({"final_sd": final_sd, "folds": [fr.test for fr in folds]} if cv else {}),
        "history": folds[0].history if not cv else [fr.history for fr in folds],
        "best_epoch": [fr.best_epoch for fr in folds] if cv else folds[0].best_epoch,
        "thresholds": folds[-1].thresholds,
        "split_sizes": [fr.sizes for fr in folds] if cv else folds[0].sizes,
        "seconds": sum(fr.seconds for fr in folds),
        "seed": seed,
    }
    if cfg.privacy.dp_sgd is not None:  # per fold: each fold trains on its own patients
        eps = [fr.epsilon or 0.0 for fr in folds]
        stops = [fr.stopped for fr in folds]
        result["privacy"] = {"epsilon": eps if cv else eps[0], "delta": cfg.privacy.dp_sgd.delta,
                             "budget_stop": stops if cv else stops[0]}
    table = metrics_table(cfg.task, final, final_sd)

    with atomic_folder(out_dir) as tmp:
        write_text_atomic(tmp / "config.yaml", dump_config(cfg))
        write_json(tmp / "metrics.json", result)
        save_model_file(tmp / "model.pt", folds[-1].model, cfg, folds[-1].thresholds)
        write_card(tmp, build_card(
            cfg, kind="pooled", checkpoint="model.pt", thresholds=folds[-1].thresholds,
            data=data_summary(m, splits[-1], cv), metrics=result,
            evaluated_on=(f"mean over {cv} patient-grouped CV folds" if cv
                          else "held-out patient-grouped test split")))
        plot_learning_curves([fr.history for fr in folds], headline(cfg.task.type),
                             tmp / "learning_curve.png")
        title = f"{len(folds)}-fold patient-grouped CV, mean ± sd" if cv else "test split"
        extra = ""
        if cfg.task.type == "pretrain":
            last = folds[-1]
            assert last.test_manifest is not None
            write_pretrain_outputs(tmp, last.model, cfg, last.test_manifest)
            extra = (f"\n## Pretraining ({cfg.pretrain.method}, mask ratio "
                     f"{cfg.pretrain.mask_ratio:g})\n\nLoss on masked patches per epoch"
                     f"{' (last fold)' if cv else ''}:\n\n" + loss_curve_markdown(
                         [(int(h["epoch"]), h["train_loss"], h["val_loss"])
                          for h in last.history], "epoch")
                     + "\n![loss curve](learning_curve.png)\n\nencoder for fine-tuning: "
                     "encoder.pt (model.pretrained: this folder)\n\n"
                     "![reconstructions](reconstructions.png)\n")
        write_text_atomic(tmp / "report.md", f"# dentfed train\n\n{title}\n\n"
                          f"{render_table(table)}\n\nheadline {result['headline']}: "
                          f"{final[result['headline']]:.4f}\n{_privacy_line(cfg, folds)}"
                          + extra)
    log_run_folder(out_dir, "train", cfg)
    result["table"] = table
    return result
