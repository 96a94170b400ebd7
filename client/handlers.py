"""The clinic's message handlers (Flower's ClientApp behind `client/app.py`): trains on local
data with the shared loop (`client/clinic.py`) and replies with only the exchanged arrays
(trainable state), the example count, scalar metrics and (with a state folder) its random
clinic token for the federation. Imports torch and the training code: `client/app.py` loads
this module on the first message, not when Flower imports the app."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable

import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.audit import audit_mod
from client.central_dp import central_dp_mod
from client.clinic import (
    RESIDUAL_KEY,
    Clinic,
    bn_statistics,
    clinic_state_dir,
    clinic_token,
    evaluate_values,
    get_clinic,
    keeps_round_state,
    local_training,
    personalise,
    restore_round_state,
    save_round_state,
)
from client.secagg import secagg_mod
from client.timing import mark, timing_mod
from client.transport import packed_transport_mod
from shared.config import Config
from shared.dp_sgd import PrivacyBudgetSpent, declined_reply
from shared.fedio import (
    BN_EXAMPLES_KEY,
    BN_STATS_KEY,
    BN_STATS_ONLY_KEY,
    BN_STATS_ROUND_KEY,
    CLINIC_RECORD,
    CLINIC_TOKEN_KEY,
    CROSS_SITE_KEY,
    EXAMPLES_KEY,
    GLOBAL_MODEL,
    LOCAL_MODEL_KEY,
    PERSONALISED_MODEL,
    SCAFFOLD_C_KEY,
    SHARED_PREFIX,
    TEACHER_KEY,
    check_frozen,
    config_from_record,
    load_model_arrays,
    model_arrays,
    model_numpy,
    personal_keys,
)
from shared.memory import release_freed_memory
from shared.upload import encode_update

# packed_transport_mod: outermost; unpacks a packed message (all arrays as one, for Flower's
# per-object transport: shared/packed_transport.py) and packs the reply the same way.
# audit_mod: a no-op unless the clinic sets DENTFED_AUDIT_DIR; it records exactly what leaves,
# record by record, as the handlers wrote it (packing only joins the arrays' bytes).
# secagg_mod: SecAgg+ runs take Flower's legacy path (client/secagg.py).
# central_dp_mod: clips the update when the coordinator asks for client-side DP.
# timing_mod: a no-op unless DENTFED_TIMING_DIR is set (the deployment benchmark).
app = ClientApp(mods=[packed_transport_mod, timing_mod, audit_mod, secagg_mod, central_dp_mod])
mark("app_loaded")
log = logging.getLogger("dentfed.client")


class ClinicError(RuntimeError):
    """What the server is told when a clinic's handler fails: the exception type only."""


def private_errors(handler: Callable[[Message, Context], Message]
                   ) -> Callable[[Message, Context], Message]:
    """Flower forwards an exception's text to the server, and texts name files (paths hold
    patient ids) or values. The full error is logged here, at the clinic; the server only
    learns which kind of failure happened. Every reply, a budget decline too, carries the
    clinic's token for this federation (`with_clinic_token`)."""

    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            try:
                reply = handler(msg, context)
            except PrivacyBudgetSpent as e:  # numbers only: safe, and the coordinator needs it
                log.warning("clinic declines to train: %s", e)
                reply = declined_reply(msg, str(e), e.epsilon)  # a record the server counts
            return with_clinic_token(reply, context)
        except Exception as e:
            log.exception("clinic %s handler failed", handler.__name__)
            raise ClinicError(f"{handler.__name__} failed at the clinic "
                              f"({type(e).__name__}); details are in the clinic's log") from None
        finally:  # a simulation actor waits for its next clinic at its size, not its peak's
            release_freed_memory()
    return wrapped


def with_clinic_token(reply: Message, context: Context) -> Message:
    """`reply` with the clinic's token for this federation (config record CLINIC_RECORD) when
    the clinic has a state folder: the coordinator's anonymous index for the clinic then
    survives a resumed federation (new Flower run, new node ids). Nothing else about the
    clinic: the token is random."""
    token = clinic_token(context)
    if token is not None and not reply.has_error():
        reply.content[CLINIC_RECORD] = ConfigRecord({CLINIC_TOKEN_KEY: token})
    return reply


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
    control = (msg.content[SCAFFOLD_C_KEY] if SCAFFOLD_C_KEY in msg.content.array_records
               else None)
    stats = with_bn_statistics(clinic, context, msg)  # before training: of the model received
    teacher = (msg.content[TEACHER_KEY] if TEACHER_KEY in msg.content.array_records
               else None)
    values, extra, state = local_training(clinic, context, global_arrays, server_round,
                                          float(msg.content["config"].get("proximal-mu", 0.0)),
                                          control, teacher)
    mark("computed")
    if stats is not None:
        extra[BN_STATS_KEY] = stats[0]
        values.update(stats[1])
    metrics = MetricRecord(values)
    on_disk = clinic_state_dir(context) is not None  # then the round state is in `state`
    residual = (state.get(RESIDUAL_KEY) if on_disk else
                context.state[RESIDUAL_KEY] if RESIDUAL_KEY in context.state.array_records
                else None)
    upload = cfg.federation.upload  # a quantised update reads the model's own arrays
    records, carry = encode_update(model_arrays(clinic.model) if upload == "fp32"
                                   else model_numpy(clinic.model), global_arrays, upload,
                                   {k: a.numpy() for k, a in residual.items()} if residual
                                   else None)
    if carry is not None and on_disk:  # error feedback: what int8 rounding dropped goes next
        state[RESIDUAL_KEY] = {k: torch.from_numpy(v) for k, v in carry.items()}
    elif carry is not None:
        context.state[RESIDUAL_KEY] = ArrayRecord({k: Array(v) for k, v in carry.items()})
    if keeps_round_state(cfg):  # to the clinic's state folder; the large parts leave the Context
        save_round_state(context, server_round, state)
    return Message(content=RecordDict({**records, **extra, "metrics": metrics}), reply_to=msg)


