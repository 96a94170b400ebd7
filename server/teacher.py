"""The MDE teacher under federation with `pretrain.federated_teacher_momentum`.

Without it each clinic's teacher restarts from the received global encoder every round, a
few local steps old (docs/pretraining.md, "Under federation"). With momentum m the
coordinator keeps T, a moving average of the global encoders: T = G_0 before round 1 and
T <- m * T + (1 - m) * G_r after every completed round r (a skipped round leaves it). From
round 2 on T goes out with the global arrays (shared.fedio.TEACHER_KEY, encoder arrays
only) and each clinic's teacher starts the round from it, then follows the clinic's student
by the per-step EMA as before. The clinics' targets thus lag the global model by about
1 / (1 - m) rounds, as the pooled teacher lags by about 1 / (1 - ema_momentum) steps. T is
in the checkpoint, so a resumed run continues with it.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

TeacherArrays = dict[str, np.ndarray]


def initial_teacher(arrays: ArrayRecord) -> TeacherArrays:
    """T = the global encoder (the arrays named `encoder.`...), fp32 copies."""
    return {k: np.array(a.numpy(), dtype=np.float32) for k, a in arrays.items()
            if k.startswith("encoder.")}


def updated_teacher(teacher: TeacherArrays, arrays: ArrayRecord, momentum: float
                    ) -> TeacherArrays:
    """m * T + (1 - m) * G for the new global arrays G."""
    return {k: (momentum * t + (1 - momentum) * arrays[k].numpy()).astype(np.float32)
            for k, t in teacher.items()}


def teacher_record(teacher: TeacherArrays) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in teacher.items()})
