#!/usr/bin/env bash
# Creates .venv in the repo root (if missing) and installs dentfed with its dev tools.
# torch/torchvision are pinned in pyproject.toml; pip finds them on local disk here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "dentfed installed in $(pwd)/.venv"
