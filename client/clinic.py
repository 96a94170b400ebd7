"""A clinic's state and its training: the data, model and loaders built once per process, and
one round of local training or evaluation from the global arrays. Imported by the Message-API
handlers (`client/app.py`) and by the SecAgg+ legacy path (`client/secagg.py`), so neither
imports the other.

Where the data is: `node_config["manifest"]` on a real SuperNode (the clinic's own manifest
with a train/val `split` column, or none and a patient-grouped val split is made), or
`partition-id` plus the run's `split-dir` in simulation. Everything about the task, model and
optimiser comes from the server's config record; only the device is decided locally.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from torch.utils.data import DataLoader, Subset

from client.timing import mark
from shared.atomic_files import (
    torch_save_atomic,
    write_in_background,
    write_json,
    write_text_atomic,
)
from shared.config import Config, DpSgdConfig
from shared.data.dataset import make_loader
from shared.data.disk_cache import prepare_image_cache
from shared.data.manifest import Manifest, read_manifest
from shared.data.splits import hold_out
from shared.dp_sgd import DpAccount, PrivacyBudgetSpent, planned_steps
from shared.fedio import (
    EXAMPLES_KEY,
    FEDERATION_ID_KEY,
    SCAFFOLD_DELTA_KEY,
    build_global_model,
    check_federation_id,
    is_clinic_token,
    load_model_arrays,
    local_state,
    new_clinic_token,
    resumed_run,
    round_lr,
)
from shared.losses import make_loss
from shared.metrics import headline
from shared.model_file import save_model_file
from shared.models import batchnorm_names, head_only, resolve_device, set_train_mode
from shared.training import (
    GradCorrection,
    Trainer,
    evaluate,
    load_optimizer_state,
    make_optimizer,
    optimizer_state_arrays,
    optimizer_state_tensors,
    seed_everything,
)

# The clinic's own persistent Flower state (context.state), kept across rounds, never sent:
DP_ACCOUNT_KEY = "dentfed-dp-account"  # DP-SGD history (also the ledger file below)
# The DP-SGD ledger in the clinic's state folder: the account over every update it released in
# this federation, written before the reply leaves, read back by a resumed federation.
DP_LEDGER = "dp_account.json"
# The clinic's random token for this federation (shared/fedio.py CLINIC_RECORD), in its state
# folder: sent with every reply so that the coordinator's anonymous index for this clinic
# survives a resumed federation.
CLINIC_TOKEN_FILE = "clinic_token"
OPTIMIZER_KEY = "dentfed-optimizer-state"  # federation.keep_optimizer_state
SCAFFOLD_CI_KEY = "dentfed-scaffold-ci"  # SCAFFOLD: the clinic's control variate c_i
LOCAL_BN_KEY = "dentfed-local-bn"  # FedBN: the clinic's own BatchNorm state
RESIDUAL_KEY = "dentfed-upload-residual"  # upload int8: what rounding dropped (error feedback)
STATE_ROUND_KEY = "dentfed-state-round"  # the round after which those were saved
ROUND_STATE = (OPTIMIZER_KEY, SCAFFOLD_CI_KEY, LOCAL_BN_KEY, RESIDUAL_KEY)
# The large ones (the optimiser's moments are 1-2x the model, the residual 1x the exchanged
# arrays) live only in the clinic's state folder when it has one, and come into context.state
# just for its training: in a simulation Flower keeps every virtual clinic's context in the
# ServerApp's process and ships it to the actor and back with each message, so otherwise they
# sat in memory for all clinics at once; on a SuperNode the Context travels SuperNode <->
# ClientApp process with every message, train and evaluate.
ON_DISK_STATE = (OPTIMIZER_KEY, SCAFFOLD_CI_KEY, RESIDUAL_KEY)
# The round state files' lock (flock): a reader waits for a write still under way.
STATE_LOCK_FILE = ".round-state.lock"
# Set by the warm clinic worker (dentfed/clinic_worker.py, the same name there) in each
# ClientApp process it forks: that process waits for background writes before it exits.
EXIT_WAITS_FOR_WRITES_ENV = "DENTFED_EXIT_WAITS_FOR_WRITES"
# Round state as tensors, key -> name -> tensor: what a clinic's state file holds.
RoundTensors = dict[str, dict[str, torch.Tensor]]
log = logging.getLogger("dentfed.client")


@dataclass
class Clinic:
    """A clinic's data, built once per process and reused across rounds (the image cache makes
    rounds after the first much faster), and the process's one model (`_MODELS`)."""

    cfg: Config
    train: Manifest
    val: Manifest
    model: torch.nn.Module
    device: torch.device
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    loss_fn: torch.nn.Module
    initial_local: dict[str, torch.Tensor]  # FedBN: the BatchNorm state before any round

    def load(self, context: Context, arrays: ArrayRecord) -> None:
        """The global arrays into the model, plus (FedBN) the clinic's own BatchNorm state
        from its persistent state, or the initial one before its first round."""
        load_model_arrays(self.model, arrays)
        if self.initial_local:
            own = (
                {k: torch.from_numpy(a.numpy().copy())
                 for k, a in context.state[LOCAL_BN_KEY].items()}
                if LOCAL_BN_KEY in context.state.array_records else self.initial_local)
            self.model.load_state_dict(own, strict=False)


