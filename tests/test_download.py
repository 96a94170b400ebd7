"""The global model sent in half precision (`federation.download: fp16`): what goes out, and the
server's correction of what comes back (server/download.py)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict

from client.app import app as client_app
from server.download import from_rounded_start, half_precision
from server.federation import RecordingGrid, RoundRecorder
from shared.fedio import arrays_nbytes, build_global_model, expected_shapes, model_arrays
from tests.test_federation import (  # noqa: F401  (fixture)
    _context,
    _fed_config,
    _task_identity,
    _train_message,
)


def test_half_precision_rounds_what_fits_and_keeps_what_it_dropped():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (64, 3, 3, 3)).astype(np.float32)
    big = np.array([1.0, 7e4], np.float32)  # 7e4 is past fp16's largest, 65504
    count = np.array(12, np.int64)
    g = ArrayRecord({"w": Array(w), "big": Array(big), "n": Array(count)})
    half = half_precision(g)
    assert list(half.keys()) == ["w", "big", "n"]
    assert half["w"].numpy().dtype == np.float16
    assert half["big"].numpy().dtype == np.float32 and half["n"].numpy().dtype == np.int64
    back = ArrayRecord({k: Array(a.numpy().astype(np.float32) if k == "w" else a.numpy())
                        for k, a in half.items()})
    assert not np.array_equal(back["w"].numpy(), w)  # the rounding dropped something
    moved = from_rounded_start(back, g)  # fp16 + what it dropped: the fp32 arrays bit for bit
    for k in ("w", "big"):
        assert np.array_equal(moved[k].numpy(), g[k].numpy()), k
    assert np.array_equal(moved["n"].numpy(), count)
    # a change made from the rounded start is kept: it lands on g
    step = back["w"].numpy() + np.float32(0.01)
    assert np.allclose(from_rounded_start(ArrayRecord({"w": Array(step)}), g)["w"].numpy(),
                       w + np.float32(0.01), atol=1e-6)


class _EchoGrid:
    """Plays a clinic that sends back exactly the model it received, as fp32 weights."""

    def __init__(self):
        self.got: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            self.got.append(m)
            back = ArrayRecord({k: Array(a.numpy().astype(np.float32))
                                for k, a in m.content["arrays"].items()})
            r = Message(RecordDict({"arrays": back}), reply_to=m)
            r.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
            replies.append(r)
        return replies


def test_an_unchanged_model_comes_back_as_the_servers_own_bit_for_bit():
    cfg = _fed_config(download="fp16")
    model = build_global_model(cfg)
    start = model_arrays(model)
    sent = _train_message(cfg, start)
    sent.metadata.__dict__["_message_id"] = "m1"
    echo, rec = _EchoGrid(), RoundRecorder()
    grid = RecordingGrid(echo, rec, expected_shapes(model), download="fp16")
    (kept,) = grid.send_and_receive([sent])
    (wire,) = echo.got
    floats = [k for k, a in start.items() if a.numpy().dtype == np.float32]
    assert floats and all(wire.content["arrays"][k].numpy().dtype == np.float16 for k in floats)
    assert sent.content["arrays"] is start  # the caller's message is left as it was
    for k in start:
        assert np.array_equal(kept.content["arrays"][k].numpy(), start[k].numpy()), k
    # the report counts the bytes that went: about half
    float_bytes = sum(start[k].numpy().nbytes for k in floats)
    assert rec.rounds[1].bytes_sent == arrays_nbytes(start) - float_bytes // 2 + sum(
        a.numpy().nbytes for k, a in sent.content.array_records.items() if k != "arrays")


@pytest.mark.parametrize("upload", ["fp32", "fp16", "int8"])
def test_a_clinic_trains_from_the_rounded_model_and_the_server_applies_it_to_its_own(
        tiny_manifest, upload):
    """The real ClientApp on a half-precision train message. The server's decoded update is
    the clinic's weights plus what the download's rounding dropped (fp32 uploads), or its fp16
    or int8 change from the rounded model added to the fp32 model: either way measured from
    where the clinic started and applied to the server's model. Training from a start 5e-4
    (relative) away is not the fp32 download's training bit for bit (likely AdamW's
    sign-like first steps: tiny gradients change sign). Here the two updates differ by ~10%
    of their norm in one round; the federated effect is measured over seeds by
    simulations/bench_quality.py (docs/speed.md)."""
    from shared.upload import decode_update

    cfg = _fed_config(download="fp16", upload=upload)
    model = build_global_model(cfg)
    start = model_arrays(model)
    shapes = expected_shapes(model)
    raw: list[dict[str, ArrayRecord]] = []
    got: list[Message] = []

    class _Clinic:
        def send_and_receive(self, messages, *, timeout=None):
            out = []
            for m in messages:
                got.append(m)
                r = client_app(m, _context(tiny_manifest))
                assert not r.has_error(), r.error
                raw.append({k: ArrayRecord({n: Array(a.numpy().copy()) for n, a in v.items()})
                            for k, v in r.content.array_records.items()})
                r.metadata.__dict__["_src_node_id"] = m.metadata.dst_node_id
                out.append(r)
            return out

    def one_round(download: str) -> ArrayRecord:
        sent = _train_message(cfg, start)
        sent.metadata.__dict__["_message_id"] = "m1"
        grid = RecordingGrid(_Clinic(), RoundRecorder(), shapes, download=download)
        (kept,) = grid.send_and_receive([sent])
        return kept.content["arrays"]

    exact, rounded = one_round("fp32"), one_round("fp16")
    assert {a.numpy().dtype for a in got[1].content["arrays"].values()} == {np.dtype(np.float16)}
    if upload == "fp32":
        want = from_rounded_start(raw[1]["arrays"], start)
    else:  # the fp16 or int8 change from the rounded start, added to the fp32 model
        want = decode_update(raw[1], start)
    assert list(rounded.keys()) == list(want.keys())
    for k in want:
        assert np.array_equal(rounded[k].numpy(), want[k].numpy()), k
    change = sum(float(np.sum((exact[k].numpy() - start[k].numpy()) ** 2)) for k in exact)
    gap = sum(float(np.sum((rounded[k].numpy() - exact[k].numpy()) ** 2)) for k in exact)
    assert 0 < gap < 0.05 * change, (gap, change)


def test_secagg_refuses_a_half_precision_download():
    from shared.config import config_from_dict
    from shared.errors import ConfigError
    from tests.conftest import tiny_config

    raw = tiny_config().model_dump(mode="json")
    with pytest.raises(ConfigError, match="download fp32"):
        config_from_dict({**raw, "federation": {"download": "fp16"},
                          "privacy": {"secagg": {}}})
