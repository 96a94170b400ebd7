"""The coordinator's round loop: Flower's strategy drives the rounds; dentfed adds central
evaluation on the server's own test set, per-clinic bookkeeping and the run folder.

Clinics appear in reports only as anonymous indices (order of first contact), never by node id
nor by the clinic token their replies carry (which keeps a clinic's index across a resume).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server.central_dp import CentralDpLedger, wrap_central_dp
from server.checkpoint import (
    load_checkpoint,
    restore_rng_state,
    restore_strategy_state,
    rng_state,
    save_checkpoint,
    strategy_state,
)
from server.cross_site import cross_site_evaluation
from server.download import from_rounded_start, half_precision
from server.strategy import make_strategy
from server.teacher import initial_teacher, teacher_record, updated_teacher
from shared.config import Config, dump_config
from shared.data.dataset import make_loader
from shared.data.manifest import read_manifest
from shared.dp_sgd import declined_epsilon, declined_reason
from shared.errors import DentfedError
from shared.fedio import (
    BN_EXAMPLES_KEY,
    BN_STATS_KEY,
    BN_STATS_ONLY_KEY,
    BN_STATS_ROUND_KEY,
    CLINIC_RECORD,
    SCAFFOLD_DELTA_KEY,
    TEACHER_KEY,
    arrays_nbytes,
    build_global_model,
    check_arrays,
    clinic_token_of,
    config_record,
    expected_shapes,
    full_model_nbytes,
    load_model_arrays,
    mixture_statistics,
    model_arrays,
)
from shared.losses import make_loss
from shared.memory import release_freed_memory
from shared.metrics import headline, higher_is_better
from shared.models import batch_statistics, local_prefixes, resolve_device
from shared.packed_transport import PackCache, packed_copy, unpack_arrays
from shared.training import evaluate
from shared.upload import SCALES_KEY, decode_update, sends_changes

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
    declined_epsilon: dict[int, float] = field(default_factory=dict)  # what they had spent
    # Error replies by clinic, as Flower's error code name only (`error_name`): the reason
    # text stays at the clinic, it could name a file there.
    errors: dict[int, str] = field(default_factory=dict)
    # Train requests, summed over the round's attempts (round_retries), and how they ended:
    # sampled == replied + train_failed + no_reply.
    sampled: int = 0
    replied: int = 0
    no_reply: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    evaluate_seconds: float = 0.0
    attempts: int = 0
    skipped: str | None = None  # why the round left the global model unchanged


class RoundRecorder:
    """Per-round, per-clinic facts taken from the messages the Grid carries.

    A clinic's anonymous index is tied to the clinic token its replies carry
    (shared/fedio.py CLINIC_RECORD) and, for a clinic that sends none, to its Flower node id.
    Node ids last one Flower run, tokens the whole federation: the token -> index map is in the
    checkpoint, so a resumed federation (new node ids) lists each clinic under its old index.
    Without tokens an index is given at a node's first message; once clinics send tokens, at
    its first reply (a returning clinic whose first message after a resume goes unanswered
    would otherwise get a second index)."""

    def __init__(self) -> None:
        self.rounds: dict[int, RoundRecord] = {}
        self._index: dict[int, int] = {}  # node id -> index (this run's and earlier runs')
        self._tokens: dict[str, int] = {}  # clinic token -> index, across resumes
        self._given = 0  # indices given out: 0 .. _given - 1

    def clinic(self, node_id: int, token: str | None = None) -> int:
        """The anonymous index of the clinic at `node_id`; `token`: the clinic token its reply
        carried (shared/fedio.py clinic_token_of), which names the clinic across Flower runs."""
        if token is not None:
            idx = self._tokens.get(token)
            if idx is None:  # its first reply: the index its node already has (first seen
                # before it replied, or a checkpoint from before tokens), unless another
                # clinic's token holds that one (a node id from an earlier run reused)
                own = self._index.get(node_id)
                idx = own if own is not None and own not in self._tokens.values() \
                    else self._new()
                self._tokens[token] = idx
            self._index[node_id] = idx
            return idx
        if node_id not in self._index:
            self._index[node_id] = self._new()
        return self._index[node_id]

    def _new(self) -> int:
        self._given += 1
        return self._given - 1

    def record(self, sent: list[Message], replies: list[Message], seconds: float) -> None:
        if not sent:
            return
        kind = sent[0].metadata.message_type
        rnd = int(sent[0].content["config"].get("server-round", 0))
        rec = self.rounds.setdefault(rnd, RoundRecord(rnd))
        sent_to = {m.metadata.dst_node_id for m in sent}
        # The clinic a reply is about: the node its message went to. Not always its source:
        # the SuperLink answers for a node that stopped heartbeating, from its own node id.
        to = {m.metadata.message_id: m.metadata.dst_node_id for m in sent
              if m.metadata.message_id}
        about = [(r, to.get(r.metadata.reply_to_message_id, r.metadata.src_node_id))
                 for r in replies]
        about = [(r, node) for r, node in about if node in sent_to]  # this exchange's
        answers = {node: clinic_token_of(r) for r, node in about if not r.has_error()}
        if not self._tokens and not any(answers.values()):
            for node in sorted(sent_to):  # no clinic sends a token: index at first message
                self.clinic(node)
        else:  # at first reply, in node id order (the same order in any reply order)
            for node in sorted(answers):
                self.clinic(node, answers[node])
        if kind.startswith("train"):
            rec.sampled += len(sent)
            rec.attempts += 1
            rec.seconds += seconds
        else:
            rec.evaluate_seconds += seconds
        for m in sent:
            rec.bytes_sent += sum(arrays_nbytes(a) for a in m.content.array_records.values())
        if kind.startswith("train"):
            rec.no_reply += len(sent_to - {node for _, node in about})
            rec.replied += sum(1 for r, _ in about
                               if not r.has_error() and declined_reason(r) is None)
        for r, node in about:
            if r.has_error():
                if kind.startswith("train"):
                    rec.train_failed += 1
                else:
                    rec.evaluate_failed += 1
                # no new index for an error: a returning clinic gets its old one at its
                # first good reply (its token)
                idx = self._index.get(node)
                name = error_name(r.error.code)
                if idx is not None:
                    rec.errors[idx] = name
                log.warning("round %d: %s answered the %s message with an error, %s (the "
                            "details are in the clinic's own log)", rnd,
                            "a clinic" if idx is None else f"clinic {idx}",
                            kind.split(".")[0], name)
                continue
            note = declined_reason(r) if kind.startswith("train") else None
            if note is not None:  # privacy budget spent: counted as a failed train reply
                rec.train_failed += 1
                idx = self.clinic(node)
                rec.declined[idx] = note
                if (eps := declined_epsilon(r)) is not None:
                    rec.declined_epsilon[idx] = eps
                log.warning("round %d: clinic %d declined to train: %s", rnd, idx, note)
                continue
            idx = self.clinic(node)
            rec.bytes_received += sum(arrays_nbytes(a) for a in r.content.array_records.values())
            metrics = {k: float(v) for mr in r.content.metric_records.values()
                       for k, v in mr.items() if isinstance(v, int | float)}
            (rec.train if kind.startswith("train") else rec.evaluate)[idx] = metrics

    @property
    def n_clinics(self) -> int:
        return self._given

    def state(self) -> str:
        """JSON for the checkpoint (node ids and clinic tokens stay in the coordinator's own
        file: never in the report, the logs or a tracking store)."""
        return json.dumps({"index": [[n, i] for n, i in self._index.items()],
                           "tokens": [[t, i] for t, i in self._tokens.items()],
                           "given": self._given,
                           "rounds": [asdict(r) for r in self.rounds.values()]})

    def load_state(self, text: str) -> None:
        data = json.loads(text)
        self._index = {int(n): int(i) for n, i in data["index"]}
        self._tokens = {str(t): int(i) for t, i in data.get("tokens", [])}
        self._given = int(data.get("given", max([*self._index.values(), -1]) + 1))
        self.rounds = {}
        for r in data["rounds"]:
            for key in ("train", "evaluate", "rejected", "declined", "declined_epsilon",
                        "errors"):
                r[key] = {int(k): v for k, v in r.get(key, {}).items()}
            self.rounds[int(r["round"])] = RoundRecord(**r)


def error_name(code: int) -> str:
    """Flower's name for an error code (flwr.common.constant.ErrorCode), e.g.
    CLIENT_APP_RAISED_EXCEPTION."""
    names = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
    return names.get(int(code), f"error code {int(code)}")


REPLY_POLL_SECONDS = 0.2  # how often the server asks the SuperLink for clinic replies
# ... once a round's first reply is in: the others usually follow within a second (the clinics
# train the same steps), and a 0.2 s poll leaves the last one waiting ~0.1 s on average
REPLY_POLL_AFTER_FIRST = 0.05


class NodeWaitTimeout(DentfedError):
    """Too few clinics connected for longer than federation.node_wait_timeout."""


class RecordingGrid:
    """A Grid that hands every message exchange to a RoundRecorder and drops clinic updates
    whose arrays are not exactly the expected names and shapes with finite values, before the
    strategy aggregates them; otherwise Flower's own Grid.

    It also bounds Flower's wait for clinics: the strategies' node sampling polls
    `get_node_ids()` once a second, for ever, until `min_available_nodes` are connected. Here
    the poll raises NodeWaitTimeout once fewer than `required` nodes have been connected for
    `wait_timeout` seconds in a row."""

    def __init__(self, grid: Grid, recorder: RoundRecorder,
                 shapes: dict[str, tuple[int, ...]], required: int = 1,
                 wait_timeout: float = math.inf, pack: bool = True, download: str = "fp32"):
        self._grid = grid
        self._pack = pack
        self._download = download
        self._recorder = recorder
        self._shapes = shapes
        self._required = required
        self._wait_timeout = wait_timeout
        self._short_since: float | None = None
        self._last_note = 0.0

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def get_node_ids(self) -> Iterable[int]:
        ids = list(self._grid.get_node_ids())
        now = time.monotonic()
        if len(ids) >= self._required:
            self._short_since = None
            return ids
        if self._short_since is None:
            self._short_since = now
        waited = now - self._short_since
        if waited > self._wait_timeout:
            raise NodeWaitTimeout(
                f"only {len(ids)} clinic(s) connected, {self._required} needed "
                f"(federation.min_available_clinics / min_train_clinics); gave up after "
                f"{self._wait_timeout:.0f} s (federation.node_wait_timeout)")
        if now - self._last_note > 30:
            self._last_note = now
            log.info("waiting for clinics: %d connected, %d needed (%.0f s of %.0f s)",
                     len(ids), self._required, waited, self._wait_timeout)
        return ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        release_freed_memory()  # the last exchange's replies and aggregation are gone by now
        sent = list(messages)
        wire, rounded = self._as_downloaded(sent)
        t0 = time.perf_counter()
        replies = self._exchange(wire, timeout)
        for m, w in zip(sent, wire, strict=True):  # the ids the Grid gave, on the caller's
            if m is not w:
                m.metadata.__dict__["_message_id"] = w.metadata.message_id
        self._recorder.record(wire, replies, time.perf_counter() - t0)  # the bytes that went
        for r in replies:  # the clinic tokens stay with the recorder
            if not r.has_error() and CLINIC_RECORD in r.content.config_records:
                del r.content[CLINIC_RECORD]
        if not sent or not sent[0].metadata.message_type.startswith("train"):
            return replies
        rnd = int(sent[0].content["config"].get("server-round", 0))
        sent_arrays = {m.metadata.dst_node_id: m.content["arrays"] for m in sent}
        kept = []
        for r in replies:
            if declined_reason(r) is not None:
                continue  # recorded as declined; no update to aggregate
            if not r.has_error():
                problem = self._decode(r, sent_arrays.get(r.metadata.src_node_id),
                                       r.metadata.src_node_id in rounded)
                if problem:
                    idx = self._recorder.clinic(r.metadata.src_node_id)
                    self._recorder.rounds[rnd].rejected[idx] = problem
                    log.warning("round %d: update from clinic %d rejected: %s", rnd, idx,
                                problem)
                    continue
            kept.append(r)
        # Aggregation sums the updates in list order and float addition is not associative:
        # order them by what they say, not by when they arrived, so the same clinic updates
        # give the same global model bit for bit (on any engine or cluster).
        return sorted(kept, key=_content_order)


    def _as_downloaded(self, sent: list[Message]) -> tuple[list[Message], set[int]]:
        """The messages as they go out: with `download: fp16` a train message's model in
        half precision (server/download.py), and the nodes that got it so; otherwise the
        caller's own messages. Copies, never the caller's records (a Grid may keep what it
        pushed, see `_exchange`); messages sharing a RecordDict (a round's train messages)
        share one copy."""
        if (self._download != "fp16" or not sent
                or not sent[0].metadata.message_type.startswith("train")):
            return sent, set()
        copies: dict[int, RecordDict] = {}
        wire, rounded = [], set()
        for m in sent:
            if "arrays" not in m.content.array_records:
                wire.append(m)
                continue
            if id(m.content) not in copies:
                content = RecordDict(dict(m.content.items()))
                content["arrays"] = half_precision(m.content["arrays"])
                if TEACHER_KEY in content.array_records:  # never trained: no correction
                    content[TEACHER_KEY] = half_precision(content[TEACHER_KEY])
                copies[id(m.content)] = content
            wire.append(Message(metadata=copy.copy(m.metadata), content=copies[id(m.content)]))
            rounded.add(m.metadata.dst_node_id)
        return wire, rounded

    def _exchange(self, sent: list[Message], timeout: float | None) -> list[Message]:
        """Flower's send_and_receive (push, then pull until every reply is in or `timeout`
        has passed), but polling every REPLY_POLL_SECONDS (REPLY_POLL_AFTER_FIRST once a reply
        is in): the deployment Grid sleeps 3 s between pulls, so a round waited up to 3 s for
        replies that were already in. Other grid objects (tests' stand-ins) keep their own
        send_and_receive."""
        if not isinstance(self._grid, Grid):
            return list(self._grid.send_and_receive(sent, timeout=timeout))
        # Packing is for a deployment's wire. Flower's in-memory simulation Grid hands the
        # message objects to Ray: nothing is fetched per array, and the packed copies only
        # cost memory (10 clinics: 5.82 and 5.79 GiB peak packed, 5.60 and 5.71 unpacked).
        if self._pack and not isinstance(self._grid, InMemoryGrid):
            # One packed array per message, the caller's messages stay as they are. Flower's
            # strategies may give every message the same RecordDict: pack each once.
            # Push copies and never touch them again: a Grid may keep the pushed object and
            # read it later (Flower's simulation Grid does: restoring the caller's records
            # after the push raced with its engine, and clinics got messages without arrays).
            cache: PackCache = {}
            copies: dict[int, RecordDict] = {}
            for m in sent:
                if id(m.content) not in copies:
                    copies[id(m.content)] = packed_copy(m.content, cache)
            wire = [Message(metadata=copy.copy(m.metadata), content=copies[id(m.content)])
                    for m in sent]
            ids = set(self._grid.push_messages(wire))
            for m, w in zip(sent, wire, strict=True):  # the ids the Grid gave, as unpacked
                m.metadata.__dict__["_message_id"] = w.metadata.message_id
        else:
            ids = set(self._grid.push_messages(sent))
        end = None if timeout is None else time.time() + timeout
        interval = min(float(getattr(self._grid, "pull_interval", REPLY_POLL_SECONDS)),
                       REPLY_POLL_SECONDS)
        replies: list[Message] = []
        while True:
            got = list(self._grid.pull_messages(ids))
            for r in got:
                self._unpack(r)
            replies += got
            ids -= {m.metadata.reply_to_message_id for m in got}
            if not ids or (end is not None and time.time() >= end):
                return replies
            time.sleep(min(interval, REPLY_POLL_AFTER_FIRST) if replies else interval)

    def _unpack(self, reply: Message) -> None:
        """A packed reply's arrays back in their records; a malformed one stays packed, and
        `_decode` rejects it like any reply without the expected records."""
        if reply.has_error():
            return
        try:
            unpack_arrays(reply.content)
        except ValueError as e:
            log.warning("a clinic's packed reply could not be unpacked: %s", e)

    def _decode(self, reply: Message, sent: ArrayRecord | None, rounded: bool = False
                ) -> str | None:
        """Turn a (possibly quantised) update into fp32 weights in place for the strategy,
        moved onto the server's fp32 model `sent` when the clinic got it rounded; a one-line
        reason when it is malformed."""
        records = dict(reply.content.array_records)
        records.pop(BN_STATS_KEY, None)  # checked where they are used (`recalibrated`)
        extra = set(records) - {"arrays", SCALES_KEY, SCAFFOLD_DELTA_KEY}
        if "arrays" not in records or sent is None or extra:
            return f"array records {sorted(records)}, expected 'arrays'"
        if SCAFFOLD_DELTA_KEY in records:
            delta = records.pop(SCAFFOLD_DELTA_KEY)
            problem = check_arrays(delta, {k: s for k, s in self._shapes.items() if k in delta})
            if problem:
                return f"{SCAFFOLD_DELTA_KEY}: {problem}"
        try:
            decoded = decode_update(records, sent)
        except (ValueError, KeyError) as e:
            return str(e)
        problem = check_arrays(decoded, self._shapes)
        if problem is None:
            if rounded and not sends_changes(records):  # changes are added to g already
                decoded = from_rounded_start(decoded, sent)
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
        self.manifest = m
        self.n_test = len(m)
        self.loader = make_loader(m, cfg.data, train=False)
        self.loss_fn = make_loss(cfg.task, cfg.train, m.targets).to(self.device)
        self.key = headline(cfg.task.type)
        self.history: dict[int, dict[str, float]] = {}
        # Best = highest headline, or lowest for a loss (pretraining); compared as sign * value.
        self.sign = 1.0 if higher_is_better(self.key) else -1.0
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
        # FedBN: no clinic's BatchNorm ever reaches the server; each test batch is normalised
        # by its own statistics (affine at its initial value). The clinics' evaluate replies,
        # with their own BatchNorm, are the FedBN figures (docs/federated-quality.md).
        with batch_statistics(self.model, local_prefixes(self.model)):
            res = evaluate(self.model, self.loader, self.loss_fn, self.cfg.task, self.device)
        self.history[server_round] = res
        value = res.get(self.key, float("nan"))
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        self.final_state = state
        if not math.isnan(value) and self.sign * value > self.best_value:
            self.best_round, self.best_value = server_round, self.sign * value
            self.best_state = state
        if self.key == "loss":  # pretraining: the masked-modelling loss is the headline
            log.info("round %d: central masked-modelling loss %.4f", server_round, value)
        else:
            log.info("round %d: central %s %.4f, loss %.4f", server_round, self.key, value,
                     res["loss"])
        keep = {k: v for k, v in res.items() if (k == "loss" or k.startswith("macro_")
                or "/" not in k) and not math.isnan(v)}
        return MetricRecord(keep)

    def state(self) -> dict:
        return {"history": json.dumps({str(k): v for k, v in self.history.items()}),
                "seconds": json.dumps({str(k): v for k, v in self.seconds.items()}),
                "best_round": self.best_round, "best_value": self.best_value,
                "best_state": self.best_state, "final_state": self.final_state}

    def load_state(self, state: dict) -> None:
        self.history = {int(k): v for k, v in json.loads(state["history"]).items()}
        self.seconds = {int(k): v for k, v in json.loads(state["seconds"]).items()}
        self.best_round, self.best_value = state["best_round"], state["best_value"]
        self.best_state, self.final_state = state["best_state"], state["final_state"]


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
    cross_site: dict | None = None  # federation.cross_site / personalize (server/cross_site.py)


def _plain(mr: MetricRecord | None) -> dict[str, float]:
    return {k: float(v) for k, v in (mr or {}).items() if isinstance(v, int | float)}


def _content_order(reply: Message) -> tuple:
    """The aggregation order of a reply: its metrics, less the timings (which differ run to
    run: the order, and so the float sums, would too) and what the strategy never sees."""
    if reply.has_error():
        return (0, ())
    return (1, tuple(sorted((name, tuple(sorted((k, repr(v)) for k, v in rec.items()
                                                if not k.endswith("_seconds")
                                                and k != BN_EXAMPLES_KEY)))
                            for name, rec in reply.content.metric_records.items())))


def _ok(replies: list[Message]) -> int:
    return sum(not r.has_error() for r in replies)


def run_federation(grid: Grid, cfg: Config, test_manifest: str | Path,
                   run_dir: Path | None = None, resume: bool = False) -> FederationResult:
    """Run cfg.federation.rounds rounds of the configured strategy on `grid`.

    The loop is Flower's `Strategy.start` (configure/aggregate train and evaluate, then the
    central evaluation) plus what a real federation needs: a checkpoint in `run_dir` after
    every completed round, `resume` from it, a bounded wait for clinics, and rounds whose
    replies fall below `min_train_clinics` retried (`round_retries`) and then skipped with the
    global model unchanged, instead of aggregating too few clinics."""
    fed = cfg.federation
    model = build_global_model(cfg)
    arrays = model_arrays(model)
    evaluator = CentralEvaluator(cfg, test_manifest, model)
    recorder = RoundRecorder()
    strategy = make_strategy(fed)
    central = None
    if cfg.privacy.central is not None:  # client-level DP: Flower's wrapper + accountant
        strategy, central = wrap_central_dp(strategy, cfg.privacy.central, fed)
    train_agg: dict[int, dict[str, float]] = {}
    eval_agg: dict[int, dict[str, float]] = {}
    seconds_before, start = 0.0, 1
    momentum = (cfg.pretrain.federated_teacher_momentum if cfg.task.type == "pretrain"
                else None)
    teacher = initial_teacher(arrays) if momentum is not None else None
    if resume:
        if run_dir is None:
            raise DentfedError("resume needs the run folder")
        ck = load_checkpoint(run_dir)
        if ck["config"] != dump_config(cfg):
            raise DentfedError(f"cannot resume {run_dir}: its config.yaml differs from the "
                               "checkpoint's; resume with the run's own config")
        arrays = ArrayRecord({k: Array(t.numpy()) for k, t in ck["arrays"].items()})
        restore_strategy_state(strategy, ck["strategy"])
        if central is not None:
            central.load_state_dict(ck["central_dp"])
        recorder.load_state(ck["recorder"])
        evaluator.load_state(ck["evaluator"])
        train_agg = {int(k): v for k, v in json.loads(ck["train_aggregated"]).items()}
        eval_agg = {int(k): v for k, v in json.loads(ck["evaluate_aggregated"]).items()}
        restore_rng_state(ck["rng"])
        seconds_before, start = float(ck["seconds"]), int(ck["round"]) + 1
        if momentum is not None:
            teacher = {k: t.numpy() for k, t in ck["teacher"].items()}
        log.info("resuming %s after round %d of %d", run_dir, start - 1, fed.rounds)
    required = max(fed.min_available_clinics, fed.min_train_clinics)
    wgrid = RecordingGrid(grid, recorder, expected_shapes(model), required,
                          fed.node_wait_timeout, pack=fed.pack_arrays, download=fed.download)
    train_cfg, eval_cfg = config_record(cfg, model), config_record(cfg)
    t0 = time.perf_counter()
    stopped = None
    last_done = start - 1  # the last round whose aggregate is in `arrays`
    diverged = False
    shapes = expected_shapes(model)
    # BatchNorm statistics without clinic-side evaluation: they ride on the next round's
    # train replies (one exchange a round instead of two), the evaluated round is scored
    # once they are in. Flower's client-side clipping mods (privacy.central) accept one array
    # record per reply: there, and in the last round, an evaluate message for them alone.
    stats_by_train = (fed.bn_recalibration and fed.fraction_evaluate == 0
                      and cfg.privacy.central is None)
    pending = None  # (round, its global arrays) waiting for the statistics
    if (stats_by_train and start > 1 and start - 1 not in evaluator.history
            and (start - 1) % fed.evaluate_every == 0):  # resumed while waiting
        pending = (start - 1, arrays)
    try:
        if start == 1:
            evaluator(0, arrays)
        for rnd in range(start, fed.rounds + 1):
            log.info("[ROUND %d/%d]", rnd, fed.rounds)
            tcfg = ConfigRecord(dict(train_cfg))
            # by node: a clinic that replies to a retried round's every attempt counts once
            stats: dict[int, tuple[dict[str, np.ndarray], float]] = {}
            if pending is not None:
                tcfg[BN_STATS_ROUND_KEY] = pending[0]
            arrays = _train_round(strategy, wgrid, recorder, cfg, rnd, arrays, tcfg,
                                  train_agg, lambda replies, out=stats: out.update(
                                      take_bn_statistics(replies)),
                                  teacher_record(teacher) if teacher is not None and rnd > 1
                                  else None)
            if teacher is not None and not getattr(recorder.rounds.get(rnd), "skipped", ""):
                teacher = updated_teacher(teacher, arrays, momentum)
            if pending is not None:
                evaluator(pending[0], recalibrated(pending[1], list(stats.values()), shapes,
                                                   pending[0]))
                pending = None
            # Clinics evaluate (and re-estimate BatchNorm statistics) only in the rounds the
            # server evaluates too: running statistics never enter training (BatchNorm uses
            # the batch's own in train mode), so the other rounds' would be unused work.
            evaluated = rnd % fed.evaluate_every == 0 or rnd == fed.rounds
            clinics_evaluate = evaluated and fed.fraction_evaluate > 0
            replies = list(wgrid.send_and_receive(
                strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(eval_cfg)), wgrid),
                timeout=fed.round_timeout)) if clinics_evaluate else []
            wait = stats_by_train and evaluated and rnd < fed.rounds
            if fed.bn_recalibration and evaluated and not wait:
                if not clinics_evaluate:
                    replies = _bn_statistics_exchange(wgrid, rnd, arrays, eval_cfg,
                                                      fed.round_timeout)
                arrays = recalibrated(arrays, list(take_bn_statistics(replies).values()),
                                      shapes, rnd)
            if clinics_evaluate and replies:
                agg = strategy.aggregate_evaluate(rnd, replies)
                if agg is not None:
                    eval_agg[rnd] = _plain(agg)
            last_done = rnd
            if wait:  # scored once the next round's train replies carry its statistics
                pending = (rnd, arrays)
            elif evaluated:
                evaluator(rnd, arrays)
            if run_dir is not None:
                save_checkpoint(run_dir, {
                    "round": rnd, "config": dump_config(cfg),
                    "arrays": {k: torch.from_numpy(a.numpy().copy())
                               for k, a in arrays.items()},
                    "strategy": strategy_state(strategy), "recorder": recorder.state(),
                    "evaluator": evaluator.state(),
                    "train_aggregated": json.dumps(train_agg),
                    "evaluate_aggregated": json.dumps(eval_agg),
                    "rng": rng_state(), "seconds": seconds_before + time.perf_counter() - t0,
                    "central_dp": central.state_dict() if central is not None else None,
                    "teacher": None if teacher is None else
                    {k: torch.from_numpy(v.copy()) for k, v in teacher.items()}})
    except (Diverged, NodeWaitTimeout) as e:  # keep what the completed rounds produced
        log.error("%s", e)
        stopped, diverged = str(e), isinstance(e, Diverged)
    except PrivacyBudgetExhausted as e:  # central DP: the next round would pass max_epsilon
        log.warning("stopped before the next round: %s", e)
        stopped = f"client-level privacy budget spent: {e}"
    if stopped is None and last_done >= 1 and all(
            r in recorder.rounds and recorder.rounds[r].skipped for r in range(1, last_done + 1)):
        # e.g. every clinic failing every round: the "final" model is the initial one, and a
        # run that looks finished would hide it
        stopped = (f"no round trained: all {last_done} were skipped (round {last_done}: "
                   f"{recorder.rounds[last_done].skipped})")
        log.error("%s", stopped)
    if stopped is not None and not diverged and last_done not in evaluator.history:
        evaluator(last_done, arrays)  # stopped between evaluated rounds: score the last model
    if not evaluator.history:
        raise DentfedError(stopped or "no round completed")
    cross = None
    if stopped is None and (fed.cross_site.enabled or fed.personalize is not None):
        # The raw grid: these evaluate exchanges are not a round (RoundRecorder), and the
        # clinics' local models are checked in cross_site_evaluation.
        cross = cross_site_evaluation(grid, recorder.clinic, cfg, arrays, model)
    return FederationResult(cfg, evaluator, recorder, train_agg, eval_agg,
                            seconds_before + time.perf_counter() - t0, full_model_nbytes(model),
                            arrays_nbytes(arrays), stopped, central, cross)


def take_bn_statistics(replies: list[Message]
                       ) -> dict[int, tuple[dict[str, np.ndarray], float]]:
    """federation.bn_recalibration: each reply's BatchNorm statistics and the number of
    images behind them by the clinic's node, taken out of the replies (the strategy never
    sees them)."""
    out = {}
    for r in replies:
        if r.has_error() or BN_STATS_KEY not in r.content.array_records:
            continue
        rec = r.content[BN_STATS_KEY]
        del r.content[BN_STATS_KEY]
        n = sum(float(mr.get(BN_EXAMPLES_KEY, 0)) for mr in r.content.metric_records.values())
        for mr in r.content.metric_records.values():
            if BN_EXAMPLES_KEY in mr:
                del mr[BN_EXAMPLES_KEY]
        out[r.metadata.src_node_id] = ({k: a.numpy() for k, a in rec.items()}, n)
    return out


def recalibrated(arrays: ArrayRecord, stats: list[tuple[dict[str, np.ndarray], float]],
                 shapes: dict[str, tuple[int, ...]], rnd: int) -> ArrayRecord:
    """federation.bn_recalibration: the global BatchNorm statistics set to those of the
    union of the clinics' training images (`mixture_statistics` of the statistics each clinic
    computed for this global model, `take_bn_statistics`). Malformed ones are ignored; the
    clinics' are combined in an order set by their content, not by when they arrived, so the
    same statistics give the same model bit for bit."""
    usable = []
    for rec, n in stats:
        if n > 0 and set(rec) <= set(shapes) and check_arrays(
                ArrayRecord({k: Array(v) for k, v in rec.items()}),
                {k: v for k, v in shapes.items() if k in rec}) is None:
            usable.append((rec, n))
    usable.sort(key=lambda s: (s[1], b"".join(s[0][k].tobytes() for k in sorted(s[0]))))
    if not usable or any(set(s) != set(usable[0][0]) for s, _ in usable):
        log.warning("round %d: no usable BatchNorm statistics from the clinics; the averaged "
                    "ones are kept", rnd)
        return arrays
    new = ArrayRecord({k: Array(a.numpy()) for k, a in arrays.items()})
    for k, v in mixture_statistics([s for s, _ in usable], [n for _, n in usable]).items():
        new[k] = Array(v)
    return new


def _bn_statistics_exchange(grid: RecordingGrid, rnd: int, arrays: ArrayRecord,
                            eval_cfg: ConfigRecord, timeout: float | None) -> list[Message]:
    """Evaluate messages that ask every connected clinic for the BatchNorm statistics of
    round `rnd`'s global model only (no validation): the last round's when the clinics do not
    evaluate, and every evaluated round's under privacy.central."""
    config = ConfigRecord({**dict(eval_cfg), "server-round": rnd, BN_STATS_ONLY_KEY: True})
    content = RecordDict({"arrays": arrays, "config": config})
    messages = [Message(content=content, dst_node_id=node, message_type=MessageType.EVALUATE)
                for node in sorted(grid.get_node_ids())]
    return list(grid.send_and_receive(messages, timeout=timeout))