_CLINICS: dict[tuple[str, str], Clinic] = {}
# One model per process and config, shared by every clinic the process plays (a simulation
# actor plays many), with its state before any round (FedBN's initial BatchNorm). Every
# handler loads the message's global arrays (and, under FedBN, the clinic's own BatchNorm)
# into it before use, and frozen stages are identical for all, so nothing a clinic computes
# depends on which clinic used the model before.
_MODELS: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}


def clinic_manifest_path(context: Context) -> Path:
    node = context.node_config
    if "manifest" in node:
        return Path(str(node["manifest"]))
    if "partition-id" in node:
        split_dir = str(context.run_config.get("split-dir", ""))
        if not split_dir:
            raise RuntimeError("simulation run without split-dir in the run config")
        return Path(split_dir) / f"clinic_{int(node['partition-id'])}" / "manifest.csv"
    raise RuntimeError("node config has neither 'manifest' nor 'partition-id'")


def clinic_state_dir(context: Context) -> Path | None:
    """Where the clinic keeps its private round state on its own disk. On a real SuperNode:
    `<state-dir>/<federation-id>/` (node config `state-dir`, which `dentfed clinic start` sets;
    run config `federation-id`, which `dentfed coordinator run` sets and keeps across
    `--resume`), so one federation never reads another's state and a resumed one finds its
    own; a run without a federation id gets `<state-dir>/run-<Flower run id>/` (its own, but
    a resumed run is a new Flower run and starts the clinic's state fresh). In simulation:
    `<split-dir>/clinic_<k>/state` (the split folder is per run)."""
    node = context.node_config
    if "state-dir" in node:
        fid = str(context.run_config.get(FEDERATION_ID_KEY, ""))
        name = check_federation_id(fid) if fid else f"run-{int(context.run_id)}"
        folder = Path(str(node["state-dir"])) / name
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # this user only
        return folder
    split_dir = str(context.run_config.get("split-dir", ""))
    if "partition-id" in node and split_dir:
        return Path(split_dir) / f"clinic_{int(node['partition-id'])}" / "state"
    return None


def clinic_token(context: Context) -> str | None:
    """This clinic's token for this federation: 16 random hex digits (`secrets`), made at its
    first reply and kept in its state folder (`CLINIC_TOKEN_FILE`, atomic write), so it is
    the same in a resumed federation (the same folder) and new in another federation (another
    folder). None without a state folder: the clinic then sends none and the coordinator
    knows it by its Flower node id. Random, so it tells nothing about the clinic."""
    folder = clinic_state_dir(context)
    if folder is None:
        return None
    path = folder / CLINIC_TOKEN_FILE
    token = path.read_text().strip() if path.is_file() else ""
    if not is_clinic_token(token):  # none yet (or a damaged file): a new one
        token = new_clinic_token()
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # this user only
        write_text_atomic(path, token + "\n")
    return token


