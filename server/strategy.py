"""Strategy from the config: Flower's own implementations, configured by one schema."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from shared.config import FederationConfig
from shared.fedio import SCAFFOLD_C_KEY, SCAFFOLD_DELTA_KEY

BN_STATS = ("running_mean", "running_var")
SERVER_OPTIMIZERS = ("fedadam", "fedyogi", "fedadagrad", "fedavgm")
# federation.server_lr when the config leaves it null: FedAvgM's step is a momentum average
# of the clinics' mean update (1.0 = FedAvg plus momentum); FedOpt's eta scales an
# Adam-style normalised step, for which Flower's and Reddi et al.'s default is 1e-2.
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.01, "fedyogi": 0.01, "fedadagrad": 0.01}


def server_lr(f: FederationConfig) -> float:
    """The server step size: federation.server_lr, else the strategy's default."""
    return f.server_lr if f.server_lr is not None else DEFAULT_SERVER_LR.get(f.strategy, 1.0)


def average_bn_statistics(strategy: FedAvg) -> FedAvg:
    """Server optimisers (FedAdam, FedYogi, FedAdagrad, FedAvgM) step every array along the
    averaged update, BatchNorm running statistics too, and a step can push a running variance
    below zero (NaN outputs from then on). Statistics are not gradients: this sets them to the
    example-weighted average of the clinics' values, as FedAvg would, after the optimiser step.
    Flower's FedOpt re-reads the arrays it sends each round, so its state stays consistent."""
    step = strategy.aggregate_train

    def aggregate_train(server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        arrays, metrics = step(server_round, replies)
        if arrays is None:
            return arrays, metrics
        stats = [k for k in arrays if k.endswith(BN_STATS)]
        if stats:
            mean, _ = FedAvg.aggregate_train(strategy, server_round, replies)
            for k in stats:
                arrays[k] = Array(mean[k].numpy())
        return arrays, metrics

    strategy.aggregate_train = aggregate_train  # type: ignore[method-assign]
    return strategy


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020, option II; Flower has none): the server keeps a
    control variate c, one array per trainable parameter, and sends it with the global model;
    each clinic corrects every local gradient by c - c_i (c_i: its own variate, kept in its
    persistent state) and replies with its weights and delta c_i. The new global model is the
    example-weighted mean of the clinics' weights (global step size 1), and
    c <- c + (1/N) * sum of the replies' delta c_i, N = clinics connected this round.
    `control` is checkpointed with the strategy, so a resumed run continues exactly."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.control: dict[str, np.ndarray] | None = None
        self.clinics_total = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid) -> Iterable[Message]:
        self.clinics_total = len(list(grid.get_node_ids()))
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.control is not None:  # round 1: c = 0, and the clinics know it
            record = ArrayRecord({k: Array(v) for k, v in self.control.items()})
            for m in messages:
                m.content[SCAFFOLD_C_KEY] = record
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        deltas = []
        for r in replies:
            if not r.has_error() and SCAFFOLD_DELTA_KEY in r.content.array_records:
                deltas.append({k: a.numpy() for k, a in r.content[SCAFFOLD_DELTA_KEY].items()})
                del r.content[SCAFFOLD_DELTA_KEY]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and deltas:
            self.control = update_control(self.control, deltas,
                                          max(self.clinics_total, len(deltas)))
        return arrays, metrics


def update_control(control: dict[str, np.ndarray] | None, deltas: list[dict[str, np.ndarray]],
                   clinics_total: int) -> dict[str, np.ndarray]:
    """SCAFFOLD's server variate update: c + (1/N) * sum_i delta c_i (c = 0 when None)."""
    keys = deltas[0].keys()
    base = control or {k: np.zeros_like(deltas[0][k], dtype=np.float32) for k in keys}
    return {k: (base[k] + sum(d[k] for d in deltas) / clinics_total).astype(np.float32)
            for k in keys}


def make_strategy(f: FederationConfig) -> Strategy:
    """The configured Flower strategy; node minimums are the config's clinic minimums."""
    common = dict(
        fraction_train=f.fraction_train,
        fraction_evaluate=f.fraction_evaluate,
        min_train_nodes=f.min_train_clinics,
        min_evaluate_nodes=f.min_evaluate_clinics if f.fraction_evaluate > 0 else 0,
        min_available_nodes=f.min_available_clinics,
    )
    fedopt = dict(eta=server_lr(f), tau=f.tau)
    builders = {
        "fedavg": lambda: FedAvg(**common),
        "scaffold": lambda: Scaffold(**common),
        "fedprox": lambda: FedProx(**common, proximal_mu=f.proximal_mu),
        "fedadam": lambda: FedAdam(**common, **fedopt, beta_1=f.beta_1, beta_2=f.beta_2),
        "fedyogi": lambda: FedYogi(**common, **fedopt, beta_1=f.beta_1, beta_2=f.beta_2),
        "fedadagrad": lambda: FedAdagrad(**common, **fedopt),
        "fedavgm": lambda: FedAvgM(**common, server_learning_rate=server_lr(f),
                                   server_momentum=f.server_momentum),
        "fedtrimmedavg": lambda: FedTrimmedAvg(**common, beta=f.trim_beta),
        "fedmedian": lambda: FedMedian(**common),
        "krum": lambda: Krum(**common, num_malicious_nodes=f.num_malicious_clinics),
        "multikrum": lambda: MultiKrum(**common, num_malicious_nodes=f.num_malicious_clinics,
                                       num_nodes_to_select=f.multikrum_keep
                                       or max(1, f.min_train_clinics - f.num_malicious_clinics)),
    }
    strategy = builders[f.strategy]()
    if f.strategy in SERVER_OPTIMIZERS:
        strategy = average_bn_statistics(strategy)
    return strategy
