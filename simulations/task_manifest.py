"""The labelled manifest a command trains on: from the command line or the config, generating
the synthetic demo set on first use. Torch-free: `dentfed simulate`'s parent process only
splits the manifest and never loads torch (docs/speed.md, "Memory")."""

from __future__ import annotations

import logging
from pathlib import Path

from shared.config import Config
from shared.data.manifest import Manifest, read_manifest
from shared.errors import ConfigError

log = logging.getLogger(__name__)


def resolve_manifest(cfg: Config, manifest: str | Path | None) -> Path:
    """The manifest from the command line, else the config; generates the synthetic demo set
    when the config declares one (`data.synth`) and it does not exist yet."""
    path = manifest or cfg.data.manifest
    if path is None:
        raise ConfigError("no manifest: pass --manifest or set data.manifest in the config")
    path = Path(path)
    if not path.exists() and manifest is None and cfg.data.synth is not None:
        from dental_datasets import synth

        s = cfg.data.synth
        log.warning("demo manifest %s not found: generating the synthetic %s set (n=%d)",
                    path, s.task, s.n)
        made = synth.GENERATORS[s.task](path.parent, n=s.n, seed=s.seed,
                                        image_size=s.image_size)
        if made.resolve() != path.resolve():
            raise ConfigError(f"data.manifest must be <folder>/manifest.csv for a synth set; "
                              f"generated {made}")
    return path


def load_task_manifest(cfg: Config, manifest: str | Path | None) -> Manifest:
    return read_manifest(resolve_manifest(cfg, manifest), cfg.task,
                         default_modality=cfg.data.modality)
