"""The coordinator's round loop: Flower's strategy drives the rounds; dentfed adds central
evaluation on the server's own test set, per-clinic bookkeeping and the run folder.

Clinics appear in reports only as anonymous indices (order of first contact), never by node id.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted

from server.central_dp import CentralDpLedger, wrap_central_dp
from server.privacy import declined_reason
from server.strategy import make_strategy
from shared.config import Config
from shared.data.dataset import make_loader
from shared.data.manifest import read_manifest
from shared.errors import DentfedError
from shared.fedio import (
    arrays_nbytes,
    build_global_model,
    check_arrays,
    config_record,
    expected_shapes,
    full_model_nbytes,
    load_model_arrays,
    model_arrays,
)
from shared.losses import make_loss
from shared.metrics import headline
from shared.models import resolve_device
from shared.training import evaluate
from shared.upload import SCALES_KEY, decode_update

log = logging.getLogger("dentfed.server")


@dataclass
class RoundRecord:
    round: int
    train: dict[int, dict[str, float]] = field(default_factory=dict)
    evaluate: dict[int, dict[str, float]] = field(default_factory=dict)
    train_failed: int = 0
    evaluate_failed: int = 0
    rejected: dict[int, str] = field(default_factory=dict)
    declined: dict[int, str] = field(default_factory=dict)  # privacy budget spent (issue 6)
    sampled: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    evaluate_seconds: float = 0.0


class RoundRecorder:
    """Per-round, per-clinic facts taken from the messages the Grid carries."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundRecord] = {}
        self._index: dict[int, int] = {}

    def clinic(self, node_id: int) -> int:
        if node_id not in self._index:
            self._index[node_id] = len(self._index)
        return self._index[node_id]

    def record(self, sent: list[Message], replies: list[Message], seconds: float) -> None:
        if not sent:
            return
        kind = sent[0].metadata.message_type
        rnd = int(sent[0].content["config"].get("server-round", 0))
        rec = self.rounds.setdefault(rnd, RoundRecord(rnd))
        for node in sorted(m.metadata.dst_node_id for m in sent):
            self.clinic(node)
        if kind.startswith("train"):
            rec.sampled = len(sent)
            rec.seconds += seconds
        else:
            rec.evaluate_seconds += seconds
        for m in sent:
            rec.bytes_sent += sum(arrays_nbytes(a) for a in m.content.array_records.values())
        for r in replies:
            idx = self.clinic(r.metadata.src_node_id)
            if r.has_error():
                if kind.startswith("train"):
                    rec.train_failed += 1
                    note = declined_reason(r.error.reason)
                    if note:
                        rec.declined[idx] = note
                        log.warning("round %d: clinic %d declined to train: %s", rnd, idx, note)
                else:
                    rec.evaluate_failed += 1
                continue
            rec.bytes_received += sum(arrays_nbytes(a) for a in r.content.array_records.values())
            metrics = {k: float(v) for mr in r.content.metric_records.values()
                       for k, v in mr.items() if isinstance(v, int | float)}
            (rec.train if kind.startswith("train") else rec.evaluate)[idx] = metrics

    @property
    def n_clinics(self) -> int:
        return len(self._index)


class RecordingGrid:
    """A Grid that hands every message exchange to a RoundRecorder and drops clinic updates
    whose arrays are not exactly the expected names and shapes with finite values, before the
    strategy aggregates them; otherwise Flower's own Grid."""

    def __init__(self, grid: Grid, recorder: RoundRecorder,
                 shapes: dict[str, tuple[int, ...]]):
        self._grid = grid
        self._recorder = recorder
        self._shapes = shapes

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        sent = list(messages)
        t0 = time.perf_counter()
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        self._recorder.record(sent, replies, time.perf_counter() - t0)
        if not sent or not sent[0].metadata.message_type.startswith("train"):
            return replies
        rnd = int(sent[0].content["config"].get("server-round", 0))
        sent_arrays = {m.metadata.dst_node_id: m.content["arrays"] for m in sent}
        kept = []
        for r in replies:
            if not r.has_error():
                problem = self._decode(r, sent_arrays.get(r.metadata.src_node_id))
                if problem:
                    idx = self._recorder.clinic(r.metadata.src_node_id)
                    self._recorder.rounds[rnd].rejected[idx] = problem
                    log.warning("round %d: update from clinic %d rejected: %s", rnd, idx,
                                problem)
                    continue
            kept.append(r)
        return kept


    def _decode(self, reply: Message, sent: ArrayRecord | None) -> str | None:
        """Turn a (possibly quantised) update into fp32 weights in place for the strategy;
        a one-line reason when it is malformed."""
        records = dict(reply.content.array_records)
        if "arrays" not in records or sent is None or set(records) - {"arrays", SCALES_KEY}:
            return f"array records {sorted(records)}, expected 'arrays'"
        try:
            decoded = decode_update(records, sent)
        except (ValueError, KeyError) as e:
            return str(e)
        problem = check_arrays(decoded, self._shapes)
        if problem is None:
            if SCALES_KEY in records:
                del reply.content[SCALES_KEY]
            reply.content["arrays"] = decoded
        return problem


