"""The coordinator's checkpoint after every completed round, and resuming from it.

Flower keeps no server state across a ServerApp restart, so everything a round depends on is
saved: the global arrays, the strategy's own state (FedAdam/FedYogi/FedAdagrad moments, FedAvgM
momentum, and any `state_dict()` a strategy wrapper offers, e.g. a privacy accountant), the
round number, the history behind the report, and the RNG states (node sampling uses Python's
`random`). One file, written to a temporary name and renamed, so a crash mid-write leaves the
previous checkpoint intact. Loaded with `weights_only=True`: tensors, numbers and strings only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from server.resume import CHECKPOINT
from shared.atomic_files import torch_save_atomic, write_text_atomic
from shared.errors import DentfedError
from shared.fedio import check_federation_id

# The federation's id (run config `federation-id`, shared/fedio.py), kept in the run folder by
# the ServerApp so that `dentfed coordinator run --resume` gives the resumed run the same one
# and every clinic finds its own state folder for this federation again.
FEDERATION_ID_FILE = "federation-id"
FORMAT = 1
# Strategy attributes that carry state between rounds (flwr 1.42 FedOpt family, FedAvgM,
# SCAFFOLD's control variate, and the clipping norm that Flower's adaptive-clipping DP
# wrappers move every round).
STRATEGY_STATE = ("current_arrays", "m_t", "v_t", "momentum_vector", "clipping_norm",
                  "control")


def _to_tensors(value: Any) -> Any:
    """ArrayRecord / dict / list of numpy arrays -> the same shape with torch tensors."""
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: torch.from_numpy(a.numpy().copy())
                                    for k, a in value.items()}}
    if isinstance(value, dict):
        return {k: torch.from_numpy(np.asarray(v).copy()) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [torch.from_numpy(np.asarray(v).copy()) for v in value]
    raise TypeError(f"cannot checkpoint strategy state of type {type(value).__name__}")


def _from_tensors(value: Any) -> Any:
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord({k: Array(t.numpy()) for k, t in value["__arrayrecord__"].items()})
    if isinstance(value, dict):
        return {k: t.numpy() for k, t in value.items()}
    return [t.numpy() for t in value]


def strategy_state(strategy: Any) -> dict[str, Any]:
    state = {name: _to_tensors(getattr(strategy, name)) for name in STRATEGY_STATE
             if hasattr(strategy, name)}
    if callable(getattr(strategy, "state_dict", None)):
        state["__state_dict__"] = strategy.state_dict()
    return state


def restore_strategy_state(strategy: Any, state: dict[str, Any]) -> None:
    for name, value in state.items():
        if name == "__state_dict__":
            strategy.load_state_dict(value)
        else:
            setattr(strategy, name, _from_tensors(value))


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": json.dumps([version, list(internal), gauss]),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached), "kind": kind},
            "torch": torch.get_rng_state()}


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (see federation.Coordinator.checkpoint_state) to the run folder."""
    path = run_dir / CHECKPOINT
    torch_save_atomic({"format": FORMAT, **state}, path)
    return path


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise DentfedError(f"cannot resume: {path} does not exist (the run never completed a "
                           "round, or this is not a federated run folder)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise DentfedError(f"cannot resume: {path} is not a readable dentfed checkpoint "
                           f"({type(e).__name__})") from None
    if state.get("format") != FORMAT:
        raise DentfedError(f"cannot resume: {path} has checkpoint format "
                           f"{state.get('format')}, this dentfed writes {FORMAT}")
    return state


def kept_federation_id(run_dir: Path) -> str:
    """The federation id the run folder keeps ('' for none: a simulation, or a run folder from
    before federation ids)."""
    path = Path(run_dir) / FEDERATION_ID_FILE
    return path.read_text().strip() if path.is_file() else ""


def keep_federation_id(run_dir: Path, federation_id: str, resume: bool) -> None:
    """Record the run config's federation id in the run folder; a resumed run must carry the
    one its folder keeps, or the clinics would not find their state (optimiser moments,
    SCAFFOLD variate, int8 residual) and continue from a fresh one."""
    kept = kept_federation_id(run_dir)
    if federation_id:
        check_federation_id(federation_id)
    if resume and kept and federation_id != kept:
        raise DentfedError(f"cannot resume: the run config's federation-id is not the one in "
                           f"{Path(run_dir) / FEDERATION_ID_FILE}; `dentfed coordinator run "
                           "--resume` passes it")
    if federation_id and federation_id != kept:
        write_text_atomic(Path(run_dir) / FEDERATION_ID_FILE, federation_id + "\n")
