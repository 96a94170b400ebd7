"""What crosses the wire between clinic and server, in one place both sides import.

Only the state that training changes is exchanged (`exchanged_keys`): trainable parameters and
the buffers of trainable stages. Frozen stages are rebuilt identically on both sides from the
same local weights file (checked by sha256) or the same seed, so they never leave a clinic.
The server's config record carries a fingerprint of its frozen state (and the sha256 of
model.pretrained); a clinic whose own differs refuses to train (`check_frozen`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from torch import nn

from shared.config import Config, config_from_yaml, dump_config
from shared.errors import DentfedError
from shared.models import (
    batchnorm_names,
    build_model,
    local_prefixes,
    mark_local,
    pretrain_of,
    resolve_pretrained,
    sha256_of,
    trainable_state_keys,
)
from shared.training import lr_factor

CONFIG_KEY = "dentfed-config"
EXAMPLES_KEY = "num-examples"
FROZEN_KEY = "frozen-sha256"
PRETRAINED_KEY = "pretrained-sha256"
# SCAFFOLD: the server's control variate (server -> clinic, with the global arrays) and a
# clinic's change of its own variate (clinic -> server, with its weights); trainable
# parameters only.
SCAFFOLD_C_KEY = "scaffold-c"
SCAFFOLD_DELTA_KEY = "scaffold-delta-c"
# pretrain.federated_teacher_momentum: the coordinator's moving average of the global
# encoders, the MDE teacher, sent with the global arrays from round 2 on (round 1's teacher
# is the global encoder itself); the encoder's arrays only.
TEACHER_KEY = "mde-teacher"
# federation.bn_recalibration: a clinic's BatchNorm statistics of the global model (evaluate
# reply) and the number of training images they were computed on (metric).
BN_STATS_KEY = "bn-stats"
BN_EXAMPLES_KEY = "bn-examples"
# Without clinic-side evaluation (fraction_evaluate 0) the statistics of round R's global
# model ride on the next round's train reply: its config names R (the model it carries is
# round R's), and the clinic computes them as an evaluate message of round R would. The last
# round's come from an evaluate message that asks for the statistics only.
BN_STATS_ROUND_KEY = "bn-stats-round"
BN_STATS_ONLY_KEY = "bn-stats-only"
# End-of-run cross-site evaluation / personalisation (federation.cross_site, .personalize):
# the evaluate message's config says which phase ("own": the global model, and the clinic's
# personalised one, on its own validation set; "shared": the other clinics' models in the
# `personalised-<j>` array records); reply metrics are named "<model>/<metric>".
CROSS_SITE_KEY = "cross-site"
LOCAL_MODEL_KEY = "local-model"  # a clinic's personalised model (share_local_models only)
GLOBAL_MODEL = "global"
PERSONALISED_MODEL = "personalised"
SHARED_PREFIX = PERSONALISED_MODEL + "-"
# Run config: the federation's stable id, made at its first start and kept in its run folder so
# that a resumed federation (a new Flower run) has the same one. A clinic keeps its private
# round state in `<state-dir>/<federation-id>/`, so one federation never reads another's. A
# random token: no path, no name, no patient id.
FEDERATION_ID_KEY = "federation-id"
_FEDERATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# Run config: true when the ServerApp continues a run folder's checkpoint (a new Flower run).
RESUME_KEY = "resume"
# Every reply (train, evaluate, a budget decline) of a clinic that keeps a state folder for the
# federation carries the config record CLINIC_RECORD {CLINIC_TOKEN_KEY: 16 hex digits}: a
# random token the clinic made for this federation and keeps in that folder
# (client/clinic.py: clinic_token). The coordinator ties the clinic's anonymous index to it,
# so a resumed federation (a new Flower run: new node ids) lists every clinic under the index
# it had. Random and one per federation, it says nothing about the clinic, its patients or its
# paths. A clinic without a state folder sends none and is known by its node id.
CLINIC_RECORD = "clinic"
CLINIC_TOKEN_KEY = "token"
_CLINIC_TOKEN = re.compile(r"[0-9a-f]{16}")


def resumed_run(run_config: Mapping[str, object]) -> bool:
    """Whether the run config says this Flower run resumes an interrupted federation (the
    ServerApp reads it to load the checkpoint; a clinic, to know that an empty Context does
    not mean nothing was spent before)."""
    return str(run_config.get(RESUME_KEY, "false")).lower() in ("true", "1", "yes")


def new_federation_id() -> str:
    return secrets.token_hex(16)


def new_clinic_token() -> str:
    return secrets.token_hex(8)


def is_clinic_token(value: object) -> bool:
    return isinstance(value, str) and _CLINIC_TOKEN.fullmatch(value) is not None


def clinic_token_of(reply: Message) -> str | None:
    """The clinic token a reply carries (CLINIC_RECORD); None for an error reply, a clinic
    that sends none, or anything that is not 16 lowercase hex digits."""
    if reply.has_error():
        return None
    rec = reply.content.config_records.get(CLINIC_RECORD)
    value = rec.get(CLINIC_TOKEN_KEY) if rec is not None else None
    return value if is_clinic_token(value) else None


def check_federation_id(value: str) -> str:
    """`value` if it is a valid federation id; it names a folder on the clinic's disk, so
    nothing but letters, digits, '-' and '_' (no '/', no '..')."""
    if not _FEDERATION_ID.fullmatch(value):
        raise DentfedError("federation-id must be 1-64 letters, digits, '-' or '_'")
    return value


def shared_model_name(clinic: int) -> str:
    """The record (and metric prefix) under which clinic `clinic`'s (anonymous index) local
    model travels to the other clinics."""
    return f"{SHARED_PREFIX}{clinic}"


def mixture_statistics(stats: list[dict[str, np.ndarray]], weights: list[float]
                       ) -> dict[str, np.ndarray]:
    """Per-channel mean and variance of the union of the clinics' images from each clinic's
    own (`<bn>.running_mean`, `<bn>.running_var`): mean = sum w_i m_i,
    var = sum w_i (v_i + m_i^2) - mean^2 (weights normalised)."""
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    out: dict[str, np.ndarray] = {}
    for key in stats[0]:
        if not key.endswith("running_mean"):
            continue
        vkey = key[:-len("running_mean")] + "running_var"
        m = sum(wi * s[key].astype(np.float64) for wi, s in zip(w, stats, strict=True))
        second = sum(wi * (s[vkey].astype(np.float64) + s[key].astype(np.float64) ** 2)
                     for wi, s in zip(w, stats, strict=True))
        out[key] = m.astype(np.float32)
        out[vkey] = np.maximum(second - m ** 2, 0.0).astype(np.float32)
    return out


class FrozenStateMismatch(DentfedError):
    """This clinic's frozen stages or pretrained file differ from the coordinator's."""


def exchanged_keys(model: nn.Module) -> list[str]:
    """Trainable state minus BatchNorm step counters (ints that averaging would turn to floats
    and that nothing uses with a fixed momentum) and minus what stays local (FedBN: every
    BatchNorm key)."""
    local = local_prefixes(model)
    return [k for k in trainable_state_keys(model) if not k.endswith("num_batches_tracked")
            and not any(k.startswith(p + ".") for p in local)]


def local_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state that never leaves the clinic under FedBN (BatchNorm of trainable stages)."""
    local = local_prefixes(model)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()
            if any(k.startswith(p + ".") for p in local)}


