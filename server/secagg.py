"""SecAgg+ mode (`privacy.secagg`): the coordinator learns only the sum of the clinics' updates.

In flwr 1.4x `SecAggPlusWorkflow` runs inside the legacy `DefaultWorkflow` with a legacy
strategy and NumPyClient clinics (client/secagg.py). This module bridges to it with the
product's own pieces: the same global model and arrays (`exchanged_keys` order), the same
config record, the same central evaluation and run folder. Flower's legacy FedAvg aggregates
the unmasked sum; per-clinic updates never exist on the server, so per-clinic update checks
(RecordingGrid) do not apply here; scalar metrics are still per clinic in the replies.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, Context
from flwr.common import ndarrays_to_parameters
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from server.federation import CentralEvaluator, FederationResult, RoundRecorder
from shared.config import Config
from shared.fedio import (
    arrays_nbytes,
    build_global_model,
    config_record,
    exchanged_keys,
    full_model_nbytes,
    model_arrays,
)

log = logging.getLogger("dentfed.server")


def _weighted(metrics: list[tuple[int, dict]]) -> dict:
    total = sum(n for n, _ in metrics) or 1
    keys = {k for _, m in metrics for k, v in m.items() if isinstance(v, int | float)}
    return {k: sum(n * float(m[k]) for n, m in metrics if k in m) / total for k in keys}


def run_secagg_federation(grid: Grid, context: Context, cfg: Config,
                          test_manifest: str | Path, secure: bool = True) -> FederationResult:
    """cfg.federation.rounds rounds of FedAvg whose fit step is SecAgg+ (secure=False: Flower's
    plain legacy fit step on the same path, to compare against)."""
    model = build_global_model(cfg)
    keys = exchanged_keys(model)
    initial = model_arrays(model)
    evaluator = CentralEvaluator(cfg, test_manifest, model)
    f, s = cfg.federation, cfg.privacy.secagg
    config = dict(config_record(cfg, model))  # with the frozen-state fingerprints

    def evaluate_fn(server_round: int, ndarrays, _config):
        arrays = ArrayRecord({k: Array(v) for k, v in zip(keys, ndarrays, strict=True)})
        res = dict(evaluator(server_round, arrays))
        return float(res["loss"]), res

    strategy = LegacyFedAvg(
        fraction_fit=f.fraction_train, fraction_evaluate=f.fraction_evaluate,
        min_fit_clients=f.min_train_clinics, min_available_clients=f.min_available_clinics,
        min_evaluate_clients=f.min_evaluate_clinics if f.fraction_evaluate > 0 else 0,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {**config, "server-round": r},
        on_evaluate_config_fn=lambda r: {**config, "server-round": r},
        initial_parameters=ndarrays_to_parameters([initial[k].numpy() for k in keys]),
        fit_metrics_aggregation_fn=_weighted, evaluate_metrics_aggregation_fn=_weighted)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=f.rounds,
                                                        round_timeout=f.round_timeout),
                           strategy=strategy)
    fit = None
    if secure and s is not None:
        fit = SecAggPlusWorkflow(num_shares=s.num_shares,
                                 reconstruction_threshold=s.reconstruction_threshold,
                                 clipping_range=s.clipping_range,
                                 quantization_range=s.quantization_range,
                                 max_weight=s.max_weight, timeout=f.round_timeout)
    t0 = time.perf_counter()
    DefaultWorkflow(fit_workflow=fit)(grid, legacy)
    hist = legacy.history

    def by_round(d: dict) -> dict[int, dict[str, float]]:
        out: dict[int, dict[str, float]] = {}
        for k, pairs in d.items():
            for rnd, v in pairs:
                out.setdefault(int(rnd), {})[k] = float(v)
        return out

    return FederationResult(cfg, evaluator, RoundRecorder(),
                            by_round(hist.metrics_distributed_fit),
                            by_round(hist.metrics_distributed), time.perf_counter() - t0,
                            full_model_nbytes(model), arrays_nbytes(initial))
