"""The staged Flower app (dentfed/app_bundle.py): the bundle `flwr run` builds from it is the
one Flower builds from the checkout itself, byte for byte, without walking ignored folders."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from dentfed.app_bundle import app_files, stage_app

REPO = Path(__file__).resolve().parents[1]
# Flower 1.42's own bundle builder asks pathspec for its deprecated pattern name
pytestmark = pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")


def _fab_hash(folder: Path) -> str:
    return hashlib.sha256(build_fab_from_disk(folder)).hexdigest()


def _toy_app(root: Path) -> Path:
    """A checkout in miniature: the real pyproject.toml and .gitignore, code, docs, and the
    folders a machine adds (a virtual environment, data, caches) with a link among them."""
    app = root / "app"
    for rel in ("server/app.py", "client/app.py", "shared/__init__.py", "docs/notes.md",
                ".venv/lib/site.py", "data/demo/img.png", "runs/r1/metrics.json",
                "shared/__pycache__/x.cpython-311.pyc", ".git/HEAD", "configs/a.yaml"):
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(f"# {rel}\n")
    for name in ("pyproject.toml", ".gitignore", "README.md", "LICENSE"):
        shutil.copyfile(REPO / name, app / name)
    os.symlink(app / "server" / "app.py", app / "client" / "link.py")
    return app


def test_ignored_folders_links_and_git_are_left_out(tmp_path):
    files = app_files(_toy_app(tmp_path))
    assert "server/app.py" in files and "configs/a.yaml" in files and ".gitignore" in files
    for left_out in (".venv/", "data/", "runs/", "__pycache__/", ".git/", "client/link.py"):
        assert not [f for f in files if left_out in f], left_out


def test_the_staged_app_gives_flower_the_same_bundle(tmp_path):
    app = _toy_app(tmp_path)
    staged = stage_app(app, tmp_path / "staged")
    assert _fab_hash(staged) == _fab_hash(app)
    with pytest.raises(FileExistsError):  # never into a folder that is there already
        stage_app(app, staged)


@pytest.mark.slow  # Flower's own build walks the whole checkout, .venv included (~7 s)
def test_the_checkout_staged_gives_flower_the_same_bundle(tmp_path):
    assert _fab_hash(stage_app(REPO, tmp_path / "staged")) == _fab_hash(REPO)
