"""A torch Dataset over a validated Manifest."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from shared.config import DataConfig
from shared.data.manifest import Manifest
from shared.data.disk_cache import ImageDiskCache
from shared.data.readers import read_image
from shared.errors import ManifestError
from shared.data.transforms import resize_transform, tensor_transform


class ImageDataset(Dataset):
    """Yields (normalised image tensor, target). Multi-label targets are float with NaN for
    unknown; multi-class targets are int64. Decoded, resized images are cached in memory when
    `cache` is set (per process), which makes later epochs several times faster on a CPU, and
    on the clinic's disk when `disk_cache` (its own cache folder, shared/data/disk_cache.py)
    is given, which makes the first epoch of later rounds and runs fast too."""

    def __init__(self, manifest: Manifest, image_size: int, train: bool, augment: bool = True,
                 cache: bool = True, disk_cache: Path | None = None,
                 policy: str | None = "default", noise_fraction: float = 0.06):
        self.m = manifest
        self.resize = resize_transform(image_size)
        self.pipelines = {mod: tensor_transform(mod, train, augment, policy, noise_fraction)
                          for mod in ("photo", "radiograph")}
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.disk = ImageDiskCache(disk_cache) if disk_cache is not None else None

    def __len__(self) -> int:
        return len(self.m)

    def _load(self, i: int) -> torch.Tensor:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        if self.disk is not None:
            img = self._load_via_disk(Path(self.m.paths[i]))
        else:
            img = self.resize(read_image(self.m.paths[i]))
        if self.cache is not None:
            self.cache[i] = img
        return img

    def _load_via_disk(self, path: Path) -> torch.Tensor:
        assert self.disk is not None
        try:
            data = path.read_bytes()
        except OSError:
            raise ManifestError(f"{path}: image file not found or unreadable") from None
        img = self.disk.get(data)
        if img is None:
            img = self.resize(read_image(path))
            self.disk.put(data, img)
        return img

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pipelines[self.m.modalities[i]](self._load(i))
        return x, torch.as_tensor(self.m.targets[i])


def make_loader(manifest: Manifest, cfg: DataConfig, train: bool, seed: int = 0,
                disk_cache: Path | None = None) -> DataLoader:
    """The DataLoader every caller uses (pooled training, clinics, baselines). Detection:
    batches of (list of 0-1 images, list of {"boxes", "labels"} targets). `disk_cache`: a
    clinic's own image cache folder (`prepare_image_cache`; classification images only)."""
    if manifest.task.type == "detection":
        return _detection_loader(manifest, cfg, train, seed)
    ds = ImageDataset(manifest, cfg.image_size, train=train, augment=cfg.augment,
                      cache=cfg.cache, disk_cache=disk_cache, policy=cfg.augment_policy,
                      noise_fraction=cfg.noise_fraction)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train, generator=g,
                      num_workers=cfg.num_workers, drop_last=False,
                      persistent_workers=cfg.num_workers > 0)


def _detection_loader(manifest: Manifest, cfg: DataConfig, train: bool, seed: int
                      ) -> DataLoader:
    import json

    import pandas as pd

    from shared.data.detection import DetectionDataset, detection_collate

    assert manifest.boxes is not None
    frame = pd.DataFrame({"path": manifest.paths, "patient_id": manifest.patient_ids,
                          "boxes": [json.dumps(b) for b in manifest.boxes]})
    modality = str(manifest.modalities[0]) if len(manifest) else cfg.modality
    ds = DetectionDataset(frame, manifest.source.parent, cfg.image_size, train,
                          cfg.augment, list(manifest.task.labels), cache=cfg.cache,
                          modality=modality)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train, generator=g,
                      num_workers=cfg.num_workers, drop_last=False,
                      collate_fn=detection_collate, persistent_workers=cfg.num_workers > 0)
