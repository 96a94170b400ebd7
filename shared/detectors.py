"""Object detectors of the one model factory (`shared.models.build_model` dispatches here when
`model.name` is a detector): torchvision Faster R-CNN and RetinaNet with an FPN over MobileNetV2,
MobileNetV3-Large or ResNet-18, and SSDlite over MobileNetV3-Large.

What the classification side has, the detectors have too: backbone weights only from a local
file (`model.pretrained`, e.g. the ImageNet MobileNetV2 features in ../shared/weights, loaded
with `model.pretrained_prefix` naming where the file's keys go, default the backbone body),
`model.freeze: k` freezing the first k backbone stages (`shared.models.stages`), and
`trainable_state_keys` naming exactly what a clinic sends. With pretrained weights the backbone's
BatchNorm becomes torchvision's FrozenBatchNorm2d (fixed statistics and affine: detection batches
of 2-8 images cannot estimate them), whose buffers never change and never travel.

Images go in as 0-1 tensors; the model's own transform normalises them (ImageNet mean/std) and
resizes to `data.image_size` (min_size = max_size), so CPU runs stay as small as the config.
Anchor sizes scale with the image size (32..512 at 512 px, torchvision's defaults).
"""

from __future__ import annotations

import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from shared.config import DETECTORS, ModelConfig

BODY = "backbone.body"  # where the backbone's features live in the FPN detectors


def is_detector(name: str) -> bool:
    return name.lower() in DETECTORS


def _norm_layer(cfg: ModelConfig) -> type[nn.Module]:
    return misc_nn_ops.FrozenBatchNorm2d if cfg.pretrained else nn.BatchNorm2d


def _fpn_backbone(backbone: str, cfg: ModelConfig, retina: bool) -> nn.Module:
    norm = _norm_layer(cfg)
    extra = LastLevelP6P7(256, 256) if retina else None
    if backbone == "resnet18":
        body = torchvision.models.resnet18(weights=None, norm_layer=norm)
        # All layers trainable here; model.freeze freezes through shared.models.freeze_stages.
        return _resnet_fpn_extractor(body, 5, returned_layers=[2, 3, 4] if retina else None,
                                     extra_blocks=extra)
    features = torchvision.models.get_model(backbone, weights=None, norm_layer=norm).features
    # The last block of the stride 8, 16 and 32 stages (a block marked _is_cn starts a new
    # stride): teeth and implant fixtures are small at CPU sizes, so stride 8 matters.
    starts = [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)]
    ends = [s - 1 for s in starts[1:]] + [len(features) - 1]
    chosen = ends[-3:]
    channels = [_out_channels(features[i]) for i in chosen]
    return BackboneWithFPN(features, {str(i): str(k) for k, i in enumerate(chosen)}, channels,
                           256, extra_blocks=extra or LastLevelMaxPool())


def _out_channels(block: nn.Module) -> int:
    if hasattr(block, "out_channels"):
        return int(block.out_channels)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


def _anchors(image_size: int, levels: int, retina: bool,
             ratios: tuple[float, ...] = (0.5, 1.0, 2.0)) -> AnchorGenerator:
    base = [max(4, round(image_size / 2 ** (4 - i))) for i in range(levels)]
    if retina:  # RetinaNet: 3 scales per level
        sizes = tuple((s, round(s * 2 ** (1 / 3)), round(s * 2 ** (2 / 3))) for s in base)
    else:
        sizes = tuple((s,) for s in base)
    return AnchorGenerator(sizes, (tuple(ratios),) * levels)


def build_detector(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """The detector `cfg.name` names, for `num_classes` box classes (plus background where
    the architecture has one), sized for `image_size` px inputs. Weights: random (seeded by
    the caller); the factory loads `cfg.pretrained` afterwards."""
    arch, backbone = DETECTORS[cfg.name.lower()]
    det = cfg.detection
    common = {"min_size": image_size, "max_size": image_size,
              "detections_per_img": det.detections_per_img}
    if arch == "ssdlite":
        model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes + 1,
            trainable_backbone_layers=None, norm_layer=_norm_layer(cfg),
            score_thresh=det.score_thresh, topk_candidates=300)
        model.transform.min_size, model.transform.max_size = (image_size,), image_size
        # SSDlite's transform resizes to a fixed size: make it the configured one.
        model.transform.fixed_size = (image_size, image_size)
        return model
    body = _fpn_backbone(backbone, cfg, retina=arch == "retinanet")
    with_pool = 1
    levels = len(body.body.return_layers) + (2 if arch == "retinanet" else with_pool)
    if arch == "retinanet":
        anchors = _anchors(image_size, levels, retina=True, ratios=det.anchor_aspect_ratios)
        return RetinaNet(body, num_classes + 1, anchor_generator=anchors,
                         score_thresh=det.score_thresh, **common)
    anchors = _anchors(image_size, levels, retina=False, ratios=det.anchor_aspect_ratios)
    size = det.box_head_size
    names = [*body.body.return_layers.values()]
    roi_pool = MultiScaleRoIAlign(featmap_names=names, output_size=7,
                                  sampling_ratio=det.roi_sampling_ratio)
    n = det.rpn_proposals
    proposals = {} if n is None else {
        "rpn_pre_nms_top_n_train": 2 * n, "rpn_post_nms_top_n_train": n,
        "rpn_pre_nms_top_n_test": 2 * n, "rpn_post_nms_top_n_test": n}
    return FasterRCNN(body, None, rpn_anchor_generator=anchors, box_roi_pool=roi_pool,
                      **proposals,
                      box_head=TwoMLPHead(body.out_channels * 7 * 7, size),
                      box_predictor=FastRCNNPredictor(size, num_classes + 1),
                      box_batch_size_per_image=det.box_batch_size_per_image,
                      box_score_thresh=det.score_thresh,
                      box_detections_per_img=common.pop("detections_per_img"), **common)


def detector_stages(model: nn.Module) -> list[list[str]]:
    """Freezable stages of a detector's backbone, input to output (for model.freeze)."""
    if hasattr(model, "backbone") and hasattr(model.backbone, "body"):
        body = model.backbone.body
        names = [n for n, _ in body.named_children()]
        if "layer1" in names:  # ResNet
            return [[f"{BODY}.conv1", f"{BODY}.bn1"],
                    *[[f"{BODY}.layer{i}"] for i in range(1, 5) if f"layer{i}" in names]]
        return [[f"{BODY}.{n}"] for n in names]
    features = getattr(getattr(model, "backbone", None), "features", None)
    if isinstance(features, nn.Sequential):  # SSDlite
        return [[f"backbone.features.{n}"] for n, _ in features.named_children()]
    return []


def default_prefix(model: nn.Module) -> str:
    """Where a backbone weights file's keys go when model.pretrained_prefix is unset: the FPN
    detectors' backbone body (a file of `mobilenet_v2().features` or a whole ResNet)."""
    return f"{BODY}." if hasattr(getattr(model, "backbone", None), "body") else ""


def pretrained_skip(model: nn.Module) -> tuple[str, ...]:
    """Keys of a backbone file the detector has no place for (a ResNet's classifier)."""
    return (f"{BODY}.fc", f"{BODY}.avgpool")

