"""How a clinic's update is encoded for the upload, and how the server decodes it.

`fp32` sends the trainable state as it is. `fp16` sends the *change* from the global model
the clinic received, in half precision: half the bytes, and the rounding is relative to the
round's change (~5e-4 of it), not to the weights, so the global model does not lose its low
bits every round as it would if the weights themselves were rounded. `int8` sends the change
per tensor as int8 with one fp32 scale (max |delta| / 127), and keeps the rounding error at
the clinic (error feedback: it is added to the next round's change, so what the rounding
dropped is sent later instead of lost). The residual lives in the clinic's state (its state
folder, else Flower's `context.state`), never on the server. The server adds a change to its
own fp32 model, which is also what makes `federation.download: fp16` exact on its side
(server/download.py).

On the wire a quantised update is the usual "arrays" ArrayRecord (int8 or fp16 arrays under
the parameter names) plus, for int8, an ArrayRecord "upload-scales" with one fp32 array of
scales in sorted-name order. The server decodes back to fp32 weights before the strategy sees them,
so every strategy works unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

SCALES_KEY = "upload-scales"
ENCODINGS = ("fp32", "fp16", "int8")


def _np(arrays: ArrayRecord | dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if isinstance(arrays, ArrayRecord):
        return {k: a.numpy() for k, a in arrays.items()}
    return dict(arrays)


def encode_update(local: ArrayRecord | dict[str, np.ndarray], global_: ArrayRecord, encoding: str,
                  residual: dict[str, np.ndarray] | None = None
                  ) -> tuple[dict[str, ArrayRecord], dict[str, np.ndarray] | None]:
    """Array records to send and the new residual (int8 only; None otherwise). `local` may be
    the model's own arrays (`model_numpy`): a quantised update then reads no ArrayRecord."""
    if encoding == "fp32":
        return {"arrays": local if isinstance(local, ArrayRecord) else ArrayRecord(
            {k: Array(np.ascontiguousarray(v)) for k, v in local.items()})}, None
    new = _np(local)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown upload encoding {encoding!r}; expected one of {ENCODINGS}")
    old = _np(global_)
    if encoding == "fp16":  # torch's casts: numpy's fp32 -> fp16 took 2.5x as long here
        return {"arrays": ArrayRecord({
            k: Array((torch.from_numpy(np.asarray(v, np.float32))
                      - torch.from_numpy(old[k]).float()).half().numpy())
            for k, v in new.items()})}, None  # a change past fp16's range: inf, refused
    residual = residual or {}
    q, scales, carry = {}, [], {}
    for k in sorted(new):  # scales travel in sorted-name order, whatever the record order
        v = new[k]
        delta = v.astype(np.float32) - old[k].astype(np.float32)
        r = residual.get(k)
        if r is not None and r.shape == delta.shape:
            delta = delta + r
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        qk = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
        carry[k] = (delta - qk.astype(np.float32) * np.float32(scale)).astype(np.float32)
        q[k] = Array(qk)
        scales.append(scale)
    records = {"arrays": ArrayRecord({k: q[k] for k in new}),  # the model's own order
               SCALES_KEY: ArrayRecord({"scales": Array(np.asarray(scales, np.float32))})}
    return records, carry


def _in_order_of(global_: ArrayRecord, got: dict) -> list[str]:
    """The update's names in the global model's order (then any others): Flower's FedAvgM
    pairs the aggregate with its current model by position, not by name, so an update in
    another order would subtract mismatched arrays."""
    return [k for k in global_ if k in got] + [k for k in got if k not in global_]


def sends_changes(records: dict[str, ArrayRecord]) -> bool:
    """Whether an update holds changes from the global model (fp16, int8), not weights."""
    return SCALES_KEY in records or any(a.dtype == "float16"  # no decoding of the arrays
                                        for a in records["arrays"].values())


def decode_update(records: dict[str, ArrayRecord], global_: ArrayRecord) -> ArrayRecord:
    """fp32 weights from what a clinic sent (any encoding above; a change is added to
    `global_`, the server's own model), in the global model's array order; raises ValueError
    on a malformed update (unknown dtype, names, scale count or non-finite scales)."""
    arrays = records["arrays"]
    got = _np(arrays)
    dtypes = {v.dtype for v in got.values()}
    if SCALES_KEY not in records:
        if dtypes <= {np.dtype(np.float32)}:
            if list(arrays.keys()) == _in_order_of(global_, got):
                return arrays
            return ArrayRecord({k: arrays[k] for k in _in_order_of(global_, got)})
        if dtypes <= {np.dtype(np.float16)}:
            scale = dict.fromkeys(got, 1.0)
        else:
            raise ValueError(f"update arrays have dtypes {sorted(map(str, dtypes))}; expected "
                             "float32 or float16 (or int8 with scales)")
    elif dtypes != {np.dtype(np.int8)}:
        raise ValueError("an update with scales must be int8")
    else:
        scales = (records[SCALES_KEY]["scales"].numpy() if "scales" in records[SCALES_KEY]
                  else None)
        if scales is None or scales.shape != (len(got),) or not np.all(np.isfinite(scales)):
            raise ValueError("int8 update: scales missing, of the wrong count or not finite")
        scale = dict(zip(sorted(got), scales.tolist(), strict=True))
    old = _np(global_)
    if set(old) != set(got):
        raise ValueError("update: array names differ from the global model's")
    return ArrayRecord({k: Array((old[k].astype(np.float32) + got[k].astype(np.float32)
                                  * np.float32(scale[k])).astype(np.float32))
                        for k in _in_order_of(global_, got)})
