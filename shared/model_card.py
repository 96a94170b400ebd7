"""Model card: what a saved model predicts, how it was built and on how much data.

Written as `model_card.json` (machine-readable) and `model_card.md` beside every saved model,
by `dentfed train` and by the coordinator of a federated run. Data are described by counts only
(images, patients, label counts; per anonymous clinic index for federated runs): never a patient
id, file name or path. The pretrained-weights file is named by its base name only.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from shared.atomic_files import write_json, write_text_atomic
from shared.config import Config

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
STAGE_NAMES = {"resnet": ["stem (conv1, bn1)", "layer1", "layer2", "layer3", "layer4"]}


def label_counts(task_type: str, labels: list[str], targets: np.ndarray) -> dict[str, dict]:
    """Per label: positive/negative/unknown counts (multilabel), images per class, or images
    with at least one box of the label (detection)."""
    if task_type == "detection":
        return {name: {"images": int(np.nansum(targets[:, j]))}
                for j, name in enumerate(labels)}
    if task_type == "multilabel":
        out = {}
        for j, name in enumerate(labels):
            col = targets[:, j]
            known = ~np.isnan(col)
            out[name] = {"positive": int((col[known] == 1).sum()),
                         "negative": int((col[known] == 0).sum()),
                         "unknown": int((~known).sum())}
        return out
    return {name: {"images": int((targets == c).sum())} for c, name in enumerate(labels)}


def _architecture(cfg: Config) -> dict[str, Any]:
    m = cfg.model
    arch: dict[str, Any] = {"name": m.name, "image_size": cfg.data.image_size,
                            "modality": cfg.data.modality, "dropout": m.dropout,
                            "pretrained_weights": Path(m.pretrained).name if m.pretrained
                            else None}
    if m.name.lower() == "vit":
        arch["vit"] = m.vit.model_dump()
    return arch


def privacy_summary(config_dict: dict, metrics: dict) -> dict[str, Any] | None:
    """DP settings and the spent epsilon when the run used differential privacy (config
    `privacy.dp_sgd` / `privacy.central`; SecAgg+ alone is not DP); None otherwise.

    Epsilon is what the run recorded: `privacy.epsilon` of a pooled run (a list for k-fold:
    the largest), `privacy.epsilon_max` over clinics of a federated DP-SGD run, and
    `central_dp.epsilon` of client-level DP."""
    section = config_dict.get("privacy") or {}
    used = {k: v for k, v in section.items() if k in ("dp_sgd", "central") and v}
    if not used:
        return None
    eps = None
    recorded = metrics.get("privacy") or {}
    for value in (recorded.get("epsilon_max"), recorded.get("epsilon"),
                  (metrics.get("central_dp") or {}).get("epsilon")):
        if value is not None:
            eps = max(value) if isinstance(value, list) else value
            break
    delta = next((v.get("delta") for v in used.values() if isinstance(v, dict)), None)
    return {"settings": used, "epsilon": eps, "delta": delta}


def _finite(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v))}


def build_card(cfg: Config, *, kind: str, checkpoint: str, thresholds: list[float] | None,
               data: dict[str, Any], metrics: dict[str, Any], evaluated_on: str,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card as a plain dict. `kind`: 'pooled' or 'federated'; `data`: counts only."""
    config_dict = cfg.model_dump(mode="json")
    freeze = cfg.model.freeze
    card: dict[str, Any] = {
        "card_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kind": kind,
        "checkpoint": checkpoint,
        "task": {"type": cfg.task.type, "labels": list(cfg.task.labels)},
        "thresholds": thresholds,
        "threshold_source": ("tuned per label on validation (max F1)" if thresholds
                             else "0.5 per label" if cfg.task.type == "multilabel"
                             else "argmax over classes"),
        "architecture": _architecture(cfg),
        "frozen_stages": freeze,
        "training": {"epochs": cfg.train.epochs, "loss": cfg.train.loss, "lr": cfg.train.lr,
                     "seed": cfg.train.seed},
        "data": data,
        "metrics": {"evaluated_on": evaluated_on, "values": _finite(metrics.get("final", {}))},
        "privacy": privacy_summary(config_dict, metrics),
    }
    if kind == "federated":
        f = cfg.federation
        card["federation"] = {"strategy": f.strategy, "rounds": f.rounds,
                              "local_epochs": f.local_epochs, "upload": f.upload,
                              "download": f.download}
    if extra:
        card.update(extra)
    return card


def card_markdown(card: dict[str, Any]) -> str:
    """A short human-readable rendering (what `dentfed predict --card` prints)."""
    t = card["task"]
    arch = card["architecture"]
    lines = [f"# Model card ({card['kind']} training)", "",
             f"- task: {t['type']}, labels: {', '.join(t['labels'])}",
             f"- architecture: {arch['name']} at {arch['image_size']} px, {arch['modality']}s"
             + (f", pretrained from {arch['pretrained_weights']}"
                if arch.get("pretrained_weights") else ", trained from scratch"),
             f"- frozen stages: {card['frozen_stages']}",
             f"- decision rule: {card['threshold_source']}"]
    if card.get("thresholds"):
        lines.append("- thresholds: " + ", ".join(
            f"{lab} {thr:.3f}" for lab, thr in zip(t["labels"], card["thresholds"], strict=True)))
    if card.get("federation"):
        f = card["federation"]
        lines.append(f"- federation: {f['strategy']}, {f['rounds']} rounds, "
                     f"{f['local_epochs']} local epoch(s), upload {f['upload']}")
    p = card.get("privacy")
    if p:
        eps = p.get("epsilon")
        lines.append("- differential privacy: " + (f"epsilon {eps:.3g}" if isinstance(
            eps, int | float) else "used (epsilon not recorded)")
            + (f", delta {p['delta']:g}" if isinstance(p.get("delta"), int | float) else ""))
    else:
        lines.append("- differential privacy: not used")
    lines += ["", "## Training data (counts only)", "", *_bullets(card["data"]), "",
              f"## Metrics ({card['metrics']['evaluated_on']})", ""]
    vals = card["metrics"]["values"]
    keys = [k for k in vals if "/" not in k] or list(vals)
    lines += [f"- {k}: {vals[k]:.4f}" for k in keys]
    return "\n".join(lines) + "\n"


def _bullets(d: dict, depth: int = 0) -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and all(not isinstance(x, dict) for x in v.values()):
            out.append("  " * depth + f"- {k}: " + ", ".join(f"{a} {b}" for a, b in v.items()))
        elif isinstance(v, dict):
            out += ["  " * depth + f"- {k}:", *_bullets(v, depth + 1)]
        else:
            out.append("  " * depth + f"- {k}: {v}")
    return out


def write_card(folder: Path, card: dict[str, Any]) -> None:
    write_json(Path(folder) / CARD_JSON, card)
    write_text_atomic(Path(folder) / CARD_MD, card_markdown(card))


def read_card(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else None
