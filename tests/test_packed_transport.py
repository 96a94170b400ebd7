"""Packed transport (shared/packed_transport.py): every array of a message as one array on the
wire, restored bit for bit; the ClientApp answers a packed message packed, and the server's
RecordingGrid packs what it pushes and unpacks what it pulls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from client.app import app as client_app
from server.federation import RecordingGrid, RoundRecorder
from shared.fedio import build_global_model, expected_shapes, model_arrays
from shared.packed_transport import (
    LAYOUT_RECORD,
    PACKED_RECORD,
    is_packed,
    pack_arrays,
    packed_copy,
    unpack_arrays,
)
from tests.test_federation import _context, _fed_config, _train_message


@pytest.fixture(autouse=True)
def _task_identity():
    """Messages are stamped with the run/node identity a Flower runtime sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _content() -> RecordDict:
    g = torch.Generator().manual_seed(0)
    weights = ArrayRecord({"conv.weight": Array(torch.randn(4, 3, 3, 3, generator=g).numpy()),
                           "bn.num_batches_tracked": Array(np.array(7, dtype=np.int64)),
                           "fc.bias": Array(np.arange(5, dtype=np.float32))})
    # int8 update with its scales, a torch-serialised array and an empty one
    quant = ArrayRecord({"q": Array(np.array([-128, 0, 127], dtype=np.int8)),
                         "t": Array(torch.ones(2, 2)),
                         "empty": Array(np.zeros((0, 3), dtype=np.float32))})
    return RecordDict({"arrays": weights, "config": ConfigRecord({"server-round": 2}),
                       "scales": quant, "metrics": MetricRecord({"num-examples": 3})})


def _snapshot(content: RecordDict) -> list:
    return [(name, [(k, a.dtype, tuple(a.shape), a.stype, a.data) for k, a in rec.items()])
            for name, rec in content.array_records.items()]


def test_pack_and_unpack_restore_every_array_bit_for_bit():
    content = _content()
    before = _snapshot(content)
    pack_arrays(content)
    assert list(content.array_records) == [PACKED_RECORD]  # one array on the wire
    assert len(content.array_records[PACKED_RECORD]) == 1
    assert content["config"]["server-round"] == 2 and content["metrics"]["num-examples"] == 3
    total = sum(len(a[4]) for _, rec in before for a in rec)
    assert len(content.array_records[PACKED_RECORD]["data"].data) == total
    assert unpack_arrays(content) is True
    assert _snapshot(content) == before  # names, order, dtypes, shapes, bytes
    assert LAYOUT_RECORD not in content and not is_packed(content)
    assert unpack_arrays(content) is False  # not packed: left alone


def test_packed_copies_leave_the_senders_records_and_the_cache_shares_one_copy():
    shared = _content()["arrays"]
    a = RecordDict({"arrays": shared, "config": ConfigRecord({"x": 1})})
    b = RecordDict({"arrays": shared, "config": ConfigRecord({"x": 2})})
    cache: dict = {}
    wire_a, wire_b = packed_copy(a, cache), packed_copy(b, cache)
    assert wire_a[PACKED_RECORD] is wire_b[PACKED_RECORD]  # a round's messages: packed once
    assert set(wire_a) == {PACKED_RECORD, LAYOUT_RECORD, "config"}
    assert a["arrays"] is shared and b["arrays"] is shared  # the sender's, untouched
    assert set(a) == {"arrays", "config"}
    unpack_arrays(wire_b)
    assert _snapshot(wire_b) == _snapshot(b)


@pytest.mark.parametrize("damage", ["truncated", "extra", "layout"])
def test_a_packed_record_that_does_not_match_its_layout_is_refused(damage):
    content = _content()
    pack_arrays(content)
    blob = content[PACKED_RECORD]["data"]
    if damage == "truncated":
        data = blob.data[:-1]
    elif damage == "extra":
        data = blob.data + b"\0"
    else:
        data = blob.data
        content[LAYOUT_RECORD] = ConfigRecord({"layout": "[[\"arrays\", 5]]"})
    content[PACKED_RECORD] = ArrayRecord({"data": Array(dtype="uint8", shape=(len(data),),
                                                        stype=blob.stype, data=data)})
    with pytest.raises(ValueError):
        unpack_arrays(content)