def _train_round(strategy, grid: RecordingGrid, recorder: RoundRecorder, cfg: Config,
                 rnd: int, arrays: ArrayRecord, train_cfg: ConfigRecord,
                 train_agg: dict[int, dict[str, float]],
                 on_replies: Callable[[list[Message]], object] | None = None,
                 teacher: ArrayRecord | None = None) -> ArrayRecord:
    """One training round; returns the new global arrays (unchanged when the round is
    skipped). Replies below min_train_clinics are never aggregated. `on_replies` sees every
    attempt's replies before the strategy does (it takes what is not the strategy's).
    `teacher`: the MDE teacher sent with the model (server/teacher.py)."""
    fed = cfg.federation
    for attempt in range(fed.round_retries + 1):
        before = recorder.rounds[rnd].sampled if rnd in recorder.rounds else 0
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_cfg)),
                                                 grid))
        if teacher is not None:
            for m in messages:
                m.content[TEACHER_KEY] = teacher
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
        if on_replies is not None:
            on_replies(replies)
        rec = recorder.rounds.get(rnd)
        got = _ok(replies)
        if got >= fed.min_train_clinics:
            new, metrics = strategy.aggregate_train(rnd, replies)
            if metrics is not None:
                train_agg[rnd] = _plain(metrics)
            if rec is not None and rec.sampled - before > got:
                log.warning("round %d: %d of %d sampled clinics used (others failed, timed "
                            "out or were rejected)", rnd, got, rec.sampled - before)
            return new if new is not None else arrays
        more = attempt < fed.round_retries
        log.warning("round %d: only %d usable update(s), %d needed (min_train_clinics); %s",
                    rnd, got, fed.min_train_clinics,
                    "retrying the round" if more else "round skipped, global model unchanged")
    if rec is None:
        rec = recorder.rounds.setdefault(rnd, RoundRecord(rnd))
    rec.skipped = f"{got} usable update(s), {fed.min_train_clinics} needed"
    return arrays
