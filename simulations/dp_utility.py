"""Utility against epsilon with DP-SGD on the demo task, and a loss-threshold membership-inference
attack on each trained model.

For each setting (no DP, then each target epsilon) one pooled model is trained through the
product's own path (factory, `fit`, Opacus) on the same patient-grouped split and the same
number of epochs (no early stopping, so every setting gets the same compute), and evaluated on
the held-out test patients. The attack (Yeom et al. 2018) scores each image by minus the model's
loss on it; its ROC AUC separates training images (members) from test images (non-members):
0.5 = the model's losses say nothing about membership.

    .venv/bin/python -m simulations.dp_utility --config configs/demo-photos-scratch.yaml \
        --image-size 64 --epochs 8 --model mobilenet_v2 --freeze 17 \
        --pretrained ../shared/weights/torchvision_mobilenet_v2_features_in1k.pth \
        --pretrained-prefix features.

Runs on CPU; per-sample gradients cost far more than plain ones (Opacus), so the options shrink
the demo (image size, epochs, trainable layers) to what 2 cores finish in minutes.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from shared.atomic_files import write_json
from shared.config import Config, DpSgdConfig, load_config, with_overrides
from shared.data.dataset import make_loader
from shared.data.splits import split_patients
from shared.losses import make_loss
from shared.metrics import headline
from shared.models import build_model, resolve_device
from shared.report_tables import render_table
from shared.training import evaluate, fit, predict, seed_everything
from simulations.task_manifest import load_task_manifest

log = logging.getLogger("dentfed.dp_utility")


def per_image_loss(probs: np.ndarray, targets: np.ndarray, task_type: str) -> np.ndarray:
    """Each image's own loss from predicted probabilities: BCE over its known labels
    (multi-label) or cross-entropy (multi-class)."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    if task_type == "multiclass":
        return -np.log(p[np.arange(len(p)), targets.astype(int)])
    known = ~np.isnan(targets)
    t = np.nan_to_num(targets)
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p)) * known
    return bce.sum(1) / np.maximum(known.sum(1), 1)


def loss_attack_auc(member_loss: np.ndarray, nonmember_loss: np.ndarray) -> float:
    """ROC AUC of the threshold attack 'member if the loss is low'."""
    y = np.r_[np.ones(len(member_loss)), np.zeros(len(nonmember_loss))]
    return float(roc_auc_score(y, -np.r_[member_loss, nonmember_loss]))


def run_setting(cfg: Config, m, split, epsilon: float | None, seed: int, clip: float,
                delta: float) -> dict:
    """Train and evaluate one setting; epsilon None = no DP."""
    dp = None if epsilon is None else DpSgdConfig(target_epsilon=epsilon, max_grad_norm=clip,
                                                  delta=delta)
    seed_everything(seed)
    device = resolve_device(cfg.train.device)
    train_m, val_m, test_m = (m.subset(split[s]) for s in ("train", "val", "test"))
    # The same architecture for every setting (GroupNorm), so only DP differs.
    model = build_model(cfg.model, len(cfg.task.labels), cfg.data.image_size, dp_compatible=True)
    loss_fn = make_loss(cfg.task, cfg.train, train_m.targets, per_sample=True)
    train_dl = make_loader(train_m, cfg.data, train=True, seed=seed)
    t0 = time.perf_counter()
    res = fit(model, train_dl, make_loader(val_m, cfg.data, train=False), loss_fn, cfg.task,
              cfg.train, device, privacy=dp)
    seconds = time.perf_counter() - t0
    test_dl = make_loader(test_m, cfg.data, train=False)
    test = evaluate(model, test_dl, loss_fn, cfg.task, device)
    # Members: the training images seen without augmentation; non-members: test patients.
    members = make_loader(train_m, cfg.data, train=False)
    pm, tm, _ = predict(model, members, None, device, cfg.task.type)
    pn, tn, _ = predict(model, test_dl, None, device, cfg.task.type)
    auc = loss_attack_auc(per_image_loss(pm, tm, cfg.task.type),
                          per_image_loss(pn, tn, cfg.task.type))
    key = headline(cfg.task.type)
    return {"epsilon": res.epsilon if dp else None, "target_epsilon": epsilon,
            f"test_{key}": test.get(key, float("nan")), "test_loss": test["loss"],
            "mia_auc": auc, "epochs": len(res.history), "seconds": seconds,
            "n_train": len(train_m), "n_test": len(test_m)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/demo-photos-scratch.yaml")
    p.add_argument("--manifest")
    p.add_argument("--epsilons", default="1,3,8", help="target epsilons; no-DP is always run")
    p.add_argument("--image-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--model")
    p.add_argument("--freeze", type=int)
    p.add_argument("--pretrained")
    p.add_argument("--pretrained-prefix")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/dp_utility.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config)
    overrides: dict[str, object] = {}
    for attr, section, key in (("image_size", "data", "image_size"),
                               ("batch_size", "data", "batch_size"), ("epochs", "train", "epochs"),
                               ("lr", "train", "lr"), ("model", "model", "name"),
                               ("freeze", "model", "freeze"), ("pretrained", "model", "pretrained"),
                               ("pretrained_prefix", "model", "pretrained_prefix")):
        if getattr(args, attr) is not None:
            overrides[f"{section}.{key}"] = getattr(args, attr)
    if cfg.train.loss not in ("bce", "focal", "ce"):  # per-sample losses
        overrides["train.loss"] = "ce" if cfg.task.type == "multiclass" else "bce"
    overrides.update({"train.patience": None, "train.progress": False,
                      "data.augment": False})  # members are scored on their training images
    cfg = with_overrides(cfg, overrides)
    m = load_task_manifest(cfg, args.manifest)
    split = split_patients(m, cfg.data.val_fraction, cfg.data.test_fraction, args.seed)
    rows = []
    for eps in [None, *[float(e) for e in args.epsilons.split(",") if e]]:
        log.info("training %s", "without DP" if eps is None else f"with target epsilon {eps:g}")
        rows.append(run_setting(cfg, m, split, eps, args.seed, args.max_grad_norm, args.delta))
        log.info("%s", rows[-1])
    key = f"test_{headline(cfg.task.type)}"
    table = [{"setting": "no DP" if r["target_epsilon"] is None else
              f"DP-SGD eps {r['target_epsilon']:g}",
              "epsilon spent": "inf" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
              key: f"{r[key]:.3f}", "test loss": f"{r['test_loss']:.3f}",
              "MIA AUC": f"{r['mia_auc']:.3f}", "train s": f"{r['seconds']:.0f}"}
             for r in rows]
    import pandas as pd

    print(render_table(pd.DataFrame(table).set_index("setting")))
    print(f"\n{rows[0]['n_train']} training / {rows[0]['n_test']} test images, "
          f"{cfg.train.epochs} epochs, {cfg.model.name} freeze {cfg.model.freeze}, "
          f"{cfg.data.image_size} px, delta {args.delta:g}, max_grad_norm {args.max_grad_norm:g}")
    write_json(Path(args.out), {"rows": rows, "config": cfg.model_dump(mode="json"),
                                "argv": argv})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
