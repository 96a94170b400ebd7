"""What a coordinator may resume, decided from the config alone: torch-free, so that
`dentfed simulate --resume` and `dentfed coordinator run --resume` refuse early and the
simulation's parent process never loads torch (server/checkpoint.py reads the file)."""

from __future__ import annotations

from shared.config import Config
from shared.errors import DentfedError

CHECKPOINT = "checkpoint.pt"  # in the run folder, written after every completed round


def check_resumable(cfg: Config, clinic_state_kept: bool = True) -> None:
    """Refuse to resume what a checkpoint cannot continue honestly.

    DP-SGD resumes: each clinic keeps its epsilon ledger in its own state folder for this
    federation (`dp_account.json` beside its round state, written before every reply that
    releases an update; docs/privacy.md), and continues from that ledger, never from the
    checkpoint. `clinic_state_kept`: whether the resumed run finds those folders again, i.e.
    the clinics get the same folder name (simulation: the run's own split folder; deployment:
    the federation id the run folder keeps). Without it each clinic would open a fresh folder
    and spend its budget again, so DP-SGD is refused. A clinic that has no state folder at all
    (`--no-state-dir`) is something only the clinic knows: it declines to train in a resumed
    run (client/clinic.py)."""
    if cfg.privacy.dp_sgd is not None and not clinic_state_kept:
        raise DentfedError(
            "cannot resume this DP-SGD run: its run folder keeps no federation id, so the "
            "clinics would not find their epsilon ledgers (in their state folders for this "
            "federation) and would spend their budget again; start a new run with the "
            "remaining budget instead")
    if cfg.privacy.secagg is not None:
        raise DentfedError("cannot resume a SecAgg+ run: Flower's legacy workflow keeps no "
                           "checkpoint; start a new run")
