"""Masked image modelling on the factory's ViT (`task.type: pretrain`, docs/pretraining.md).

`MaskedImageModel` wraps the torchvision VisionTransformer that `shared.models` builds (its
head replaced by an identity) with a small transformer decoder. Its forward returns the
pretraining loss, so the one training driver (`shared.training.Trainer`) trains it with the
identity objective `PretrainObjective` and nothing else changes.

- Masking: per image exactly round(mask_ratio x patches) patches are masked (at least one,
  at most all but one); the encoder sees only the visible patches (MAE).
- mae: the decoder reconstructs the pixels of every patch; the loss is the mean squared error
  over the masked patches only (optionally against per-patch normalised pixels).
- mde (masked deep embedding, Almalki et al.): the decoder predicts, for each masked patch,
  the embedding a teacher encoder computes from the whole, unmasked image. The teacher is an
  exponential moving average of the encoder and runs under no_grad (stop-gradient, as in
  data2vec and iBOT): without it the encoder could collapse to a constant embedding that
  predicts itself perfectly. Target: the layer-normed mean of the teacher's last
  `target_layers` block outputs (data2vec). Loss: mse or 1 - cosine over the masked patches.

The teacher is not part of the module's state dict (not exchanged, not saved, not in the
frozen-state fingerprint): it is re-derived from the encoder whenever weights are loaded into
the model (`load_state_dict`, i.e. from the global model at the start of a federated round)
and then follows the encoder by EMA, one update per training forward. Under
`pretrain.federated_teacher_momentum` the coordinator sends its own teacher with the global
model (server/teacher.py) and `load_teacher` sets it after the global arrays are loaded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer

from shared.config import PretrainConfig


def masked_count(num_patches: int, mask_ratio: float) -> int:
    """How many patches of an image are masked: round(mask_ratio x patches), in [1, L-1]."""
    return min(max(int(round(mask_ratio * num_patches)), 1), num_patches - 1)


def random_masking(n: int, num_patches: int, mask_ratio: float, device: torch.device,
                   generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [n, L] bool, True = masked; keep [n, L-k] indices of the visible patches in
    their original order). Every image gets exactly `masked_count` masked patches."""
    k = masked_count(num_patches, mask_ratio)
    noise = torch.rand(n, num_patches, generator=generator,
                       device="cpu" if generator is not None else device).to(device)
    order = noise.argsort(dim=1)
    keep = order[:, k:].sort(dim=1).values
    mask = torch.ones(n, num_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return mask, keep


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[n, c, h, w] -> [n, L, p*p*c], patches in the ViT's row-major order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int = 3) -> torch.Tensor:
    n, L, _ = x.shape
    s = int(math.isqrt(L))
    x = x.reshape(n, s, s, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, s * p, s * p)


def encode(vit: VisionTransformer, x: torch.Tensor, keep: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The ViT encoder on the visible patches `keep` (all when None): the final normed tokens
    [n, 1 + visible, D] (class token first) and every block's output. With keep None this is
    exactly torchvision's forward up to the head."""
    tokens = vit._process_input(x)
    pos = vit.encoder.pos_embedding
    tokens = tokens + pos[:, 1:]
    if keep is not None:
        tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
    cls = (vit.class_token + pos[:, :1]).expand(len(x), -1, -1)
    h = vit.encoder.dropout(torch.cat([cls, tokens], dim=1))
    outs = []
    for block in vit.encoder.layers:
        h = block(h)
        outs.append(h)
    return vit.encoder.ln(h), outs


class Decoder(nn.Module):
    """MAE's lightweight decoder: visible tokens plus a shared mask token at every masked
    position, learned position embeddings, `depth` transformer blocks, a linear prediction."""

    def __init__(self, num_patches: int, enc_dim: int, dim: int, depth: int, heads: int,
                 out_dim: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"pretrain.decoder_dim {dim} is not a multiple of decoder_heads "
                             f"{heads}")
        self.embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim).normal_(std=0.02))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 1 + num_patches, dim).normal_(std=0.02))
        self.blocks = nn.Sequential(*[
            EncoderBlock(heads, dim, 4 * dim, 0.0, 0.0, partial(nn.LayerNorm, eps=1e-6))
            for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)

    def forward(self, latent: torch.Tensor, keep: torch.Tensor, num_patches: int
                ) -> torch.Tensor:
        """latent [n, 1 + visible, D] -> predictions for every patch [n, L, out_dim]."""
        z = self.embed(latent)
        n, _, d = z.shape
        full = self.mask_token.expand(n, num_patches, d)
        full = full.scatter(1, keep[..., None].expand(-1, -1, d), z[:, 1:])
        h = torch.cat([z[:, :1], full], dim=1) + self.pos_embedding
        return self.pred(self.norm(self.blocks(h)))[:, 1:]


class MaskedImageModel(nn.Module):
    """The ViT encoder (`encoder`, a torchvision VisionTransformer with an identity head) and
    a decoder; `forward(x)` returns the scalar pretraining loss."""

    def __init__(self, vit: VisionTransformer, cfg: PretrainConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = vit
        self.patch = vit.patch_size
        self.num_patches = (vit.image_size // vit.patch_size) ** 2
        out = 3 * self.patch ** 2 if cfg.method == "mae" else vit.hidden_dim
        self.decoder = Decoder(self.num_patches, vit.hidden_dim, cfg.decoder_dim,
                               cfg.decoder_depth, cfg.decoder_heads, out)
        if cfg.method == "mde" and cfg.target_layers > len(vit.encoder.layers):
            raise ValueError(f"pretrain.target_layers {cfg.target_layers} exceeds the ViT's "
                             f"{len(vit.encoder.layers)} blocks")
        # Not a registered sub-module: the teacher is never in the state dict.
        object.__setattr__(self, "teacher", self._new_teacher() if cfg.method == "mde"
                           else None)

    def _new_teacher(self) -> VisionTransformer:
        t = copy.deepcopy(self.encoder)
        for p in t.parameters():
            p.requires_grad_(False)
        return t.eval()

    def _apply(self, fn, recurse: bool = True):  # .to()/.cuda() move the teacher too
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Weights from outside (the global model, a checkpoint): the teacher restarts from
        the loaded encoder."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.sync_teacher()
        return result

    @torch.no_grad()
    def sync_teacher(self) -> None:
        if self.teacher is not None:
            for t, s in zip(self.teacher.parameters(), self.encoder.parameters(), strict=True):
                t.copy_(s)

    @torch.no_grad()
    def load_teacher(self, encoder_arrays: Mapping[str, np.ndarray]) -> None:
        """Set the teacher to the given encoder weights (keys as in this model's state dict,
        `encoder.`...; every encoder parameter, nothing else): the coordinator's moving
        average under `pretrain.federated_teacher_momentum`. Call after loading the global
        arrays, which reset the teacher to the global encoder."""
        if self.teacher is None:
            raise ValueError("a teacher was sent, but this is not an MDE model")
        names = dict(self.teacher.named_parameters())
        want = {f"encoder.{n}" for n in names}
        if set(encoder_arrays) != want:
            raise ValueError(f"the teacher sent has {len(encoder_arrays)} arrays, not the "
                             f"encoder's {len(want)} (other names)")
        for k, v in encoder_arrays.items():
            t = names[k.removeprefix("encoder.")]
            if tuple(v.shape) != tuple(t.shape) or not np.all(np.isfinite(v)):
                raise ValueError(f"teacher array {k}: shape {tuple(v.shape)} or values unusable")
            t.copy_(torch.from_numpy(np.ascontiguousarray(v)).to(t.dtype))

    @torch.no_grad()
    def ema_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * encoder."""
        if self.teacher is None:
            return
        m = self.cfg.ema_momentum
        for t, s in zip(self.teacher.parameters(), self.encoder.parameters(), strict=True):
            t.mul_(m).add_(s.detach(), alpha=1 - m)

    @torch.no_grad()
    def targets(self, x: torch.Tensor) -> torch.Tensor:
        """MDE targets [n, L, D] from the teacher on the unmasked image, stop-gradient."""
        assert self.teacher is not None
        self.teacher.eval()
        _, outs = encode(self.teacher, x)
        top = [F.layer_norm(o[:, 1:].float(), o.shape[-1:])
               for o in outs[-self.cfg.target_layers:]]
        return torch.stack(top).mean(0)

    def pixel_targets(self, x: torch.Tensor) -> torch.Tensor:
        t = patchify(x, self.patch)
        if self.cfg.norm_pix_loss:
            mean, var = t.mean(-1, keepdim=True), t.var(-1, keepdim=True)
            t = (t - mean) / (var + 1e-6).sqrt()
        return t

    def forward_parts(self, x: torch.Tensor, generator: torch.Generator | None = None
                      ) -> dict[str, torch.Tensor]:
        """loss, per-patch predictions and targets, and the mask, for one batch."""
        if self.training and self.teacher is not None:
            self.ema_update()  # after the previous optimiser step; identity before the first
        mask, keep = random_masking(len(x), self.num_patches, self.cfg.mask_ratio, x.device,
                                    generator)
        latent, _ = encode(self.encoder, x, keep)
        pred = self.decoder(latent, keep, self.num_patches)
        target = self.pixel_targets(x) if self.cfg.method == "mae" else self.targets(x)
        if self.cfg.method == "mde" and self.cfg.mde_loss == "cosine":
            per_patch = 1 - F.cosine_similarity(pred, target, dim=-1)
        else:
            per_patch = ((pred - target) ** 2).mean(-1)
        m = mask.to(per_patch.dtype)
        loss = (per_patch * m).sum() / m.sum()
        return {"loss": loss, "pred": pred, "target": target, "mask": mask}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Evaluation masks with a fixed generator, so validation losses compare across epochs.
        gen = None if self.training else torch.Generator().manual_seed(0)
        return self.forward_parts(x, gen)["loss"]

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The encoder's weights in torchvision's VisionTransformer layout (no head)."""
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}


class PretrainObjective(nn.Module):
    """The loss function of a pretrain task: the model already returned its loss."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return output


class PaperAugment(nn.Module):
    """The implant paper's radiograph augmentation on a float image in [0, 1]: random noise
    on a uniformly drawn fraction (up to `noise_fraction`) of the pixels, horizontal and
    vertical flips and a rotation by a random multiple of 90 degrees (square images)."""

    def __init__(self, noise_fraction: float = 0.06):
        super().__init__()
        self.noise_fraction = noise_fraction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noise_fraction > 0:
            frac = float(torch.rand(())) * self.noise_fraction
            hit = torch.rand(x.shape[-2:]) < frac
            x = torch.where(hit, torch.rand(x.shape[-2:]).expand_as(x), x)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        if torch.rand(()) < 0.5:
            x = x.flip(-2)
        k = int(torch.randint(0, 4, ()))
        return torch.rot90(x, k, dims=(-2, -1)) if k and x.shape[-1] == x.shape[-2] else x


@torch.no_grad()
def reconstruction_figure(model: MaskedImageModel, images: torch.Tensor, path: Path,
                          mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    """A PNG of rows original / masked / reconstructed (MAE: the predicted pixels in the
    masked patches, the visible ones kept; MDE: no pixels are predicted, so the row shows the
    per-patch cosine similarity between prediction and target embedding, masked patches)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from shared.atomic_files import atomic_file

    model.eval()
    device = next(model.parameters()).device
    x = images.to(device)
    parts = model.forward_parts(x, torch.Generator().manual_seed(0))
    p, mask = model.patch, parts["mask"]
    m_std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    m_mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)

    def show(t: torch.Tensor) -> np.ndarray:
        return (t * m_std + m_mean).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()

    pm = mask[..., None].float()
    patches = patchify(x, p)
    masked = unpatchify(patches * (1 - pm) + pm * patches.min(), p)
    if model.cfg.method == "mae":
        pred = parts["pred"]
        if model.cfg.norm_pix_loss:
            mu, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mu
        third = show(unpatchify(patches * (1 - pm) + pred * pm, p))
        title = "reconstructed"
    else:
        cos = F.cosine_similarity(parts["pred"], parts["target"], dim=-1)
        s = int(math.isqrt(model.num_patches))
        third = (cos * mask).reshape(-1, s, s).clamp(0, 1).cpu().numpy()
        title = "MDE cosine(pred, target)"
    rows = [("original", show(x)), ("masked", show(masked)), (title, third)]
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5.2), squeeze=False)
    for r, (name, imgs) in enumerate(rows):
        for c in range(n):
            ax = axes[r][c]
            ax.imshow(imgs[c], cmap="gray" if imgs[c].ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"{model.cfg.method.upper()} mask ratio {model.cfg.mask_ratio:g}", fontsize=9)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
