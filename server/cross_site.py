"""End-of-run cross-site evaluation and personalisation (federation.cross_site /
federation.personalize), as NVIDIA FLARE's cross-site model evaluation: every model is scored
on every clinic's validation images AT the clinic, and only scalar metrics come back.

Two phases, both on Flower's evaluate message path (config key `cross-site`):
- "own": every clinic scores the final global model and, with personalize, fine-tunes it and
  scores its personalised model, on its own validation set. With
  cross_site.share_local_models the personalised model comes back too (`local-model`).
- "shared" (share_local_models only): every clinic scores the other clinics' personalised
  models (records `personalised-<j>`, j the anonymous index).

The result is a models x clinics matrix of the headline validation metric (and the loss), with
each model's mean and worst clinic. Clinics appear only by anonymous index (the round loop's:
tied to the clinic token an "own" reply carries, else to the node id).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from shared.config import Config
from shared.fedio import (
    CROSS_SITE_KEY,
    GLOBAL_MODEL,
    LOCAL_MODEL_KEY,
    PERSONALISED_MODEL,
    SHARED_PREFIX,
    arrays_nbytes,
    check_arrays,
    clinic_token_of,
    config_record,
    expected_shapes,
    personal_keys,
    shared_model_name,
)
from shared.metrics import headline

log = logging.getLogger("dentfed.server")


def _message(node: int, records: dict, config: ConfigRecord) -> Message:
    return Message(content=RecordDict({**records, "config": ConfigRecord(dict(config))}),
                   dst_node_id=node, message_type=MessageType.EVALUATE)


def _metric(v: float | None) -> float | None:
    """-1 (undefined on that clinic's validation set, e.g. one class only) and NaN: None."""
    return None if v is None or math.isnan(v) or v < 0 else float(v)


def _summary(cells: dict[str, float | None]) -> dict:
    """Mean and worst (lowest: every headline metric is higher-is-better) over the clinics
    where the model was scored and the metric is defined."""
    known = {c: v for c, v in cells.items() if v is not None}
    if not known:
        return {"mean": None, "worst": None, "worst_clinic": None, "clinics": 0}
    worst = min(known, key=lambda c: known[c])
    return {"mean": sum(known.values()) / len(known), "worst": known[worst],
            "worst_clinic": int(worst), "clinics": len(known)}


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return sum(known) / len(known) if known else None


def cross_site_evaluation(grid: Grid, clinic_index: Callable[[int, str | None], int],
                          cfg: Config, arrays: ArrayRecord, model: nn.Module) -> dict:
    """Run the end-of-run phases on `grid` (every connected clinic) for the final global
    `arrays`; `clinic_index(node_id, token)` gives a clinic's anonymous index (RoundRecorder
    .clinic; `token`: the clinic token its reply carried, or None). Returns the metrics.json
    `cross_site` section."""
    fed = cfg.federation
    key = f"val_{headline(cfg.task.type)}"
    share = fed.personalize is not None and fed.cross_site.share_local_models
    t0 = time.perf_counter()
    conf = config_record(cfg, model)
    conf["server-round"] = fed.rounds
    nodes = sorted(grid.get_node_ids())
    index: dict[int, int] = {}  # node id -> anonymous index, from the "own" replies
    # cells[model row][clinic] = {metric: value}
    cells: dict[str, dict[int, dict[str, float]]] = {}
    sent_bytes = received_bytes = failed = 0
    local_models: dict[int, ArrayRecord] = {}
    rejected: dict[str, str] = {}

    def exchange(messages: list[Message]) -> list[Message]:
        nonlocal sent_bytes, received_bytes, failed
        sent_bytes += sum(arrays_nbytes(a) for m in messages
                          for a in m.content.array_records.values())
        replies = list(grid.send_and_receive(messages, timeout=fed.round_timeout))
        ok = []
        for r in replies:
            if r.has_error() or r.metadata.src_node_id not in nodes:
                failed += 1
                continue
            received_bytes += sum(arrays_nbytes(a) for a in r.content.array_records.values())
            ok.append(r)
        failed += len(messages) - len(replies)
        return ok

    def record(reply: Message) -> int:
        idx = index[reply.metadata.src_node_id]
        for mr in reply.content.metric_records.values():
            for name, v in mr.items():
                row, _, metric = name.partition("/")
                if not metric or not isinstance(v, int | float):
                    continue
                if row == PERSONALISED_MODEL:
                    row = shared_model_name(idx)
                if row == GLOBAL_MODEL or row.startswith(SHARED_PREFIX):
                    cells.setdefault(row, {}).setdefault(idx, {})[metric] = float(v)
        return idx

    conf[CROSS_SITE_KEY] = "own"
    shapes = expected_shapes(model, personal_keys(model))
    own = exchange([_message(n, {"arrays": arrays}, conf) for n in nodes])
    for r in sorted(own, key=lambda r: r.metadata.src_node_id):
        index[r.metadata.src_node_id] = clinic_index(r.metadata.src_node_id, clinic_token_of(r))
    for n in nodes:  # no reply: known by its node id (a column without figures)
        if n not in index:
            index[n] = clinic_index(n, None)
    columns = sorted(set(index.values()))
    for r in own:
        idx = record(r)
        if LOCAL_MODEL_KEY in r.content.array_records:
            rec = r.content[LOCAL_MODEL_KEY]
            problem = check_arrays(rec, shapes) if share else "share_local_models is off"
            if problem:
                rejected[str(idx)] = problem
                log.warning("cross-site: local model of clinic %d not used: %s", idx, problem)
            else:
                local_models[idx] = rec
    if local_models:
        conf[CROSS_SITE_KEY] = "shared"
        messages = []
        for n in nodes:
            others = {shared_model_name(j): rec for j, rec in local_models.items()
                      if j != index[n]}
            if others:
                messages.append(_message(n, others, conf))
        for r in exchange(messages):
            record(r)
    rows = [GLOBAL_MODEL] + sorted((r for r in cells if r != GLOBAL_MODEL),
                                   key=lambda r: int(r[len(SHARED_PREFIX):]))

    def matrix(metric: str, clean) -> dict[str, dict[str, float | None]]:
        return {row: {str(c): clean(cells.get(row, {}).get(c, {}).get(metric))
                      for c in columns} for row in rows}

    values = matrix(key, _metric)
    out = {
        "metric": key,
        "clinics": columns,
        "models": rows,
        "matrix": values,
        "loss": matrix("val_loss", lambda v: v),
        "summary": {row: _summary(values[row]) for row in rows},
        "share_local_models": share,
        "local_models_shared": sorted(local_models),
        "local_models_rejected": rejected,
        "failed_replies": failed,
        "bytes_sent": sent_bytes,
        "bytes_received": received_bytes,
        "seconds": time.perf_counter() - t0,
    }
    if fed.personalize is not None:
        per = {}
        for c in columns:
            g = values[GLOBAL_MODEL][str(c)]
            p = values.get(shared_model_name(c), {}).get(str(c))
            per[str(c)] = {"global": g, "personalised": p,
                           "change": None if g is None or p is None else p - g,
                           "global_loss": out["loss"][GLOBAL_MODEL][str(c)],
                           "personalised_loss": out["loss"].get(shared_model_name(c),
                                                                {}).get(str(c))}
        both = {c: v for c, v in per.items() if v["change"] is not None}
        out["personalisation"] = {
            **fed.personalize.model_dump(mode="json"),
            "per_clinic": per,
            "global": _summary({c: v["global"] for c, v in both.items()}),
            "personalised": _summary({c: v["personalised"] for c, v in both.items()}),
            "mean_loss": {kind: _mean([v[f"{kind}_loss"] for v in per.values()])
                          for kind in ("global", "personalised")},
        }
    g = out["summary"][GLOBAL_MODEL]
    log.info("cross-site: global model %s mean %s, worst %s (clinic %s); %d failed replies",
             key, g["mean"], g["worst"], g["worst_clinic"], failed)
    return out
