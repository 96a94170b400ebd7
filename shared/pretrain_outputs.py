"""What a pretraining run (`task.type: pretrain`) adds to its run folder, pooled or federated:
the encoder for fine-tuning (`encoder.pt`, the one model-file format) and a PNG of
reconstructions (original / masked / reconstructed) of a few evaluation images."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.config import Config
from shared.data.dataset import make_loader
from shared.data.manifest import Manifest
from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from shared.masked_modeling import MaskedImageModel, reconstruction_figure
from shared.model_file import save_encoder_file
from shared.models import ENCODER_FILE

RECONSTRUCTIONS_PNG = "reconstructions.png"


def write_pretrain_outputs(folder: Path, model: nn.Module, cfg: Config, images: Manifest,
                           n: int = 8) -> None:
    """encoder.pt and reconstructions.png (the first `n` images of `images`, unaugmented;
    the server's or the pooled run's own evaluation images, never a clinic's)."""
    if not isinstance(model, MaskedImageModel):
        raise TypeError("write_pretrain_outputs needs the masked-image model of a pretrain task")
    folder = Path(folder)
    save_encoder_file(folder / ENCODER_FILE, model, cfg)
    loader = make_loader(images.subset(torch.arange(min(n, len(images))).numpy()), cfg.data,
                         train=False)
    x = torch.cat([b for b, _ in loader])
    reconstruction_figure(model, x, folder / RECONSTRUCTIONS_PNG, IMAGENET_MEAN, IMAGENET_STD)


def loss_curve_markdown(rows: list[tuple[int, float | None, float | None]], unit: str) -> str:
    """The pretraining loss per epoch or round as a markdown table (train, validation/test)."""
    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    lines = [f"| {unit} | train loss | evaluation loss |", "|---:|---:|---:|"]
    lines += [f"| {r} | {cell(t)} | {cell(v)} |" for r, t, v in rows]
    return "\n".join(lines) + "\n"