def clinic_cache_dir(context: Context) -> Path | None:
    """Where the clinic keeps its cache of decoded images (shared/data/disk_cache.py): node
    config `cache-dir` on a SuperNode (`dentfed clinic start` sets one per manifest, none with
    `--no-image-cache`), its state folder in simulation."""
    node = context.node_config
    if "cache-dir" in node:
        return Path(str(node["cache-dir"]))
    if "state-dir" in node:  # a SuperNode without cache-dir: no image cache
        return None
    return clinic_state_dir(context)


def restore_round_state(context: Context, server_round: int,
                        need: tuple[str, ...] = ON_DISK_STATE, direct: tuple[str, ...] = ()
                        ) -> RoundTensors:
    """Before training round t, the clinic's optimiser state and SCAFFOLD variate must be
    those after its last round before t. Flower's context.state marks that round (and holds
    them when the clinic has no state folder); a resumed federation is a new Flower run (empty
    state), and a retried round must not continue from the failed attempt: then the newest
    file saved after a round < t is read. `need`: which of the state kept on disk only to
    bring into context.state (none for evaluation, which only needs FedBN's BatchNorm).
    `direct`: keys of `need` returned as the tensors read from the file instead of put into
    context.state, for a caller that uses them at once (the optimiser's moments: an
    ArrayRecord would serialise them and decode them again, two copies of 2x the model)."""
    folder = clinic_state_dir(context)
    lock = _lock_state_files(folder, exclusive=False)  # a write still under way ends first
    try:
        return _restore_round_state(context, server_round, folder, need, direct)
    finally:
        _unlock(lock)


def _restore_round_state(context: Context, server_round: int, folder: Path | None,
                         need: tuple[str, ...], direct: tuple[str, ...]) -> RoundTensors:
    rec = context.state.config_records.get(STATE_ROUND_KEY)
    have = int(rec["round"]) if rec is not None else None
    if have is not None and have < server_round:
        missing = [k for k in need if k not in context.state.array_records]
        path = folder / f"after_round_{have}.pt" if folder is not None else None
        if not missing or path is None:
            return {}
        if path.is_file():  # what save_round_state kept on disk only
            return _put_state(context, torch.load(path, map_location="cpu", weights_only=True),
                              missing, direct)
        log.warning("round %d: the clinic's state after round %d is gone from its state "
                    "folder; reading the newest earlier one", server_round, have)
    for key in ROUND_STATE:
        if key in context.state.array_records:
            del context.state[key]
    if STATE_ROUND_KEY in context.state.config_records:
        del context.state[STATE_ROUND_KEY]
    saved = sorted((int(p.stem.rsplit("_", 1)[1]), p) for p in folder.glob("after_round_*.pt")
                   ) if folder is not None and folder.is_dir() else []
    saved = [(r, p) for r, p in saved if r < server_round]
    if not saved:
        if have is not None or server_round > 1:
            log.warning("round %d: no saved clinic state from an earlier round; the "
                        "optimiser/control variate start fresh", server_round)
        return {}
    r, path = saved[-1]
    state = torch.load(path, map_location="cpu", weights_only=True)
    taken = _put_state(context, state, [k for k in state if k not in ON_DISK_STATE or k in need],
                       direct)
    context.state[STATE_ROUND_KEY] = ConfigRecord({"round": r})
    return taken


def _put_state(context: Context, state: RoundTensors, keys: list[str],
               direct: tuple[str, ...] = ()) -> RoundTensors:
    """Put `keys` of a saved state into context.state, except those in `direct`: returned."""
    taken = {}
    for key in keys:
        if key in state and key in direct:
            taken[key] = state[key]
        elif key in state:
            context.state[key] = ArrayRecord({k: Array(t.numpy()) for k, t in state[key].items()})
    return taken


