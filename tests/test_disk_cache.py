"""The clinic's on-disk image cache: same tensors as a fresh decode, invalidated when an image,
the manifest or the image size changes, and kept in the clinic's own state folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from flwr.app import Context, RecordDict
from PIL import Image

from client.clinic import get_clinic
from shared.data.dataset import ImageDataset
from shared.data.disk_cache import prepare_image_cache
from shared.data.manifest import read_manifest
from tests.conftest import tiny_config, write_tiny_multilabel


def _images(ds: ImageDataset) -> list[torch.Tensor]:
    return [ds._load(i) for i in range(len(ds))]


def test_cache_gives_the_decoded_images_and_is_invalidated(tmp_path: Path):
    manifest = write_tiny_multilabel(tmp_path / "data", n=8)
    task = tiny_config().task
    m = read_manifest(manifest, task)
    state = tmp_path / "state"
    fresh = _images(ImageDataset(m, 32, train=False, cache=False))

    folder = prepare_image_cache(state, manifest, 32)
    first = ImageDataset(m, 32, train=False, cache=False, disk_cache=folder)
    assert all(torch.equal(a, b) for a, b in zip(_images(first), fresh, strict=True))
    assert first.disk.misses == 8 and first.disk.hits == 0
    assert len(list(folder.glob("*.npy"))) == 8
    again = ImageDataset(m, 32, train=False, cache=False, disk_cache=folder)  # a later round
    assert all(torch.equal(a, b) for a, b in zip(_images(again), fresh, strict=True))
    assert again.disk.hits == 8 and again.disk.misses == 0

    # an image changes on disk: that one is decoded again, the others come from the cache
    img0 = Path(m.paths[0])
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(img0)
    changed = ImageDataset(m, 32, train=False, cache=False, disk_cache=folder)
    got = _images(changed)
    assert changed.disk.misses == 1 and changed.disk.hits == 7
    assert int(got[0].min()) == 200 and torch.equal(got[1], fresh[1])

    # another image size: its own folder, nothing read from the 32 px one
    folder48 = prepare_image_cache(state, manifest, 48)
    assert folder48 != folder
    big = ImageDataset(m, 48, train=False, cache=False, disk_cache=folder48)
    assert _images(big)[1].shape == (3, 48, 48) and big.disk.misses == 8

    # the manifest changes: the cache is emptied
    df = pd.read_csv(manifest)
    df.iloc[:6].to_csv(manifest, index=False)
    folder = prepare_image_cache(state, manifest, 32)
    assert list(folder.glob("*.npy")) == [] and not folder48.exists()
    assert prepare_image_cache(state, manifest, 32) == folder  # unchanged: kept
    ImageDataset(read_manifest(manifest, task), 32, train=False, cache=False,
                 disk_cache=folder)._load(0)
    assert len(list(prepare_image_cache(state, manifest, 32).glob("*.npy"))) == 1


def test_each_clinic_reads_only_its_own_cache(tmp_path: Path):
    """Two simulated clinics with the very same image files: each fills its own state folder;
    poisoning clinic 0's cache does not reach clinic 1, whose process never opens it."""
    split = tmp_path / "split"
    for k in (0, 1):  # identical images and manifests, so content keys would collide
        write_tiny_multilabel(split / f"clinic_{k}", n=8)
    cfg = tiny_config()

    def ctx(k: int) -> Context:
        return Context(run_id=1, node_id=k + 1, node_config={"partition-id": k},
                       state=RecordDict(), run_config={"split-dir": str(split)})

    c0 = get_clinic(ctx(0), cfg)
    x0 = c0.train_loader.dataset._load(0)
    folder0 = split / "clinic_0" / "state" / "image_cache" / "32px"
    assert len(list(folder0.glob("*.npy"))) == 1
    for f in folder0.glob("*.npy"):
        np.save(f, np.zeros((3, 32, 32), np.uint8))  # clinic 0's cache now says "black"

    c1 = get_clinic(ctx(1), cfg)
    ds1 = c1.train_loader.dataset
    assert ds1.disk.folder == split / "clinic_1" / "state" / "image_cache" / "32px"
    x1 = ds1._load(0)
    assert ds1.disk.misses == 1 and ds1.disk.hits == 0
    assert torch.equal(x1, x0) and int(x1.max()) > 0
    assert len(list(ds1.disk.folder.glob("*.npy"))) == 1


def test_a_supernode_clinic_uses_the_cache_folder_dentfed_clinic_start_gives_it(tmp_path: Path):
    """On a real SuperNode the clinic has no split folder: `dentfed clinic start` names a cache
    folder per manifest in its node config, and the ClientApp fills and reads that one (it
    used none before, so every message decoded its images again)."""
    from client.clinic import _CLINICS
    from dentfed import deploy

    a = write_tiny_multilabel(tmp_path / "a", n=8)
    b = write_tiny_multilabel(tmp_path / "b", n=8)
    assert deploy.default_cache_dir(a) == deploy.default_cache_dir(a)
    assert deploy.default_cache_dir(a) != deploy.default_cache_dir(b)  # one per clinic
    cache = tmp_path / "cache_a"
    cmd = deploy.supernode_command("127.0.0.1:9092", a, a, a, cache_dir=cache, warm=True)
    node = cmd[cmd.index("--node-config") + 1]
    assert node == f'manifest="{a.resolve()}" cache-dir="{cache.resolve()}"'
    assert cmd[cmd.index("--isolation") + 1] == "process"  # the warm worker is its SuperExec
    assert "--isolation" not in deploy.supernode_command("h:1", a, a, a)

    _CLINICS.clear()  # a fresh ClientApp process, as on a SuperNode
    ctx = Context(run_id=1, node_id=1, node_config={"manifest": str(a), "cache-dir": str(cache)},
                  state=RecordDict(), run_config={})
    ds = get_clinic(ctx, tiny_config()).train_loader.dataset
    assert ds.disk.folder == cache / "image_cache" / "32px"
    ds._load(0)
    _CLINICS.clear()
    again = get_clinic(ctx, tiny_config()).train_loader.dataset  # the next message's process
    again._load(0)
    assert again.disk.hits == 1 and again.disk.misses == 0
