"""The clinic's Flower ClientApp: trains on local data with the shared loop and replies with
only the exchanged arrays (trainable state), the example count and scalar metrics.

Where the data is: `node_config["manifest"]` on a real SuperNode (the clinic's own manifest
with a train/val `split` column, or none and a patient-grouped val split is made), or
`partition-id` plus the run's `split-dir` in simulation. Everything about the task, model and
optimiser comes from the server's config record; only the device is decided locally.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.central_dp import central_dp_mod
from client.secagg import secagg_mod
from shared.config import Config
from shared.data.dataset import make_loader
from shared.data.manifest import Manifest, read_manifest
from shared.data.splits import hold_out
from shared.dp_sgd import (
    DpAccount,
    PrivacyBudgetSpent,
    check_budget,
    declined_reply,
    make_private,
    noise_for,
    planned_steps,
    sample_rate_of,
)
from shared.fedio import (
    EXAMPLES_KEY,
    build_global_model,
    check_frozen,
    config_from_record,
    load_model_arrays,
    model_arrays,
    round_lr,
)
from shared.losses import make_loss
from shared.metrics import headline
from shared.models import resolve_device
from shared.training import evaluate, make_optimizer, seed_everything, train_one_epoch
from shared.upload import encode_update

RESIDUAL_KEY = "dentfed-upload-residual"
DP_ACCOUNT_KEY = "dentfed-dp-account"  # the clinic's DP-SGD history, kept across rounds

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# audit_mod: a no-op unless the clinic sets DENTFED_AUDIT_DIR; outermost, so it records exactly
# what leaves. secagg_mod: SecAgg+ runs take Flower's legacy path (client/secagg.py).
# central_dp_mod: clips the update when the coordinator asks for client-side DP.
app = ClientApp(mods=[audit_mod, secagg_mod, central_dp_mod])
log = logging.getLogger("dentfed.client")


class ClinicError(RuntimeError):
    """What the server is told when a clinic's handler fails: the exception type only."""


