"""The clinic's side of SecAgg+ (`privacy.secagg`).

In flwr 1.4x, SecAgg+ (`secaggplus_mod` with the server's `SecAggPlusWorkflow`) runs only on the
legacy message formats (FitIns/FitRes, NumPyClient). Rather than a second product, the
dentfed ClientApp routes those messages, and only those, to a legacy ClientApp whose
NumPyClient trains with the same `local_training` (same data, model, loop) as the Message-API
handler; `secaggplus_mod` masks its update before it leaves.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.client import Client, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client.clinic import (
    evaluate_values,
    get_clinic,
    keeps_round_state,
    local_training,
    save_round_state,
)
from shared.config import config_from_yaml
from shared.fedio import CONFIG_KEY, EXAMPLES_KEY, check_frozen, exchanged_keys, model_arrays

log = logging.getLogger("dentfed.client")
LEGACY_RECORDS = ("fitins", "evaluateins", "getparametersins", "getpropertiesins")


def is_legacy(msg: Message) -> bool:
    """A SecAgg+ stage message or a legacy Fit/Evaluate/GetParameters instruction."""
    names = [*msg.content.config_records.keys(), *msg.content.array_records.keys()]
    return RECORD_KEY_CONFIGS in names or any(n.split(".")[0] in LEGACY_RECORDS for n in names)


class ClinicNumPyClient(NumPyClient):
    """The legacy face of the clinic: arrays travel as a list in `exchanged_keys` order."""

    def __init__(self, context: Context):
        self.context = context

    def _clinic(self, config: dict):
        cfg = config_from_yaml(str(config[CONFIG_KEY]), source="server config")
        return get_clinic(self.context, cfg), int(config.get("server-round", 1))

    @staticmethod
    def _record(clinic, parameters: list[np.ndarray]) -> ArrayRecord:
        keys = exchanged_keys(clinic.model)
        if len(keys) != len(parameters):
            raise ValueError(f"expected {len(keys)} arrays, got {len(parameters)}")
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, parameters,
                                                                       strict=True)})

    def fit(self, parameters, config):
        try:
            clinic, rnd = self._clinic(config)
            check_frozen(config, clinic.cfg, clinic.model)  # as the Message-API train handler
            values, _, state = local_training(  # SecAgg+ runs plain FedAvg: no records
                clinic, self.context, self._record(clinic, parameters), rnd)
            if keeps_round_state(clinic.cfg):
                save_round_state(self.context, rnd, state)
        except Exception as e:  # same rule as the Message-API handlers: type only
            log.exception("clinic fit (SecAgg+) failed")
            raise RuntimeError(f"fit failed at the clinic ({type(e).__name__}); details are "
                               "in the clinic's log") from None
        out = model_arrays(clinic.model)
        n = int(values.pop(EXAMPLES_KEY))
        return [out[k].numpy() for k in exchanged_keys(clinic.model)], n, values

    def evaluate(self, parameters, config):
        try:
            clinic, _ = self._clinic(config)
            values = evaluate_values(clinic, self._record(clinic, parameters), self.context)
        except Exception as e:
            log.exception("clinic evaluate (SecAgg+) failed")
            raise RuntimeError(f"evaluate failed at the clinic ({type(e).__name__}); details "
                               "are in the clinic's log") from None
        n = int(values.pop(EXAMPLES_KEY))
        return float(values["val_loss"]), n, values


def _client_fn(context: Context) -> Client:
    return ClinicNumPyClient(context).to_client()


secure_app = ClientApp(client_fn=_client_fn, mods=[secaggplus_mod])
legacy_app = ClientApp(client_fn=_client_fn)  # the legacy path's evaluate (and plain fit)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Route SecAgg+ stage messages through secaggplus_mod, other legacy messages to the plain
    legacy ClientApp; Message-API messages go on."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secure_app(msg, context)
    if is_legacy(msg):
        return legacy_app(msg, context)
    return call_next(msg, context)