class Diverged(DentfedError):
    """The aggregated global model has non-finite values: the run stops, the report stays."""


class CentralEvaluator:
    """The strategy's evaluate_fn: the global model on the server-held test manifest, before
    round 1 and after every round; keeps the full metric set and the best model."""

    def __init__(self, cfg: Config, test_manifest: str | Path, model: torch.nn.Module):
        self.cfg = cfg
        self.device = resolve_device(cfg.train.device)
        self.model = model.to(self.device)
        m = read_manifest(test_manifest, cfg.task, default_modality=cfg.data.modality)
        self.n_test = len(m)
        self.loader = make_loader(m, cfg.data, train=False)
        self.loss_fn = make_loss(cfg.task, cfg.train, m.targets).to(self.device)
        self.key = headline(cfg.task.type)
        self.history: dict[int, dict[str, float]] = {}
        self.best_round, self.best_value, self.best_state = -1, -math.inf, None
        self.final_state: dict[str, torch.Tensor] | None = None
        self.seconds: dict[int, float] = {}

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        t0 = time.perf_counter()
        try:
            return self._evaluate(server_round, arrays)
        finally:
            self.seconds[server_round] = time.perf_counter() - t0

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        problem = check_arrays(arrays, expected_shapes(self.model))
        if problem and "NaN" in problem:
            raise Diverged(f"round {server_round}: the aggregated global model is not finite "
                           f"({problem}); the strategy diverged: lower federation.server_lr "
                           "or use another strategy")
        load_model_arrays(self.model, arrays)
        res = evaluate(self.model, self.loader, self.loss_fn, self.cfg.task, self.device)
        self.history[server_round] = res
        value = res.get(self.key, float("nan"))
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self.final_state = state
        if not math.isnan(value) and value > self.best_value:
            self.best_round, self.best_value, self.best_state = server_round, value, state
        log.info("round %d: central %s %.4f, loss %.4f", server_round, self.key, value,
                 res["loss"])
        keep = {k: v for k, v in res.items() if (k == "loss" or k.startswith("macro_")
                or "/" not in k) and not math.isnan(v)}
        return MetricRecord(keep)


@dataclass
class FederationResult:
    cfg: Config
    evaluator: CentralEvaluator
    recorder: RoundRecorder
    train_aggregated: dict[int, dict[str, float]]
    evaluate_aggregated: dict[int, dict[str, float]]
    seconds: float
    full_model_bytes: int
    exchanged_bytes: int
    stopped: str | None = None
    central_dp: CentralDpLedger | None = None  # client-level DP accountant (issue 6)


def run_federation(grid: Grid, cfg: Config, test_manifest: str | Path) -> FederationResult:
    """Run cfg.federation.rounds rounds of the configured strategy on `grid`."""
    model = build_global_model(cfg)
    initial = model_arrays(model)
    evaluator = CentralEvaluator(cfg, test_manifest, model)
    recorder = RoundRecorder()
    strategy = make_strategy(cfg.federation)
    central = None
    if cfg.privacy.central is not None:  # client-level DP: Flower's wrapper + accountant
        strategy, central = wrap_central_dp(strategy, cfg.privacy.central, cfg.federation)
    t0 = time.perf_counter()
    stopped = None
    try:
        result = strategy.start(
            grid=RecordingGrid(grid, recorder, expected_shapes(model)),
            initial_arrays=initial,
            num_rounds=cfg.federation.rounds,
            timeout=cfg.federation.round_timeout,
            train_config=config_record(cfg),
            evaluate_config=config_record(cfg),
            evaluate_fn=evaluator,
        )
        train_agg, eval_agg = result.train_metrics_clientapp, result.evaluate_metrics_clientapp
    except Diverged as e:  # keep what the finite rounds produced
        log.error("%s", e)
        stopped, train_agg, eval_agg = str(e), {}, {}
    except PrivacyBudgetExhausted as e:  # central DP: the next round would pass max_epsilon
        log.warning("stopped before the next round: %s", e)
        stopped, train_agg, eval_agg = f"client-level privacy budget spent: {e}", {}, {}

    def plain(d: dict) -> dict[int, dict[str, float]]:
        return {int(r): {k: float(v) for k, v in mr.items() if isinstance(v, int | float)}
                for r, mr in d.items()}

    return FederationResult(cfg, evaluator, recorder, plain(train_agg), plain(eval_agg),
                            time.perf_counter() - t0, full_model_nbytes(model),
                            arrays_nbytes(initial), stopped, central)