def private_errors(handler: Callable[[Message, Context], Message]
                   ) -> Callable[[Message, Context], Message]:
    """Flower forwards an exception's text to the server, and texts name files (paths hold
    patient ids) or values. The full error is logged here, at the clinic; the server only
    learns which kind of failure happened."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except PrivacyBudgetSpent as e:  # numbers only: safe, and the coordinator needs it
            log.warning("clinic declines to train: %s", e)
            return declined_reply(msg, str(e))  # a structured record the server counts
        except Exception as e:
            log.exception("clinic %s handler failed", handler.__name__)
            raise ClinicError(f"{handler.__name__} failed at the clinic "
                              f"({type(e).__name__}); details are in the clinic's log") from None
    return wrapped


@dataclass
class Clinic:
    """A clinic's data and model, built once per process and reused across rounds (the image
    cache makes rounds after the first much faster)."""

    cfg: Config
    train: Manifest
    val: Manifest
    model: torch.nn.Module
    device: torch.device
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    loss_fn: torch.nn.Module


_CLINICS: dict[tuple[str, str], Clinic] = {}


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


def get_clinic(context: Context, cfg: Config) -> Clinic:
    path = clinic_manifest_path(context)
    key = (str(path), cfg.model_dump_json())
    if key in _CLINICS:
        return _CLINICS[key]
    m = read_manifest(path, cfg.task, default_modality=cfg.data.modality)
    seed = cfg.train.seed
    if m.splits is not None and (m.splits == "val").any():
        train, val = m.subset((m.splits == "train").nonzero()[0]), \
            m.subset((m.splits == "val").nonzero()[0])
    else:
        rest, held = hold_out(m, np.arange(len(m)), cfg.data.val_fraction, seed)
        train, val = m.subset(rest), m.subset(held)
    device = resolve_device(cfg.train.device)
    model = build_global_model(cfg).to(device)
    clinic = Clinic(cfg, train, val, model, device,
                    make_loader(train, cfg.data, train=True, seed=seed),
                    make_loader(val, cfg.data, train=False),
                    make_loss(cfg.task, cfg.train, train.targets,
                              per_sample=cfg.privacy.dp_sgd is not None).to(device))
    _CLINICS.clear()  # one clinic per process; drop a previous run's cache
    _CLINICS[key] = clinic
    return clinic


def _reply_config(msg: Message) -> tuple[Config, int]:
    cr = msg.content["config"]
    return config_from_record(cr), int(cr.get("server-round", 1))


@app.train()
@private_errors
def train(msg: Message, context: Context) -> Message:
    cfg, server_round = _reply_config(msg)
    clinic = get_clinic(context, cfg)
    check_frozen(msg.content["config"], cfg, clinic.model)  # same frozen features as the server
    global_arrays = msg.content["arrays"]
    values = local_training(clinic, context, global_arrays, server_round,
                            float(msg.content["config"].get("proximal-mu", 0.0)))
    metrics = MetricRecord(values)
    residual = (context.state[RESIDUAL_KEY] if RESIDUAL_KEY in context.state.array_records
                else None)
    records, carry = encode_update(model_arrays(clinic.model), global_arrays,
                                   cfg.federation.upload,
                                   {k: a.numpy() for k, a in residual.items()} if residual
                                   else None)
    if carry is not None:  # error feedback: what int8 rounding dropped goes out next round
        context.state[RESIDUAL_KEY] = ArrayRecord({k: Array(v) for k, v in carry.items()})
    return Message(content=RecordDict({**records, "metrics": metrics}), reply_to=msg)


def local_training(clinic: Clinic, context: Context, global_arrays: ArrayRecord,
                   server_round: int, mu: float = 0.0) -> dict[str, float]:
    """One round of the clinic's training from the global arrays (the one loop; DP-SGD when
    configured); returns the scalar metrics the reply carries."""
    cfg = clinic.cfg
    # Seeds depend on the round only, not on how many rounds this process has already run:
    # a SuperNode starts a fresh ClientApp process per message, a simulation reuses one, and a
    # resumed federation must see the same batches as an uninterrupted one.
    seed_everything(cfg.train.seed + 1000 * server_round)
    if clinic.train_loader.generator is not None:
        clinic.train_loader.generator.manual_seed(cfg.train.seed + 1000 * server_round)
    load_model_arrays(clinic.model, global_arrays)
    clinic.model.to(clinic.device)
    opt = make_optimizer(clinic.model, cfg.train, lr=round_lr(cfg, server_round))
    fed, dp = cfg.federation, cfg.privacy.dp_sgd
    private = None
    step_model, step_loader, step_opt = clinic.model, clinic.train_loader, opt
    if dp is not None:
        # Accounted over every round this clinic trained in: the history lives in the node's
        # persistent state. Checked before any step, so a clinic never passes max_epsilon.
        account = DpAccount.from_record(context.state.config_records.get(DP_ACCOUNT_KEY))
        q = sample_rate_of(clinic.train_loader)
        steps = planned_steps(clinic.train_loader, fed.local_epochs, fed.local_steps)
        sigma = noise_for(dp, q, steps * fed.rounds)
        check_budget(account, dp, sigma, q, steps)
        private = make_private(clinic.model, opt, clinic.train_loader, dp, sigma, account)
        step_model, step_loader, step_opt = private.module, private.loader, private.optimizer
    t0 = time.perf_counter()
    steps_left = fed.local_steps
    losses, seen = [], 0.0
    try:
        for _ in range(fed.local_epochs if steps_left is None else 10**6):
            stats = train_one_epoch(step_model, step_loader, clinic.loss_fn, step_opt,
                                    clinic.device, max_steps=steps_left, proximal_mu=mu)
            losses.append(stats["loss"] * stats["examples"])
            seen += stats["examples"]
            if steps_left is not None:
                steps_left -= int(stats["steps"])
                if steps_left <= 0:
                    break
    finally:
        if private is not None:
            private.close()
    values = {
        "train_loss": sum(losses) / max(seen, 1),
        "train_seconds": time.perf_counter() - t0,
        "examples_seen": seen,
        EXAMPLES_KEY: len(clinic.train),
    }
    if private is not None:
        # The training loss and the Poisson batch sizes are computed from the training images
        # outside the DP mechanism: under DP-SGD only the (private) update and epsilon go out.
        del values["train_loss"], values["examples_seen"]
        account = private.current()
        context.state[DP_ACCOUNT_KEY] = account.to_record()
        values["epsilon"] = account.epsilon(dp.delta)
        log.info("DP-SGD: %d steps this round, epsilon %.3f (delta %g) over %d steps in all",
                 account.steps - private.account.steps, values["epsilon"], dp.delta,
                 account.steps)
    if cfg.privacy.central is not None:
        # Client-level DP accounting needs equal weights (FedAvg of clipped updates); the
        # clinic's dataset size then stays at the clinic.
        values[EXAMPLES_KEY] = 1
    return values


@app.evaluate()
@private_errors
def evaluate_local(msg: Message, context: Context) -> Message:
    cfg, _ = _reply_config(msg)
    clinic = get_clinic(context, cfg)
    metrics = MetricRecord(evaluate_values(clinic, msg.content["arrays"]))
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


def evaluate_values(clinic: Clinic, arrays: ArrayRecord) -> dict[str, float]:
    """The global model on the clinic's validation images: the scalars an evaluate reply
    carries."""
    load_model_arrays(clinic.model, arrays)
    res = evaluate(clinic.model, clinic.val_loader, clinic.loss_fn, clinic.cfg.task,
                   clinic.device)
    key = headline(clinic.cfg.task.type)
    value = res.get(key, float("nan"))
    return {
        "val_loss": res["loss"],
        f"val_{key}": -1.0 if value != value else value,  # -1: undefined on this clinic's val
        EXAMPLES_KEY: len(clinic.val),
    }
