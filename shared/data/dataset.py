"""A torch Dataset over a validated Manifest."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from shared.config import DataConfig
from shared.data.manifest import Manifest
from shared.data.readers import read_image
from shared.data.transforms import resize_transform, tensor_transform


class ImageDataset(Dataset):
    """Yields (normalised image tensor, target). Multi-label targets are float with NaN for
    unknown; multi-class targets are int64. Decoded, resized images are cached in memory when
    `cache` is set (per process), which makes later epochs several times faster on a CPU."""

    def __init__(self, manifest: Manifest, image_size: int, train: bool, augment: bool = True,
                 cache: bool = True, policy: str | None = "default",
                 noise_fraction: float = 0.06):
        self.m = manifest
        self.resize = resize_transform(image_size)
        self.pipelines = {mod: tensor_transform(mod, train, augment, policy, noise_fraction)
                          for mod in ("photo", "radiograph")}
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.m)

    def _load(self, i: int) -> torch.Tensor:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img = self.resize(read_image(self.m.paths[i]))
        if self.cache is not None:
            self.cache[i] = img
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pipelines[self.m.modalities[i]](self._load(i))
        return x, torch.as_tensor(self.m.targets[i])


def make_loader(manifest: Manifest, cfg: DataConfig, train: bool, seed: int = 0) -> DataLoader:
    """The DataLoader every caller uses (pooled training, clinics, baselines)."""
    ds = ImageDataset(manifest, cfg.image_size, train=train, augment=cfg.augment,
                      cache=cfg.cache, policy=cfg.augment_policy,
                      noise_fraction=cfg.noise_fraction)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train, generator=g,
                      num_workers=cfg.num_workers, drop_last=False,
                      persistent_workers=cfg.num_workers > 0)