def save_round_state(context: Context, server_round: int,
                     unsaved: RoundTensors | None = None) -> None:
    """After training round t: mark the state with t and write it to the clinic's state
    folder (atomic write; the last 3 rounds are kept); the large parts (ON_DISK_STATE) then
    leave context.state. `unsaved`: the round state `local_training` kept as tensors instead
    of in context.state, written as they are (only a clinic with a state folder has any).
    In a ClientApp process of the warm clinic worker the file is written in the background
    while the reply goes out (the process waits for it before it exits); elsewhere (Flower's
    own ClientApp processes, simulation actors, which Ray may stop at the end of a run) at
    once. Either way under the folder's lock, taken before this returns, so the next
    message's `restore_round_state` reads the complete file."""
    unsaved = dict(unsaved or {})
    context.state[STATE_ROUND_KEY] = ConfigRecord({"round": server_round})
    folder = clinic_state_dir(context)
    keys = [k for k in ROUND_STATE if k in context.state.array_records and k not in unsaved]
    if folder is None or not (keys or unsaved):
        return
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # this user only
    state = unsaved
    for k in keys:
        state[k] = {n: torch.from_numpy(a.numpy().copy()) for n, a in context.state[k].items()}
        if k in ON_DISK_STATE:  # from now on on disk only; restore_round_state reads it back
            del context.state[k]
    lock = _lock_state_files(folder, exclusive=True)  # before the reply leaves: readers wait
    if os.environ.get(EXIT_WAITS_FOR_WRITES_ENV):
        # A SuperNode's ClientApp process from the warm worker: Flower pushes the reply while
        # the 2x-model optimiser state goes to disk (0.2-0.5 s of the reply's critical path).
        write_in_background(lambda: _write_round_state(state, folder, server_round),
                            f"the clinic's state after round {server_round}",
                            done=lambda: _unlock(lock))
        return
    try:
        _write_round_state(state, folder, server_round)
    finally:
        _unlock(lock)


def _lock_state_files(folder: Path | None, exclusive: bool) -> int | None:
    """An flock on the state folder's lock file (released by `_unlock`); None where there is
    no folder or no flock (Windows, which has no warm worker either: nothing writes in the
    background there)."""
    if folder is None or not folder.is_dir():
        return None
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(folder / STATE_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        raise
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its flock


def _write_round_state(state: RoundTensors, folder: Path, server_round: int) -> None:
    torch_save_atomic(state, folder / f"after_round_{server_round}.pt")
    # A file after a later round is from another timeline (an earlier run over the same
    # folder, or an attempt this one replaced): it goes, or it would push this run's files
    # out of the 3 kept below and a later round would start from the wrong state. The 3
    # newest files stay (not the last 3 rounds: a clinic sampled rarely still has the state a
    # resume after a crash mid-round needs, the newest one before that round).
    saved = sorted((int(p.stem.rsplit("_", 1)[1]), p) for p in folder.glob("after_round_*.pt"))
    for r, old in saved:
        if r > server_round:
            old.unlink(missing_ok=True)
    for _, old in [(r, q) for r, q in saved if r <= server_round][:-3]:
        old.unlink(missing_ok=True)


def _ledger_survives_resume(context: Context) -> bool:
    """Whether the clinic's state folder is the same in a resumed federation: the split
    folder's in simulation, `<state-dir>/<federation-id>/` on a SuperNode; not a folder per
    Flower run (`run-<id>`, no federation id), not Flower's context.state (no folder)."""
    node = context.node_config
    if "state-dir" in node:
        return bool(str(context.run_config.get(FEDERATION_ID_KEY, "")))
    return clinic_state_dir(context) is not None


def dp_account(context: Context, server_round: int) -> DpAccount:
    """The clinic's DP-SGD account before training this round: every update it released in
    this federation, from its ledger (`DP_LEDGER` in its state folder) or Flower's
    context.state, whichever holds more steps (it only ever grows). In a resumed federation
    (a new Flower run: empty context.state) a clinic whose account cannot have survived
    declines (PrivacyBudgetSpent) rather than start again from epsilon 0."""
    account = DpAccount.from_record(context.state.config_records.get(DP_ACCOUNT_KEY))
    folder = clinic_state_dir(context)
    path = folder / DP_LEDGER if folder is not None else None
    if path is not None and path.is_file():
        ledger = DpAccount.from_state_dict(json.loads(path.read_text())["history"])
        if ledger.steps > account.steps:
            account = ledger
    if account.steps == 0 and resumed_run(context.run_config):
        if not _ledger_survives_resume(context):
            raise PrivacyBudgetSpent(
                "privacy budget: this clinic keeps its DP-SGD account only for one Flower run "
                "(no state folder for this federation), and this run resumes a federation it "
                "may have trained in; declining to train rather than count from epsilon 0")
        log.warning("round %d: resumed federation and no DP-SGD ledger in the clinic's state "
                    "folder: its account starts at epsilon 0 (right only if it never trained "
                    "in this federation before)", server_round)
    return account


def record_dp_account(context: Context, dp: DpSgdConfig, before: DpAccount,
                      after: DpAccount, server_round: int) -> float:
    """After a DP-SGD step block and before its reply leaves: the account with those steps
    into context.state and (atomic write) the ledger, with one line per released block.
    Returns the epsilon now spent."""
    context.state[DP_ACCOUNT_KEY] = after.to_record()
    eps = after.epsilon(dp.delta)
    folder = clinic_state_dir(context)
    if folder is not None:
        path = folder / DP_LEDGER
        old = json.loads(path.read_text()) if path.is_file() else {}
        if DpAccount.from_state_dict(old.get("history", {})).steps > after.steps:
            raise RuntimeError("the DP-SGD ledger holds more steps than this account")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)  # this user only
        write_json(path, {
            "delta": dp.delta, "epsilon": eps, "steps": after.steps,
            "history": after.state_dict(),
            "releases": [*old.get("releases", []),
                         {"round": server_round, "steps": after.steps - before.steps,
                          "epsilon": eps}]})
    return eps


