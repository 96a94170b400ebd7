"""The global model sent to clinics in half precision, the server's fp32 model kept exact.

`federation.download: fp16` halves the bytes of every train message: the model's fp32 arrays
go out rounded to fp16 (an array with a value outside fp16's range stays fp32). The server
keeps its fp32 model g. A clinic trains from the rounded model and sends its weights w back;
before the strategy sees them the server adds what the rounding dropped,
r = g - fp32(fp16(g)), so the update is measured from the model the clinic actually started
from and applied to g: w + r = g + (w - fp16(g)). An array the clinic did not change comes
back as g bit for bit. Without the correction the global model would lose its low bits every
round (training small steps in fp16 weights). r is computed again from g when a reply comes
in, not kept: g stays with the strategy anyway, and r would be another fp32 copy of the model.
fp16 and int8 uploads are changes from what the clinic received, added to g already
(shared/upload.py), so they need no correction.

Nothing about a clinic changes: it loads fp16 arrays into its fp32 model as it loads fp32
ones (shared/fedio.py: load_model_arrays).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def _rounded(v: np.ndarray) -> np.ndarray | None:
    """`v` in fp16, or None when it is not fp32 or does not fit fp16's range. torch's cast,
    as the clinic's fp16 encoder uses (the same bits as numpy's, faster here)."""
    if v.dtype != np.float32:
        return None
    h = torch.from_numpy(np.ascontiguousarray(v)).half().numpy()
    return h if np.all(np.isfinite(h)) else None


def half_precision(arrays: ArrayRecord) -> ArrayRecord:
    """`arrays` with every finite fp32 array that fits fp16's range rounded to fp16 (the
    others as they are, same order)."""
    out: dict[str, Array] = {}
    for k, a in arrays.items():
        h = _rounded(a.numpy())
        out[k] = a if h is None else Array(h)
    return ArrayRecord(out)


def from_rounded_start(weights: ArrayRecord, global_: ArrayRecord) -> ArrayRecord:
    """fp32 weights a clinic trained from `half_precision(global_)`, moved onto `global_`:
    each array that went out rounded plus what the rounding dropped."""
    out: dict[str, Array] = {}
    for k, a in weights.items():
        g = global_[k].numpy() if k in global_ else None
        h = None if g is None else _rounded(g)
        v = a.numpy()
        if h is None or h.shape != v.shape:
            out[k] = a
        else:
            out[k] = Array((v.astype(np.float32) + (g - h.astype(np.float32))).astype(np.float32))
    return ArrayRecord(out)
