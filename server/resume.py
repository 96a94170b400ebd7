"""What a coordinator may resume, decided from the config alone: torch-free, so that
`dentfed simulate --resume` and `dentfed coordinator run --resume` refuse early and the
simulation's parent process never loads torch (server/checkpoint.py reads the file)."""

from __future__ import annotations

from shared.config import Config
from shared.errors import DentfedError

CHECKPOINT = "checkpoint.pt"  # in the run folder, written after every completed round


def check_resumable(cfg: Config) -> None:
    """Refuse to resume what a checkpoint cannot continue honestly."""
    if cfg.privacy.dp_sgd is not None:
        raise DentfedError(
            "cannot resume a DP-SGD run: each clinic keeps its epsilon account in the Flower "
            "run's node state, which a resumed run (a new Flower run) starts empty, so clinics "
            "would spend their budget again; start a new run with the remaining budget instead")
    if cfg.privacy.secagg is not None:
        raise DentfedError("cannot resume a SecAgg+ run: Flower's legacy workflow keeps no "
                           "checkpoint; start a new run")
