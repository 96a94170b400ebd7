"""torchvision.transforms.v2 pipelines: resize once (cached), then augment and normalise."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_transform(image_size: int) -> v2.Transform:
    """PIL -> uint8 CHW tensor at image_size x image_size (the whole image, aspect squashed, so
    nothing at the edge of a panoramic is cropped away)."""
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])


def tensor_transform(modality: str, train: bool, augment: bool = True,
                     policy: str | None = "default", noise_fraction: float = 0.06
                     ) -> v2.Transform:
    """uint8 tensor -> normalised float tensor; random flips/rotations when training, and colour
    jitter for photos only (a radiograph's grey levels carry density, not lighting). Policy
    "paper": noise on up to `noise_fraction` of the pixels, h/v flips, 90-degree rotations
    (data.augment_policy)."""
    steps: list[v2.Transform] = []
    if train and augment and policy == "paper":
        from shared.masked_modeling import PaperAugment

        return v2.Compose([v2.ToDtype(torch.float32, scale=True), PaperAugment(noise_fraction),
                           v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    if train and augment:
        steps += [v2.RandomHorizontalFlip(), v2.RandomRotation(degrees=10)]
        if modality == "photo":
            steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)