def personal_keys(model: nn.Module) -> list[str]:
    """A clinic's whole model as a local model travels in cross-site evaluation: what
    `exchanged_keys` names plus, under FedBN, the clinic's own BatchNorm."""
    return [k for k in trainable_state_keys(model) if not k.endswith("num_batches_tracked")]


def model_arrays(model: nn.Module, keys: list[str] | None = None) -> ArrayRecord:
    """The model's `keys` (default: `exchanged_keys`) as an ArrayRecord."""
    state = model.state_dict()
    return ArrayRecord({k: state[k].detach().cpu()
                        for k in (exchanged_keys(model) if keys is None else keys)})


def model_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's exchanged state as numpy views of its (CPU) tensors: no copy, for encoders
    that read every value once (shared/upload.py)."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().numpy() for k in exchanged_keys(model)}


def expected_shapes(model: nn.Module, keys: list[str] | None = None
                    ) -> dict[str, tuple[int, ...]]:
    state = model.state_dict()
    return {k: tuple(state[k].shape)
            for k in (exchanged_keys(model) if keys is None else keys)}


def check_arrays(arrays: ArrayRecord, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """None when `arrays` has exactly the expected names and shapes and only finite values;
    otherwise a one-line reason (no values, no paths)."""
    names = set(arrays.keys())
    if names != set(shapes):
        missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
        return f"array names differ (missing {missing[:3]}, unexpected {extra[:3]})"
    for k, arr in arrays.items():
        if tuple(arr.shape) != shapes[k]:
            return f"array {k} has shape {tuple(arr.shape)}, expected {shapes[k]}"
        if not np.all(np.isfinite(arr.numpy())):
            return f"array {k} has NaN or Inf values"
    return None


def load_model_arrays(model: nn.Module, arrays: ArrayRecord, keys: list[str] | None = None
                      ) -> None:
    """Copy exchanged arrays (or exactly `keys`) into the model; refuses wrong names, shapes
    or non-finite values."""
    problem = check_arrays(arrays, expected_shapes(model, keys))
    if problem:
        raise ValueError(problem)
    state = {k: torch.from_numpy(np.ascontiguousarray(a.numpy())) for k, a in arrays.items()}
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def arrays_nbytes(arrays: ArrayRecord) -> int:
    return int(sum(a.numpy().nbytes for a in arrays.values()))


def full_model_nbytes(model: nn.Module) -> int:
    """Size of every parameter and buffer in fp32: what sending the whole model would cost."""
    return int(sum(t.numel() * 4 for t in model.state_dict().values()))


def frozen_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of every state entry that is never
    exchanged (frozen stages, and nothing else when no stage is frozen)."""
    exchanged = set(trainable_state_keys(model))
    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        if k in exchanged:
            continue
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    return sha256_of(Path(path))


def pretrained_sha256(cfg: Config) -> str | None:
    """sha256 of model.pretrained (cached per file version), None without one."""
    if not cfg.model.pretrained:
        return None
    p = resolve_pretrained(cfg.model.pretrained)
    st = p.stat()
    return _file_sha256(str(p.resolve()), st.st_mtime_ns, st.st_size)


def config_record(cfg: Config, model: nn.Module | None = None) -> ConfigRecord:
    """The dentfed config travels server -> clinic as YAML text: one schema, one source. With
    the server's `model`, also the fingerprints a clinic checks with `check_frozen`."""
    rec = ConfigRecord({CONFIG_KEY: dump_config(cfg)})
    if model is not None:
        rec[FROZEN_KEY] = frozen_fingerprint(model)
        sha = pretrained_sha256(cfg)
        if sha is not None:
            rec[PRETRAINED_KEY] = sha
    return rec


def check_frozen(record: ConfigRecord, cfg: Config, model: nn.Module) -> None:
    """Refuse (FrozenStateMismatch) when the coordinator's fingerprints differ from this
    clinic's: training against other frozen features would silently spoil the federation."""
    want = record.get(PRETRAINED_KEY)
    if want is not None:
        have = pretrained_sha256(cfg)
        if have != want:
            raise FrozenStateMismatch(
                f"model.pretrained {cfg.model.pretrained} has sha256 {have}, the coordinator's "
                f"has {want}: every clinic needs the same weights file")
    want = record.get(FROZEN_KEY)
    if want is not None and frozen_fingerprint(model) != want:
        raise FrozenStateMismatch(
            "this clinic's frozen stages differ from the coordinator's (frozen-state sha256 "
            "mismatch): another weights file or another torch build's seeded initialisation; "
            "use the same pretrained file and torch version as the coordinator")


def config_from_record(record: ConfigRecord) -> Config:
    return config_from_yaml(str(record[CONFIG_KEY]), source="server config")


def round_lr(cfg: Config, server_round: int) -> float:
    """The clinics' learning rate in `server_round` (1-based): train.lr * lr_decay^(round-1),
    with a linear warm-up over federation.warmup_rounds and, with lr_schedule cosine, a cosine
    decay over the remaining rounds (the last round trains at a small, non-zero rate)."""
    fed = cfg.federation
    r = max(server_round, 1)
    return (cfg.train.lr * fed.lr_decay ** (r - 1)
            * lr_factor(r - 1, fed.rounds, fed.warmup_rounds, fed.lr_schedule))


def build_global_model(cfg: Config) -> nn.Module:
    """The task model, seeded so every party builds identical frozen stages (Opacus-compatible
    normalisation under privacy.dp_sgd, so clinics and server exchange the same arrays)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(cfg.task.labels), cfg.data.image_size,
                        dp_compatible=cfg.privacy.dp_sgd is not None,
                        pretrain=pretrain_of(cfg))
    if cfg.federation.local_bn:
        mark_local(model, batchnorm_names(model))
    return model
