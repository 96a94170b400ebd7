"""Saliency maps: captum's gradient and Grad-CAM checked against hand-computable models, the
ViT variant, and the PNG + HTML sheet written by `dentfed predict --saliency`."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dentfed.cli import main
from dentfed.saliency import compute_maps, gradcam_maps, gradient_maps, methods_for, overlay
from shared.config import ModelConfig, VitConfig
from shared.models import build_model


class _Region(nn.Module):
    """Label 0 = 2*red + 0.5*green summed over the top-left 8x8 block; label 1 = -blue over the
    bottom-right block. Its input gradient is known exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = 2 * x[:, 0, :8, :8].sum((1, 2)) + 0.5 * x[:, 1, :8, :8].sum((1, 2))
        b = -x[:, 2, -8:, -8:].sum((1, 2))
        return torch.stack([a, b], 1)


def test_gradient_map_is_max_abs_gradient_over_channels():
    x = torch.randn(2, 3, 32, 32)
    m0, m1 = gradient_maps(_Region(), x, 0), gradient_maps(_Region(), x, 1)
    assert m0.shape == (2, 32, 32)
    expect0 = np.zeros((32, 32), np.float32)
    expect0[:8, :8] = 1  # |2| is the channel max; scaled to 1
    expect1 = np.zeros((32, 32), np.float32)
    expect1[-8:, -8:] = 1  # |-1|: the absolute value, not the signed gradient
    assert np.array_equal(m0[0], expect0) and np.array_equal(m1[1], expect1)


def test_resnet_gradcam_equals_the_weighted_layer4_activation():
    """With a head reading one layer4 channel, Grad-CAM must be that channel's (ReLU'd)
    activation, upsampled: the pooled-gradient weights of the other channels are zero."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="resnet18"), 2, 64).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.weight[1, 7] = 1.0
    acts = {}
    model.layer4.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach()))
    x = torch.randn(1, 3, 64, 64)
    cam = gradcam_maps(model, x, 1)[0]
    a = acts["a"][0, 7].clamp_min(0)
    ref = torch.nn.functional.interpolate(a[None, None], size=(64, 64), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    ref = np.clip(ref / np.percentile(ref, 99), 0, 1)
    assert a.shape == (2, 2) and a.max() > 0
    assert np.allclose(cam, ref, atol=1e-5)


def test_vit_gradcam_is_gradcam_on_the_last_blocks_attention_input():
    """Reference by hand: tokens A entering the last block's attention (ln_1 output), weights =
    gradients averaged over tokens, CAM = ReLU(sum_d w_d A_td) over the 4x4 patch tokens in
    row-major order (class token dropped), upsampled bilinearly."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="vit", vit=VitConfig(size="tiny", patch_size=8, depth=2))
    model = build_model(cfg, 2, 32).eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the ViT head at zero
    x = torch.randn(1, 3, 32, 32)
    before = model(x).detach()
    assert methods_for(model) == ["gradient", "gradcam"]
    cam = gradcam_maps(model, x, 1)
    assert torch.allclose(model(x), before)  # the model itself was not rewired
    assert isinstance(model.encoder.layers[-1].ln_1, nn.LayerNorm)

    store = {}

    def keep(mod, inp, out):
        out.retain_grad()
        store["a"] = out

    hook = model.encoder.layers[-1].ln_1.register_forward_hook(keep)
    model(x)[0, 1].backward()
    hook.remove()
    a, g = store["a"][0].detach(), store["a"].grad[0]
    ref = torch.relu((g.mean(0, keepdim=True) * a).sum(1))[1:].reshape(1, 1, 4, 4)
    ref = torch.nn.functional.interpolate(ref, size=(32, 32), mode="bilinear")[0, 0].numpy()
    ref = np.clip(ref / np.percentile(ref, 99), 0, 1)
    assert cam.shape == (1, 32, 32) and cam.max() == 1
    assert np.allclose(cam[0], ref, atol=1e-4)


def test_overlay_is_blue_where_cold_and_red_where_hot():
    img = np.full((32, 32, 3), 128, np.uint8)
    heat = np.zeros((32, 32), np.float32)
    heat[:, 16:] = 1
    out = np.asarray(overlay(img, heat)).astype(int)
    assert out.shape == (224, 224, 3)  # small inputs are upscaled for viewing
    cold, hot = out[100, 20], out[100, 200]
    assert cold[2] > cold[0] + 20 and hot[0] > hot[2] + 60 and hot[0] > hot[1] + 60


def test_predict_saliency_writes_pngs_and_a_sheet_for_every_label(tiny_run: Path, tmp_path,
                                                                 capsys):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes((tiny_run.parent / "data/img" / f"{i}.png")
                                          .read_bytes())
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tiny_run), str(images), "--out", str(out),
                 "--saliency", "--saliency-limit", "2"]) == 0
    folder = out / "saliency"
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert len(pngs) == 2 * (1 + 2 * 2)  # 2 images x (input + 2 labels x 2 methods)
    assert Image.open(folder / "0001_bright_gradcam.png").size == (224, 224)
    sheet = (folder / "sheet.html").read_text()
    refs = re.findall(r'src="([^"]+)"', sheet)
    assert refs and all((folder / r).is_file() for r in refs)
    assert "0.png" in sheet and "1.png" in sheet and "2.png" not in sheet
    assert "bright" in sheet and "Grad-CAM" in sheet
    maps = compute_maps(build_model(ModelConfig(name="mobilenet_v2"), 3, 32).eval(),
                        torch.randn(2, 3, 32, 32), [0, 2])
    assert {k: v.shape for k, v in maps.items()} == {"gradient": (2, 2, 32, 32),
                                                     "gradcam": (2, 2, 32, 32)}