def keeps_round_state(cfg: Config) -> bool:
    """Whether a training round continues from state the clinic kept after its last one."""
    fed = cfg.federation
    return (fed.keep_optimizer_state or fed.strategy == "scaffold" or fed.local_bn
            or fed.upload == "int8")


def get_clinic(context: Context, cfg: Config) -> Clinic:
    path = clinic_manifest_path(context)
    key = (str(path), cfg.model_dump_json())
    if key in _CLINICS:
        return _CLINICS[key]
    m = read_manifest(path, cfg.task, default_modality=cfg.data.modality)
    mark("manifest_read")
    seed = cfg.train.seed
    if m.splits is not None and (m.splits == "val").any():
        train, val = m.subset((m.splits == "train").nonzero()[0]), \
            m.subset((m.splits == "val").nonzero()[0])
    else:
        rest, held = hold_out(m, np.arange(len(m)), cfg.data.val_fraction, seed)
        train, val = m.subset(rest), m.subset(held)
    device = resolve_device(cfg.train.device)
    # One run per process: a new config drops the previous run's clinics and model. A
    # simulation worker that plays several clinics keeps each one's data (and image cache)
    # across rounds, and one model for all of them.
    for old in [k for k in _CLINICS if k[1] != key[1]]:
        del _CLINICS[old]
    for old in [k for k in _MODELS if k != key[1]]:
        del _MODELS[old]
    if key[1] not in _MODELS:
        model = build_global_model(cfg).to(device)
        _MODELS[key[1]] = model, local_state(model)
    model, initial_local = _MODELS[key[1]]
    mark("model_built")
    local_data = cfg.data
    if cfg.federation.batch_size is not None:  # the clinic's own local batch size (FedAvg's B)
        local_data = cfg.data.model_copy(update={"batch_size": cfg.federation.batch_size})
    cache = clinic_cache_dir(context)
    disk = (prepare_image_cache(cache, path, cfg.data.image_size)
            if cache is not None and cfg.data.disk_cache else None)
    clinic = Clinic(cfg, train, val, model, device,
                    make_loader(train, local_data, train=True, seed=seed, disk_cache=disk),
                    make_loader(val, cfg.data, train=False, disk_cache=disk),
                    make_loss(cfg.task, cfg.train, train.targets,
                              per_sample=cfg.privacy.dp_sgd is not None).to(device),
                    initial_local)
    mark("loaders_ready")
    _CLINICS[key] = clinic
    return clinic


