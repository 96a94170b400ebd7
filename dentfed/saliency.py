"""Saliency maps per label, rendered as blue (cold) to red (hot) overlays, and a contact sheet.

Methods (attribution maths from captum, not hand-written):
- `gradient`: vanilla gradient of the label's score (logit) with respect to the input pixels,
  absolute value, max over the colour channels (as in the OFC study);
- `gradcam`: Grad-CAM on the last convolutional stage (ResNet `layer4`, `features[-1]` of
  MobileNet/EfficientNet-style models), or for a ViT on the token stream entering the last
  encoder block's attention (its `ln_1` output). Grad-CAM on the *output* of the last block
  would be blank: only the class token reaches the head after the last block.
Every map is scaled to [0, 1] per image and label (99th percentile = 1) before rendering, so
colours compare regions within one map, not across maps.
"""

from __future__ import annotations

import base64
import copy
import html
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from PIL import Image
from torch import nn
from torchvision.models import ResNet
from torchvision.models.vision_transformer import VisionTransformer

from shared.atomic_files import write_text_atomic
from shared.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DISPLAY_MIN = 224  # overlays of small model inputs are upscaled to at least this size


class _TokensToGrid(nn.Module):
    """[N, T, D] -> [N, D, T, 1], so Grad-CAM's channel/spatial maths sees tokens as space."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).unsqueeze(-1)


class _GridToTokens(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.squeeze(-1).transpose(1, 2)


def _vit_for_gradcam(model: VisionTransformer) -> tuple[nn.Module, nn.Module]:
    """A copy of the ViT with an identity 'tap' layer after the last block's ln_1."""
    twin = copy.deepcopy(model)
    block = twin.encoder.layers[-1]
    tap = nn.Identity()
    block.ln_1 = nn.Sequential(block.ln_1, _TokensToGrid(), tap, _GridToTokens())
    return twin, tap


def gradcam_layer(model: nn.Module) -> nn.Module | None:
    """The layer Grad-CAM uses for a CNN, or None when the architecture has no known one."""
    if isinstance(model, ResNet):
        return model.layer4
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential) and len(features):
        return features[-1]
    return None


def methods_for(model: nn.Module) -> list[str]:
    has_cam = isinstance(model, VisionTransformer) or gradcam_layer(model) is not None
    return ["gradient", "gradcam"] if has_cam else ["gradient"]


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Per map: 0 .. 99th percentile -> 0 .. 1 (one hot pixel must not wash out the rest)."""
    out = np.empty_like(maps, dtype=np.float32)
    for i, m in enumerate(maps):
        top = float(np.percentile(m, 99))
        if top <= 0:
            top = float(m.max()) or 1.0
        out[i] = np.clip(m / top, 0, 1)
    return out


def gradient_maps(model: nn.Module, x: torch.Tensor, label: int) -> np.ndarray:
    """[N, H, W] in [0, 1]: max over channels of |d score_label / d pixel|."""
    model.eval()
    with torch.enable_grad():
        g = Saliency(model).attribute(x.clone().requires_grad_(True), target=label, abs=True)
    return _normalise(g.amax(dim=1).detach().float().cpu().numpy())


def gradcam_maps(model: nn.Module, x: torch.Tensor, label: int) -> np.ndarray:
    """[N, H, W] in [0, 1]: Grad-CAM for `label`, upsampled (bilinear) to the input size."""
    model.eval()
    h, w = x.shape[-2:]
    with torch.enable_grad():
        if isinstance(model, VisionTransformer):
            twin, tap = _vit_for_gradcam(model)
            twin.eval()
            cam = LayerGradCam(twin, tap).attribute(x, target=label, relu_attributions=True)
            side = model.image_size // model.patch_size
            cam = cam[:, :, 1:, 0].reshape(len(x), 1, side, side)  # drop the class token
        else:
            layer = gradcam_layer(model)
            if layer is None:
                raise ValueError(f"no Grad-CAM layer known for {type(model).__name__}")
            cam = LayerGradCam(model, layer).attribute(x, target=label, relu_attributions=True)
        cam = LayerAttribution.interpolate(cam.detach(), (h, w), interpolate_mode="bilinear")
    return _normalise(cam[:, 0].clamp_min(0).float().cpu().numpy())


def compute_maps(model: nn.Module, x: torch.Tensor, labels: list[int],
                 methods: list[str] | None = None) -> dict[str, np.ndarray]:
    """{method: [N, len(labels), H, W]} for a batch of normalised inputs."""
    x = x.float().contiguous()
    methods = methods or methods_for(model)
    fns = {"gradient": gradient_maps, "gradcam": gradcam_maps}
    return {m: np.stack([fns[m](model, x, j) for j in labels], axis=1) for m in methods}


def denormalise(x: torch.Tensor) -> np.ndarray:
    """One normalised [3, H, W] input back to uint8 HxWx3 (what the model saw)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1)
    return (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _display_size(n: int) -> int:
    return n if n >= DISPLAY_MIN else int(np.ceil(DISPLAY_MIN / n) * n)


def overlay(image: np.ndarray, heat: np.ndarray) -> Image.Image:
    """Blend a [0, 1] map onto the image with the 'jet' colormap (blue cold, red hot); hot
    regions are more opaque so the anatomy stays visible under cold ones."""
    size = _display_size(image.shape[0])
    base = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR),
                      dtype=np.float32) / 255
    h = np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(
        (size, size), Image.BILINEAR), dtype=np.float32) / 255
    colour = matplotlib.colormaps["jet"](h)[..., :3]
    alpha = (0.2 + 0.5 * h)[..., None]
    out = (1 - alpha) * base + alpha * colour
    return Image.fromarray((out * 255).round().astype(np.uint8))


