"""What every dataset module declares, in one shape (like FLamby's per-dataset modules): where
the data comes from, how its manifest is built, its natural clinic split, its default config
and the baseline figures measured on it so far."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Baseline:
    """One measured figure, with what produced it and where it is written up."""

    setting: str
    metric: str
    value: float
    command: str
    documented: str


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    task: str  # multilabel, multiclass or detection
    source: str  # where the images come from
    natural_split: str  # the clinic key the data itself offers, and how a config uses it
    config: str | None  # default config, relative to the repository root
    baselines: tuple[Baseline, ...] = field(default_factory=tuple)

    def config_path(self) -> Path | None:
        return REPO / self.config if self.config else None


def shared_root(shared: str | Path | None = None) -> Path:
    """../shared beside the checkout, or $DENTFED_SHARED, or the given folder."""
    return Path(shared or os.environ.get("DENTFED_SHARED", REPO.parent / "shared"))