def local_training(clinic: Clinic, context: Context, global_arrays: ArrayRecord,
                   server_round: int, mu: float = 0.0, control: ArrayRecord | None = None,
                   teacher: ArrayRecord | None = None
                   ) -> tuple[dict[str, float], dict[str, ArrayRecord], RoundTensors]:
    """One round of the clinic's training from the global arrays (the one driver; DP-SGD when
    configured). Returns the scalar metrics the reply carries, any array records it carries
    besides the model (SCAFFOLD's delta c_i), and, for a clinic with a state folder, its large
    round state (ON_DISK_STATE) as tensors instead of in context.state: the new optimiser
    moments and c_i, and the int8 residual as read. `control`: SCAFFOLD's server variate c
    (None in round 1: zero). `teacher`: the coordinator's MDE teacher
    (pretrain.federated_teacher_momentum, server/teacher.py). The caller saves the round
    state (`save_round_state(context, round, state)`, when `keeps_round_state`) once its
    reply is encoded (the int8 residual is part of it)."""
    cfg = clinic.cfg
    # Seeds depend on the round only, not on how many rounds this process has already run:
    # a SuperNode starts a fresh ClientApp process per message, a simulation reuses one, and a
    # resumed federation must see the same batches as an uninterrupted one.
    seed_everything(cfg.train.seed + 1000 * server_round)
    if clinic.train_loader.generator is not None:
        clinic.train_loader.generator.manual_seed(cfg.train.seed + 1000 * server_round)
    fed, dp = cfg.federation, cfg.privacy.dp_sgd
    # With a state folder the large round state (ON_DISK_STATE) is read from the file as
    # tensors and used as they are: an ArrayRecord in context.state would serialise and decode
    # it, two copies of 1-2x the model a message. `state` ends as what the file gets next.
    on_disk = clinic_state_dir(context) is not None
    state: RoundTensors = {}
    if keeps_round_state(cfg):
        state = restore_round_state(context, server_round,
                                    direct=ON_DISK_STATE if on_disk else ())
    clinic.load(context, global_arrays)
    if teacher is not None:  # after the global arrays, which reset the teacher
        load_teacher = getattr(clinic.model, "load_teacher", None)
        if load_teacher is None:
            raise ValueError("a teacher was sent, but this is not an MDE model")
        load_teacher({k: a.numpy() for k, a in teacher.items()})
    clinic.model.to(clinic.device)
    lr = round_lr(cfg, server_round)
    opt = make_optimizer(clinic.model, cfg.train, lr=lr)
    if fed.keep_optimizer_state and OPTIMIZER_KEY in state:
        load_optimizer_state(opt, state.pop(OPTIMIZER_KEY))  # the optimiser owns them now
    elif fed.keep_optimizer_state and OPTIMIZER_KEY in context.state.array_records:
        load_optimizer_state(opt, {k: a.numpy() for k, a in
                                   context.state[OPTIMIZER_KEY].items()})
        if on_disk:  # its file stays: no second copy in training
            del context.state[OPTIMIZER_KEY]
    scaffold = (_Scaffold(clinic, context, control, state if on_disk else None)
                if fed.strategy == "scaffold" else None)
    steps = planned_steps(clinic.train_loader, fed.local_epochs, fed.local_steps)
    account = None
    if dp is not None:
        # Accounted over every update this clinic released in the federation (its ledger);
        # checked before any step, so a clinic never passes max_epsilon.
        account = dp_account(context, server_round)
    t0 = time.perf_counter()
    with Trainer(clinic.model, clinic.train_loader, clinic.loss_fn, opt, clinic.device,
                 privacy=dp, planned_steps=steps * fed.rounds, account=account,
                 grad_clip_norm=cfg.train.grad_clip_norm) as trainer:
        trainer.check_budget(steps)
        stats = trainer.run(fed.local_epochs, fed.local_steps, proximal_mu=mu,
                            grad_correction=scaffold.correction if scaffold else None)
        after = trainer.account()
    if fed.keep_optimizer_state and on_disk:  # to the state file as they are (save_round_state)
        state[OPTIMIZER_KEY] = optimizer_state_tensors(opt)
    elif fed.keep_optimizer_state:
        context.state[OPTIMIZER_KEY] = ArrayRecord(
            {k: Array(v) for k, v in optimizer_state_arrays(opt).items()})
    # The last step's gradients and the optimiser are never read again (each step starts with
    # zero_grad): free them before the state is written, not after the process's next message.
    clinic.model.zero_grad(set_to_none=True)
    del trainer, opt
    if fed.local_bn:
        context.state[LOCAL_BN_KEY] = ArrayRecord(
            {k: Array(v.numpy()) for k, v in local_state(clinic.model).items()})
    records = {}
    if scaffold is not None:
        records[SCAFFOLD_DELTA_KEY] = scaffold.finish()
    values = {
        "train_loss": stats["loss"],
        **{f"train_{k}": v for k, v in stats.items() if k.startswith("loss_")},  # detectors
        "train_seconds": time.perf_counter() - t0,
        "examples_seen": stats["examples"],
        EXAMPLES_KEY: len(clinic.train),
    }
    if after is not None and dp is not None and account is not None:
        # The training loss and the Poisson batch sizes are computed from the training images
        # outside the DP mechanism: under DP-SGD only the (private) update and epsilon go out.
        del values["train_loss"], values["examples_seen"]
        values["epsilon"] = record_dp_account(context, dp, account, after, server_round)
        log.info("DP-SGD: %d steps this round, epsilon %.3f (delta %g) over %d steps in all",
                 after.steps - account.steps, values["epsilon"], dp.delta, after.steps)
    if cfg.privacy.central is not None:
        # Client-level DP accounting needs equal weights (FedAvg of clipped updates); the
        # clinic's dataset size then stays at the clinic.
        values[EXAMPLES_KEY] = 1
    return values, records, state