def display_image(image: np.ndarray) -> Image.Image:
    size = _display_size(image.shape[0])
    return Image.fromarray(image).resize((size, size), Image.BILINEAR)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode("ascii")


@dataclass
class SheetRow:
    """One image on the contact sheet. Image references are relative file names or data URIs."""

    name: str
    image: str
    probs: dict[str, float]
    predicted: list[str]
    shown: list[str]  # labels whose overlays are shown (predicted, else the most likely)
    overlays: dict[str, dict[str, str]]  # label -> method -> image reference
    error: str = ""


SHEET_CSS = """
body{font-family:sans-serif;margin:1em;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}
img{width:224px;height:224px;image-rendering:auto}.prob{font-size:90%}
.yes{font-weight:bold;color:#a00}.legend{height:14px;width:224px;
background:linear-gradient(to right,#00007f,#0000ff,#00ffff,#ffff00,#ff0000,#7f0000)}
.err{color:#a00}figure{display:inline-block;margin:2px}figcaption{font-size:85%}
"""

METHOD_TITLES = {"gradient": "gradient (max |grad| over colour channels)", "gradcam": "Grad-CAM"}


def sheet_body(rows: list[SheetRow], methods: list[str], thresholds: dict[str, float] | None
               ) -> str:
    """The HTML table of images, probabilities and overlays (used by the file sheet and the
    upload page)."""
    parts = ['<p>Colour scale, per map: <span class="legend" style="display:inline-block">'
             '</span> blue = little influence on the label\'s score, red = most. Methods: '
             + "; ".join(METHOD_TITLES[m] for m in methods) + ".</p>",
             "<table><tr><th>image</th><th>probabilities</th><th>saliency</th></tr>"]
    for r in rows:
        name = html.escape(r.name)
        if r.error:
            parts.append(f'<tr><td>{name}</td><td class="err" colspan="2">not read: '
                         f"{html.escape(r.error)}</td></tr>")
            continue
        probs = "<br>".join(
            f'<span class="{"yes" if lab in r.predicted else "no"}">{html.escape(lab)}: '
            f"{p:.3f}" + (f" (thr {thresholds[lab]:.2f})" if thresholds else "") + "</span>"
            for lab, p in r.probs.items())
        figs = []
        for lab in r.shown:
            note = "" if lab in r.predicted else " (most likely; not predicted)"
            for m in methods:
                src = r.overlays.get(lab, {}).get(m)
                if src:
                    figs.append(f'<figure><img src="{src}" alt="{html.escape(lab)} {m}">'
                                f"<figcaption>{html.escape(lab)} {r.probs[lab]:.3f}{note}"
                                f"<br>{m}</figcaption></figure>")
        parts.append(f'<tr><td><figure><img src="{r.image}" alt="input"><figcaption>{name}'
                     f'</figcaption></figure></td><td class="prob">{probs}</td>'
                     f'<td>{"".join(figs)}</td></tr>')
    parts.append("</table>")
    return "\n".join(parts)


def write_sheet(path: Path, title: str, rows: list[SheetRow], methods: list[str],
                thresholds: dict[str, float] | None, header: str = "") -> None:
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
           f"</title><style>{SHEET_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
           f"{header}{sheet_body(rows, methods, thresholds)}</body></html>\n")
    write_text_atomic(path, doc)
