"""The one model-file format: `model.pt` (`dentfed train`), `model_final.pt` and `model_best.pt`
(a federated run). One writer and one reader, so the pooled and the federated side cannot drift.

A model file is a `torch.save`d dict that `torch.load(..., weights_only=True)` reads:
`state_dict` (every weight and buffer), `config` (the run's resolved config, JSON-able),
`labels` (task.labels, in output order), `thresholds` (per-label decision thresholds tuned on
validation, or None) and `trainable_keys` (the state keys a federated round exchanges).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from shared.atomic_files import torch_save_atomic
from shared.config import Config, config_from_dict
from shared.errors import DentfedError
from shared.models import ENCODER_FILE, build_model, pretrain_of, trainable_state_keys

# What a run folder holds, in the order a reader looks: a pooled run, then a federated run's
# final model (`model_best.pt` is only used when named explicitly).
MODEL_FILES = ("model.pt", "model_final.pt")
REQUIRED_KEYS = ("state_dict", "config", "labels")


@dataclass
class ModelFile:
    """A model file read back and its model rebuilt (eval mode, on the CPU)."""

    model: nn.Module
    cfg: Config
    thresholds: list[float] | None
    trainable_keys: list[str] | None
    path: Path


def save_model_file(path: Path, model: nn.Module, cfg: Config,
                    thresholds: list[float] | None) -> None:
    """Weights plus what is needed to use them: config, label names, tuned thresholds."""
    torch_save_atomic({
        "state_dict": model.state_dict(),
        "config": cfg.model_dump(mode="json"),
        "labels": list(cfg.task.labels),
        "thresholds": list(thresholds) if thresholds is not None else None,
        "trainable_keys": trainable_state_keys(model),
    }, path)


def save_encoder_file(path: Path, model: nn.Module, cfg: Config) -> None:
    """A pretraining run's encoder (`encoder.pt`) in the one format: `state_dict` is the ViT
    encoder in torchvision's VisionTransformer layout (no head, no decoder, no teacher),
    `config` the pretraining config, `kind` "encoder". `model.pretrained` reads it (or the
    run folder holding it) to initialise a classification ViT."""
    torch_save_atomic({
        "state_dict": model.encoder_state(),
        "config": cfg.model_dump(mode="json"),
        "labels": [],
        "thresholds": None,
        "trainable_keys": list(model.encoder_state()),
        "kind": "encoder",
    }, path)


def find_model_file(model_path: str | Path) -> Path:
    """A run folder (model.pt, else model_final.pt) or a model file itself."""
    p = Path(model_path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise DentfedError(f"--model {p}: no such run folder or checkpoint file")
    for name in MODEL_FILES:
        if (p / name).is_file():
            return p / name
    raise DentfedError(f"--model {p}: no {' or '.join(MODEL_FILES)} in this folder (a run "
                       "folder from `dentfed train` or `dentfed simulate`)")


def read_model_file(model_path: str | Path) -> ModelFile:
    """Rebuild the model from a model file's own config (weights from the file; the original
    pretrained-weights file is not needed). Every way the file can be wrong is one
    DentfedError naming the file."""
    path = find_model_file(model_path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DentfedError(f"{path.name}: not a readable dentfed checkpoint "
                           f"({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or not set(REQUIRED_KEYS) <= set(ckpt):
        raise DentfedError(f"{path.name}: not a dentfed checkpoint (needs state_dict, config, "
                           "labels)")
    if ckpt.get("kind") == "encoder" or path.name == ENCODER_FILE:
        raise DentfedError(f"{path.name}: a pretrained encoder without a task head; fine-tune "
                           "it (model.pretrained) before predicting")
    cfg = config_from_dict(ckpt["config"], source=f"{path.name} config")
    if cfg.task.type == "pretrain":
        raise DentfedError(f"{path.name}: a pretraining run's model (encoder and decoder) "
                           "predicts no labels; its encoder.pt initialises a classifier "
                           "(model.pretrained: the run folder)")
    if list(ckpt["labels"]) != list(cfg.task.labels):
        raise DentfedError(f"{path.name}: labels {ckpt['labels']} differ from its config's "
                           f"task.labels {cfg.task.labels}")
    model = build_model(cfg.model, len(cfg.task.labels), cfg.data.image_size, load_weights=False,
                        dp_compatible=cfg.privacy.dp_sgd is not None, pretrain=pretrain_of(cfg))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise DentfedError(f"{path.name}: weights do not fit {cfg.model.name} "
                           f"({str(err).splitlines()[0]})") from None
    model.eval()
    thresholds = ckpt.get("thresholds")
    keys = ckpt.get("trainable_keys")
    return ModelFile(model, cfg, list(thresholds) if thresholds else None,
                     list(keys) if keys is not None else None, path)