class _Scaffold:
    """The clinic's side of SCAFFOLD for one round: the gradient correction c - c_i, and after
    the local steps c_i+ = the mean of the clinic's raw minibatch gradients along its local
    trajectory. For plain SGD this equals option II of Karimireddy et al. 2020,
    c_i - c + (x - y_i) / (K lr); unlike that formula it stays right under momentum, weight
    decay and Adam, which move the weights by more (or other) than lr x gradient (with SGD
    momentum 0.9 option II overestimates the variate ~10x and the corrections swamp the
    gradients). c_i+ stays in the clinic's state (`state`: the round's tensors when the clinic
    has a state folder, else context.state); c_i+ - c_i is sent."""

    def __init__(self, clinic: Clinic, context: Context, control: ArrayRecord | None,
                 state: RoundTensors | None = None):
        self.context, self.state = context, state
        self.params = {n: p for n, p in clinic.model.named_parameters() if p.requires_grad}
        start = {n: p.detach() for n, p in self.params.items()}
        zeros = {n: torch.zeros_like(p) for n, p in start.items()}

        def tensors(record: ArrayRecord | None) -> dict[str, torch.Tensor]:
            if record is None:
                return zeros
            return {n: torch.from_numpy(np.array(record[n].numpy(), copy=True)).to(p.device)
                    for n, p in start.items()}

        self.c = tensors(control)
        if state is not None:
            self.ci = ({n: state[SCAFFOLD_CI_KEY][n].to(p.device) for n, p in start.items()}
                       if SCAFFOLD_CI_KEY in state else zeros)
        else:
            self.ci = tensors(context.state[SCAFFOLD_CI_KEY]
                              if SCAFFOLD_CI_KEY in context.state.array_records else None)
        self.correction = GradCorrection([(p, self.c[n] - self.ci[n])
                                          for n, p in self.params.items()])

    def finish(self) -> ArrayRecord:
        k = max(self.correction.steps, 1)
        new = {n: acc / k for n, acc in zip(self.params, self.correction.raw_sums, strict=True)}
        if self.state is not None:
            self.state[SCAFFOLD_CI_KEY] = {n: v.cpu() for n, v in new.items()}
        else:
            self.context.state[SCAFFOLD_CI_KEY] = ArrayRecord(
                {n: Array(v.cpu().numpy()) for n, v in new.items()})
        return ArrayRecord({n: Array((new[n] - self.ci[n]).cpu().numpy()) for n in new})


