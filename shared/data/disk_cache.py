"""A clinic's cache of decoded, resized images on its own disk, reused across rounds and runs.

Decoding and resizing a JPEG or DICOM costs far more than reading back 3 x S x S bytes, and a
clinic decodes the same images in every round of every federation (a real SuperNode even starts
a fresh process for every message). The cache lives in the clinic's own state folder
(`<state-dir>/image_cache/<size>px/`): nothing in it is ever sent, and no other clinic's process
is pointed at it (each clinic has its own state folder).

Invalidation: an entry's name is a hash of the image file's bytes, so a changed image misses
and is decoded again; a different image size is another folder; a changed manifest (its bytes)
empties the cache, so images no longer listed do not linger on disk.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import torch

from shared.atomic_files import atomic_file, write_text_atomic

VERSION = "1"  # bump when the decode or resize changes what an entry holds
MANIFEST_STAMP = "manifest.sha256"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def prepare_image_cache(state_dir: Path, manifest_path: Path, image_size: int) -> Path:
    """The cache folder for these images at this size; emptied first when the manifest's bytes
    differ from the ones it was filled for."""
    root = Path(state_dir) / "image_cache"
    stamp = f"{VERSION} {_sha256(Path(manifest_path).read_bytes())}"
    have = root / MANIFEST_STAMP
    if root.is_dir() and (not have.is_file() or have.read_text().strip() != stamp):
        shutil.rmtree(root)
    folder = root / f"{image_size}px"
    folder.mkdir(parents=True, exist_ok=True)
    if not have.is_file():
        write_text_atomic(have, stamp + "\n")
    return folder


class ImageDiskCache:
    """uint8 C x S x S tensors by image content, in one clinic's cache folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def _entry(self, data: bytes) -> Path:
        return self.folder / f"{_sha256(data)[:40]}.npy"

    def get(self, data: bytes) -> torch.Tensor | None:
        """The cached tensor for an image file's bytes, or None."""
        entry = self._entry(data)
        try:
            arr = np.load(entry, allow_pickle=False)
        except (OSError, ValueError):  # absent, or truncated by a crash elsewhere
            self.misses += 1
            return None
        self.hits += 1
        return torch.from_numpy(arr)

    def put(self, data: bytes, image: torch.Tensor) -> None:
        with atomic_file(self._entry(data)) as tmp:
            np.save(tmp, image.numpy(), allow_pickle=False)