def test_the_clinic_answers_a_packed_message_packed_with_the_same_update(tiny_manifest):
    cfg = _fed_config()
    start = model_arrays(build_global_model(cfg))
    plain = client_app(_train_message(cfg, start), _context(tiny_manifest))
    msg = _train_message(cfg, start)
    pack_arrays(msg.content)
    packed = client_app(msg, _context(tiny_manifest))
    assert not packed.has_error(), packed.error
    assert is_packed(packed.content)
    unpack_arrays(packed.content)
    assert _snapshot(packed.content) == _snapshot(plain.content)  # same training, same bytes
    assert not is_packed(plain.content)  # an unpacked message gets an unpacked reply


class _LoopbackGrid(Grid):
    """A Flower Grid whose 'network' is the real ClientApp, called in process; it keeps what
    was pushed, as it was on the wire, and the pushed objects themselves (as Flower's
    in-memory simulation Grid does, whose engine thread reads them later)."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.wire: list[list[str]] = []
        self.pushed: list[Message] = []
        self.replies: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{i}"  # as Flower's Grids do
            self.pushed.append(m)
            self.wire.append(list(m.content.array_records))
            # what arrives is a copy (a real Grid serialises it); the clinic unpacks in place
            arrived = Message(RecordDict(dict(m.content.items())), dst_node_id=1,
                              message_type=m.metadata.message_type)
            reply = client_app(arrived, _context(self.manifest))
            reply.metadata.__dict__["_reply_to_message_id"] = f"m{i}"
            self.replies.append(reply)
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids):
        got, self.replies = self.replies, []
        return got

    def get_node_ids(self):
        return [1]

    def create_message(self, *a, **k):
        raise NotImplementedError

    def send_and_receive(self, *a, **k):
        raise NotImplementedError

    def run(self):
        raise NotImplementedError

    def set_run(self, run_id):
        raise NotImplementedError


class _InMemoryLoopback(_LoopbackGrid, InMemoryGrid):
    """The loopback, as Flower's in-memory simulation Grid (which the server never packs for)."""


@pytest.mark.parametrize(("pack", "grid_class"), [(True, _LoopbackGrid), (False, _LoopbackGrid),
                                                  (True, _InMemoryLoopback)])
def test_the_server_grid_packs_what_it_pushes_and_unpacks_what_it_pulls(tiny_manifest, pack,
                                                                        grid_class):
    cfg = _fed_config()
    model = build_global_model(cfg)
    start = model_arrays(model)
    loop = grid_class(tiny_manifest)
    grid = RecordingGrid(loop, RoundRecorder(), expected_shapes(model), pack=pack)
    pack = pack and grid_class is _LoopbackGrid
    sent = _train_message(cfg, start)
    # a second message with the very same RecordDict, as Flower's strategies send
    twin = Message(sent.content, dst_node_id=2, message_type=sent.metadata.message_type)
    replies = grid.send_and_receive([sent, twin], timeout=60)
    assert loop.wire == ([[PACKED_RECORD]] * 2 if pack else [["arrays"]] * 2)
    assert sent.content["arrays"] is start and not is_packed(sent.content)  # caller's copy
    assert [m.metadata.message_id for m in (sent, twin)] == ["m0", "m1"]
    # a pushed message never changes afterwards (the simulation engine may read it late)
    assert [list(m.content.array_records) for m in loop.pushed] == loop.wire
    assert len(replies) == 2
    for reply in replies:
        assert not reply.has_error(), reply.error
        assert set(reply.content.array_records) == {"arrays"}
        assert {k: tuple(a.shape) for k, a in reply.content["arrays"].items()} == \
            expected_shapes(model)
    assert _snapshot(replies[0].content) == _snapshot(replies[1].content)
