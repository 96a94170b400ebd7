"""Shared fixtures: small real image datasets written to tmp_path, and the ../shared location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from shared.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
# Two cores: one torch thread per xdist worker (`pytest -n 2`), both when run alone.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


def pytest_collection_modifyitems(config, items) -> None:
    """Slow tests first (in file order), then the rest: with `-n 2 --dist load` the two
    workers take the long real-process runs in turns from the start and the short tests fill
    the end, instead of one worker finishing alone on a long run at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session", autouse=True)
def _one_tracking_store(tmp_path_factory) -> None:
    """Every run a test starts is tracked (the default), into one SQLite store per session:
    creating a store costs seconds, logging to an existing one well under one. Tests of the
    default local store beside the run folder unset this."""
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"


def shared_dir() -> Path | None:
    """../shared (or $DENTFED_SHARED) when present; tests that need it skip otherwise."""
    p = Path(os.environ.get("DENTFED_SHARED", REPO.parent / "shared"))
    return p if (p / "data").is_dir() else None


@pytest.fixture
def shared_data() -> Path:
    p = shared_dir()
    if p is None:
        pytest.skip("../shared (DENTFED_SHARED) not present: real-data test skipped")
    return p


def write_tiny_multilabel(root: Path, n: int = 48, size: int = 32, seed: int = 0) -> Path:
    """Two learnable labels: 'bright' (a bright square) and 'stripe' (a vertical stripe); two
    images per patient; a few blanks in 'stripe'."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pid = f"P{i // 2:03d}"
        bright, stripe = int(rng.random() < 0.5), int(rng.random() < 0.5)
        arr = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        if bright:
            arr[4:16, 4:16] = 230
        if stripe:
            arr[:, size - 8:size - 4, 1] = 255
        Image.fromarray(arr).save(root / "img" / f"{i}.png")
        rows.append({"path": f"img/{i}.png", "patient_id": pid, "site": f"s{i % 2}",
                     "bright": bright, "stripe": "" if i % 11 == 5 else stripe})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def tiny_config(**train):
    return config_from_dict({
        "task": {"type": "multilabel", "labels": ["bright", "stripe"]},
        "data": {"image_size": 32, "batch_size": 16, "augment": False},
        "model": {"name": "resnet18"},
        "train": {"epochs": 3, "lr": 0.001, "loss": "bce", "progress": False, **train},
    })


@pytest.fixture
def tiny_manifest(tmp_path: Path) -> Path:
    return write_tiny_multilabel(tmp_path / "tiny")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real `dentfed train` run folder (ResNet-18 at 32 px, 2 epochs) on the tiny set; shared
    by the predict, saliency and serve tests, which must not modify it."""
    from simulations.pooled_training import run_training

    root = tmp_path_factory.mktemp("tiny_run")
    manifest = write_tiny_multilabel(root / "data", n=48)
    run_training(tiny_config(epochs=2), manifest, root / "run")
    return root / "run"
