#!/usr/bin/env bash
# Creates .venv in the repo root (if missing) and installs dentfed with its dev tools.
# torch/torchvision are pinned in pyproject.toml; pip finds them on local disk here.
# --test also installs what only the test suite needs (headless Chromium for the browser test).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# Two setuptools build-backend notices we have read would print ~50 lines to a newcomer:
# - `project.license` as a TOML table: Flower's FAB format 1 ([tool.flwr.app] fab-format-version)
#   requires exactly `license = {file = "LICENSE"}` and refuses an SPDX string (checked with
#   flwr 1.42's `flwr build`), so the table stays until Flower accepts the new form;
# - "Editable installation": the note about same-named folders, which is this repo's layout.
export PYTHONWARNINGS='ignore:`project.license` as a TOML table is deprecated,ignore:Editable installation'
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
unset PYTHONWARNINGS
echo "dentfed installed in $(pwd)/.venv"
# Headless Chromium + chromedriver for the upload-page browser test (tests/test_serve.py).
# Optional: without them (no root, no apt) that one test skips with a reason.
if [ "${1:-}" = "--test" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            chromium chromium-driver >/dev/null; } \
            || echo "note: could not install chromium/chromium-driver; the browser test will skip"
    else
        echo "note: chromium/chromium-driver missing; the browser test will skip (apt-get install" \
             "chromium chromium-driver as root to run it)"
    fi
fi