def personalise(clinic: Clinic, context: Context, arrays: ArrayRecord, server_round: int
                ) -> dict[str, float]:
    """federation.personalize: the final global model (under FedBN with the clinic's own
    BatchNorm) fine-tuned on this clinic's training images for `steps` optimiser steps, the
    classifier head only or every trainable layer, through the one training driver. The
    result stays in `clinic.model` and, when the clinic has a state folder, in
    `personalised_model.pt` there (the one model-file format); it leaves the clinic only with
    cross_site.share_local_models. Returns the training scalars."""
    cfg, p = clinic.cfg, clinic.cfg.federation.personalize
    assert p is not None
    seed = cfg.train.seed + 1000 * server_round + 700
    seed_everything(seed)
    if clinic.train_loader.generator is not None:
        clinic.train_loader.generator.manual_seed(seed)
    clinic.load(context, arrays)
    clinic.model.to(clinic.device)
    with head_only(clinic.model) if p.scope == "head" else contextlib.nullcontext():
        opt = make_optimizer(clinic.model, cfg.train, lr=p.lr or cfg.train.lr)
        with Trainer(clinic.model, clinic.train_loader, clinic.loss_fn, opt,
                     clinic.device, grad_clip_norm=cfg.train.grad_clip_norm) as trainer:
            stats = trainer.run(max_steps=p.steps, desc="personalise")
    folder = clinic_state_dir(context)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        save_model_file(folder / "personalised_model.pt", clinic.model, cfg, thresholds=None)
    return stats


@torch.no_grad()
def bn_statistics(clinic: Clinic, context: Context, arrays: ArrayRecord, server_round: int
                  ) -> tuple[ArrayRecord, int]:
    """federation.bn_recalibration: the BatchNorm statistics the global model has on this
    clinic's training images (one pass, cumulative averages, no weight changes; frozen stages
    keep theirs): per-channel means and variances only, like the running statistics a
    FedAvg update already carries."""
    clinic.load(context, arrays)
    model = clinic.model
    names = set(batchnorm_names(model))
    bns = {n: m for n, m in model.named_modules() if n in names}
    saved = {n: m.momentum for n, m in bns.items()}
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the pass
    set_train_mode(model)
    seed_everything(clinic.cfg.train.seed + 1000 * server_round + 500)  # augmentation
    seen = 0
    try:
        data = clinic.train_loader.dataset
        cap = clinic.cfg.federation.bn_recalibration_images
        if cap is not None and cap < len(data):
            g = torch.Generator().manual_seed(clinic.cfg.train.seed + 1000 * server_round + 501)
            data = Subset(data, torch.randperm(len(data), generator=g)[:cap].tolist())
        for x, _ in DataLoader(data, batch_size=clinic.train_loader.batch_size):
            model(x.to(clinic.device))
            seen += len(x)
    finally:
        for n, m in bns.items():
            m.momentum = saved[n]
        model.eval()
    state = model.state_dict()
    keys = [f"{n}.{s}" for n in bns for s in ("running_mean", "running_var")]
    return ArrayRecord({k: Array(state[k].detach().cpu().numpy()) for k in keys}), seen


def evaluate_values(clinic: Clinic, arrays: ArrayRecord | None, context: Context
                    ) -> dict[str, float]:
    """The global model (under FedBN with the clinic's own BatchNorm) on the clinic's
    validation images: the scalars an evaluate reply carries. `arrays` None: the model as it
    is (a personalised or another clinic's model already loaded)."""
    if arrays is not None:
        clinic.load(context, arrays)
    clinic.model.to(clinic.device)
    res = evaluate(clinic.model, clinic.val_loader, clinic.loss_fn, clinic.cfg.task,
                   clinic.device)
    key = headline(clinic.cfg.task.type)
    value = res.get(key, float("nan"))
    return {
        "val_loss": res["loss"],
        f"val_{key}": -1.0 if value != value else value,  # -1: undefined on this clinic's val
        EXAMPLES_KEY: len(clinic.val),
    }
