"""The folder `flwr run` packs into the dentfed Flower App Bundle (FAB).

`flwr run DIR` (Flower 1.42) walks every file under DIR and resolves each path before it applies
.gitignore. DIR is the checkout, which also holds the virtual environment (~57,000 files) and,
on a clinic's or researcher's machine, data/ and runs/: the walk took ~6 s of every run's
start-up on the 2-core VM, for a bundle of ~120 files. `stage_app` copies the checkout into a
small folder instead, never entering a folder .gitignore excludes (nor .git), and `flwr run`
builds from that: Flower's own filters then see the same files, so the bundle is the same, byte
for byte (tests/test_app_bundle.py compares the hashes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pathspec

ALWAYS_SKIPPED = {".git"}


def _ignore_spec(app_dir: Path) -> pathspec.GitIgnoreSpec:
    gitignore = app_dir / ".gitignore"
    lines = gitignore.read_text().splitlines() if gitignore.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines(lines)


def app_files(app_dir: Path) -> list[str]:
    """Paths (relative, POSIX) of the regular files under `app_dir` that .gitignore does not
    exclude; excluded folders are not entered. Symlinks are left out, as Flower leaves them."""
    app_dir = Path(app_dir).resolve()
    spec = _ignore_spec(app_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(app_dir, followlinks=False):
        rel = Path(dirpath).relative_to(app_dir).as_posix()
        prefix = "" if rel == "." else rel + "/"
        dirnames[:] = sorted(d for d in dirnames if d not in ALWAYS_SKIPPED
                             and not os.path.islink(os.path.join(dirpath, d))
                             and not spec.match_file(prefix + d + "/"))
        for name in sorted(filenames):
            if not os.path.islink(os.path.join(dirpath, name)) and \
                    not spec.match_file(prefix + name):
                found.append(prefix + name)
    return found


def stage_app(app_dir: Path, dest: Path) -> Path:
    """Copy the app's files (`app_files`) into the new folder `dest`; returns `dest`, the
    folder to give `flwr run`."""
    app_dir, dest = Path(app_dir).resolve(), Path(dest)
    dest.mkdir(parents=True)
    for rel in app_files(app_dir):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(app_dir / rel, target)
    return dest
