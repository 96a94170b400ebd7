"""Quantised uploads: fp16 / int8-with-error-feedback encoding, the clinic side and the
server's decoding before aggregation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.app import app as client_app
from client.clinic import RESIDUAL_KEY
from server.federation import RecordingGrid, RoundRecorder
from server.strategy import make_strategy
from shared.fedio import arrays_nbytes, build_global_model, expected_shapes, model_arrays
from shared.upload import SCALES_KEY, decode_update, encode_update
from tests.test_federation import (  # noqa: F401  (fixture)
    _context,
    _FakeGrid,
    _fed_config,
    _task_identity,
    _train_message,
)


def _rec(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def test_fp16_and_int8_round_trip_within_one_step():
    rng = np.random.default_rng(0)
    old = _rec(w=rng.normal(size=(64, 32)).astype(np.float32), b=np.zeros(5, np.float32))
    new_np = {"w": old["w"].numpy() + rng.normal(0, 0.01, (64, 32)).astype(np.float32),
              "b": np.linspace(-1, 1, 5).astype(np.float32)}
    new = _rec(**new_np)
    fp32, _ = encode_update(new, old, "fp32")
    assert fp32["arrays"] is new
    as_numpy, _ = encode_update(new_np, old, "fp32")  # the model's own arrays (model_numpy)
    assert all(np.array_equal(as_numpy["arrays"][k].numpy(), new_np[k]) for k in new_np)
    half, _ = encode_update(new, old, "fp16")
    assert half["arrays"]["w"].numpy().dtype == np.float16
    back = decode_update(half, old)
    for k in ("w", "b"):  # a change in fp16: the error is relative to the change, not the weight
        assert back[k].numpy().dtype == np.float32
        change = np.abs(new_np[k] - old[k].numpy())
        assert np.all(np.abs(back[k].numpy() - new_np[k]) <= change * 2.0 ** -11 + 1e-6), k
    # rounding the weights themselves would be off by far more than that
    assert np.abs(new_np["w"].astype(np.float16).astype(np.float32) - new_np["w"]).max() > 1e-4
    q, residual = encode_update(new, old, "int8")
    assert {a.numpy().dtype for a in q["arrays"].values()} == {np.dtype(np.int8)}
    assert arrays_nbytes(q["arrays"]) * 4 == arrays_nbytes(new)
    back = decode_update(q, old)
    for k in ("w", "b"):
        step = np.abs(new_np[k] - old[k].numpy()).max() / 127
        err = back[k].numpy() - new_np[k]
        assert np.abs(err).max() <= step / 2 + 1e-7
        assert np.allclose(residual[k], -err, atol=1e-6)  # the residual is what was dropped


def test_error_feedback_sends_what_rounding_dropped():
    """A tiny change next to a large one rounds to zero every round on its own; with the
    residual carried over it gets through, and the running sum stays within one step."""
    old = _rec(w=np.zeros(2, np.float32))
    step_true = np.array([1.0, 0.003], np.float32)  # 0.003 < half a step (1/254)
    residual, sent_total = None, np.zeros(2, np.float32)
    for _ in range(50):
        q, residual = encode_update(_rec(w=step_true), old, "int8", residual)
        sent_total += decode_update(q, old)["w"].numpy()
    no_ef, _ = encode_update(_rec(w=step_true), old, "int8")
    assert decode_update(no_ef, old)["w"].numpy()[1] == 0  # without feedback: always lost
    assert abs(sent_total[1] - 50 * 0.003) <= 1 / 127  # with feedback: delivered


def test_malformed_quantised_updates_are_refused():
    old = _rec(w=np.zeros(3, np.float32))
    q, _ = encode_update(_rec(w=np.ones(3, np.float32)), old, "int8")
    bad_scales = {"arrays": q["arrays"], SCALES_KEY: _rec(scales=np.ones(2, np.float32))}
    with pytest.raises(ValueError, match="scales"):
        decode_update(bad_scales, old)
    nan_scales = {"arrays": q["arrays"], SCALES_KEY: _rec(scales=np.full(1, np.nan, np.float32))}
    with pytest.raises(ValueError, match="scales"):
        decode_update(nan_scales, old)
    with pytest.raises(ValueError, match="dtypes"):
        decode_update({"arrays": _rec(w=np.ones(3, np.int32))}, old)


def test_clinic_int8_upload_keeps_residual_and_server_decodes(tiny_manifest):
    cfg = _fed_config(upload="int8")
    model = build_global_model(cfg)
    start = model_arrays(model)
    ctx = _context(tiny_manifest)
    reply = client_app(_train_message(cfg, start), ctx)
    assert not reply.has_error(), reply.error
    records = reply.content.array_records
    assert set(records) == {"arrays", SCALES_KEY}
    assert arrays_nbytes(records["arrays"]) * 4 == arrays_nbytes(start)
    assert RESIDUAL_KEY in ctx.state.array_records  # error feedback stays at the clinic
    assert set(ctx.state[RESIDUAL_KEY].keys()) == set(start.keys())

    # the server decodes before the strategy: fp32 weights of the right names and shapes
    reply.metadata.__dict__["_src_node_id"] = 1
    sent = _train_message(cfg, start)
    sent.metadata.__dict__["_message_id"] = "m1"
    grid = RecordingGrid(_FakeGrid([reply]), RoundRecorder(), expected_shapes(model))
    (kept,) = grid.send_and_receive([sent])
    assert set(kept.content.array_records) == {"arrays"}
    decoded = kept.content["arrays"]
    assert all(decoded[k].numpy().dtype == np.float32 for k in decoded)
    moved = [k for k in decoded
             if not np.allclose(decoded[k].numpy(), start[k].numpy())]
    assert moved, "decoded update equals the global model"
    arrays, _ = make_strategy(cfg.federation).aggregate_train(1, [kept])
    for k in decoded:
        assert np.allclose(arrays[k].numpy(), decoded[k].numpy(), atol=1e-6)


def test_server_rejects_int8_update_with_bad_scales():
    start = ArrayRecord({"w": torch.zeros(2, 2)})
    q, _ = encode_update(ArrayRecord({"w": torch.ones(2, 2)}), start, "int8")
    req = Message(RecordDict({"arrays": start, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=7, message_type="train")
    req.metadata.__dict__["_message_id"] = "m7"
    rep = Message(RecordDict({"arrays": q["arrays"],
                              SCALES_KEY: _rec(scales=np.ones(3, np.float32))}), reply_to=req)
    rep.metadata.__dict__["_src_node_id"] = 7
    rec = RoundRecorder()
    kept = RecordingGrid(_FakeGrid([rep]), rec, {"w": (2, 2)}).send_and_receive([req])
    assert list(kept) == [] and "scales" in rec.rounds[1].rejected[0]


@pytest.mark.parametrize("strategy", ["fedavgm", "fedadam"])
def test_int8_updates_aggregate_under_server_optimisers(strategy):
    """FedAvgM pairs the aggregate with its current model by position: a decoded update must
    come in the global model's array order, not the scales' sorted-name order (an int8 run of
    configs/demo-photos.yaml, FedAvgM, failed on round 1 with mismatched shapes before)."""
    rng = np.random.default_rng(1)
    # names whose sorted order differs from the model's, with different shapes
    start = _rec(**{"z.weight": rng.normal(size=(4, 3)).astype(np.float32),
                    "a.bias": np.zeros(10, np.float32),
                    "m.weight": rng.normal(size=(2, 2, 3)).astype(np.float32)})
    replies, targets = [], []
    for node in (1, 2):
        local = {k: a.numpy() + rng.normal(0, 0.05, a.numpy().shape).astype(np.float32)
                 for k, a in start.items()}
        q, _ = encode_update(_rec(**local), start, "int8")
        assert list(q["arrays"].keys()) == list(start.keys())  # the model's order on the wire
        decoded = decode_update(q, start)
        assert list(decoded.keys()) == list(start.keys())
        targets.append({k: decoded[k].numpy() for k in decoded})
        msg = Message(RecordDict({"arrays": decoded, "metrics": MetricRecord(
            {"num-examples": 10})}), reply_to=_train_request(start, node))
        msg.metadata.__dict__["_src_node_id"] = node
        replies.append(msg)
    # a shuffled order from an older clinic is put right too
    shuffled = ArrayRecord({k: start[k] for k in reversed(list(start.keys()))})
    assert list(decode_update({"arrays": shuffled}, start).keys()) == list(start.keys())

    cfg = _fed_config(strategy=strategy)
    strat = make_strategy(cfg.federation)
    if strategy == "fedavgm":
        strat.current_arrays = start
    else:
        strat.current_arrays = {k: a.numpy() for k, a in start.items()}
    arrays, _ = strat.aggregate_train(1, replies)
    assert list(arrays.keys()) == list(start.keys())
    for k in start:
        assert arrays[k].numpy().shape == start[k].numpy().shape
    if strategy == "fedavgm":  # round 1 with server lr 1: the momentum step is the mean
        for k in start:
            mean = (targets[0][k] + targets[1][k]) / 2
            assert np.allclose(arrays[k].numpy(), mean, atol=1e-6)


def _train_request(arrays: ArrayRecord, node: int) -> Message:
    req = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 1})}),
                  dst_node_id=node, message_type="train")
    req.metadata.__dict__["_message_id"] = f"m{node}"
    return req