def with_bn_statistics(clinic: Clinic, context: Context, msg: Message
                       ) -> tuple[ArrayRecord, dict[str, float]] | None:
    """A train message that names a round in BN_STATS_ROUND_KEY asks for the BatchNorm
    statistics of the global model it carries (that round's), computed exactly as that
    round's evaluate message would have: the record and its metrics, or None."""
    stats_round = msg.content["config"].get(BN_STATS_ROUND_KEY)
    if stats_round is None or not clinic.cfg.federation.bn_recalibration:
        return None
    t0 = time.perf_counter()
    stats, n = bn_statistics(clinic, context, msg.content["arrays"], int(stats_round))
    if not len(stats):
        return None
    return stats, {BN_EXAMPLES_KEY: n, "bn_statistics_seconds": time.perf_counter() - t0}


@app.evaluate()
@private_errors
def evaluate_local(msg: Message, context: Context) -> Message:
    cfg, server_round = _reply_config(msg)
    clinic = get_clinic(context, cfg)
    t0 = time.perf_counter()
    phase = msg.content["config"].get(CROSS_SITE_KEY)
    if phase is not None:
        check_frozen(msg.content["config"], cfg, clinic.model)
        content = cross_site(clinic, context, msg, str(phase), server_round)
        return Message(content=content, reply_to=msg)
    only_stats = bool(msg.content["config"].get(BN_STATS_ONLY_KEY, False))
    values = {} if only_stats else evaluate_values(clinic, msg.content["arrays"], context)
    content = RecordDict()
    if cfg.federation.bn_recalibration:
        stats, n = bn_statistics(clinic, context, msg.content["arrays"], server_round)
        if len(stats):
            content[BN_STATS_KEY] = stats
            values[BN_EXAMPLES_KEY] = n
    mark("computed")
    # The clinic's compute for this reply, as train_seconds for training (set-up excluded):
    values["evaluate_seconds"] = time.perf_counter() - t0
    content["metrics"] = MetricRecord(values)
    return Message(content=content, reply_to=msg)


def _prefixed(model: str, values: dict[str, float]) -> dict[str, float]:
    return {f"{model}/{k}": v for k, v in values.items() if k != EXAMPLES_KEY}


def cross_site(clinic: Clinic, context: Context, msg: Message, phase: str,
               server_round: int) -> RecordDict:
    """The end-of-run phases (federation.cross_site / personalize), on the evaluate path.

    "own": the final global model on this clinic's validation images and, with personalize,
    the clinic's fine-tuned model too; the personalised model is in the reply
    (`local-model`) only with cross_site.share_local_models, and not when the clinic's own
    node config says `share-local-model=false`. "shared": the other clinics'
    local models (`personalised-<j>` records) on this clinic's validation images. Only scalars
    ("<model>/val_loss", "<model>/val_<headline>", num-examples) leave otherwise."""
    fed = clinic.cfg.federation
    content = RecordDict()
    if fed.local_bn:  # a resumed run's fresh process: the clinic's BatchNorm from its disk
        restore_round_state(context, server_round + 1, need=())
    if phase == "own":
        arrays = msg.content["arrays"]
        values = _prefixed(GLOBAL_MODEL, evaluate_values(clinic, arrays, context))
        if fed.personalize is not None:
            personalise(clinic, context, arrays, server_round)
            values.update(_prefixed(PERSONALISED_MODEL, evaluate_values(clinic, None, context)))
            if fed.cross_site.share_local_models and str(context.node_config.get(
                    "share-local-model", "true")).lower() not in ("false", "0", "no"):
                content[LOCAL_MODEL_KEY] = model_arrays(clinic.model, personal_keys(clinic.model))
    elif phase == "shared":
        values = {}
        keys = personal_keys(clinic.model)
        for name, arrays in msg.content.array_records.items():
            if not name.startswith(SHARED_PREFIX):
                continue
            load_model_arrays(clinic.model, arrays, keys)
            values.update(_prefixed(name, evaluate_values(clinic, None, context)))
    else:
        raise ValueError(f"unknown {CROSS_SITE_KEY} phase {phase!r}")
    values[EXAMPLES_KEY] = len(clinic.val)
    content["metrics"] = MetricRecord(values)
    return content
