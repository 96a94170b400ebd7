"""A clinic's own record of everything it sends: a Flower mod around every ClientApp handler.

With `DENTFED_AUDIT_DIR` set in the clinic's environment (the clinic decides, not the
coordinator), each reply is described in one JSON file there: its records, array names, dtypes
and shapes, metric and config keys with their values, or the error text of a failed handler.
Array values are not copied (they are the model update itself). Tests use the files to check
that nothing but the model's trainable arrays and known scalar metrics ever leaves a clinic.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.atomic_files import write_text_atomic

AUDIT_ENV = "DENTFED_AUDIT_DIR"


def describe(reply: Message) -> dict:
    """Everything a reply carries except array values."""
    out: dict = {"message_type": reply.metadata.message_type, "records": {}}
    if reply.has_error():
        out["error"] = reply.error.reason
        return out
    for name, rec in reply.content.array_records.items():
        out["records"][name] = {"kind": "arrays", "arrays": {
            k: {"dtype": str(a.dtype), "shape": list(a.shape)} for k, a in rec.items()}}
    for name, rec in reply.content.metric_records.items():
        out["records"][name] = {"kind": "metrics", "values": dict(rec)}
    for name, rec in reply.content.config_records.items():
        out["records"][name] = {"kind": "config", "values": {k: repr(v) for k, v in rec.items()}}
    return out


def _write(entry: dict) -> None:
    folder = os.environ.get(AUDIT_ENV)
    if not folder:
        return
    write_text_atomic(Path(folder) / f"{uuid.uuid4().hex}.json", json.dumps(entry))


def audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: pass the message on, then describe the reply (or the raised error, which
    Flower sends as the error reply's text) in DENTFED_AUDIT_DIR when that is set."""
    try:
        reply = call_next(msg, context)
    except Exception as e:
        _write({"message_type": msg.metadata.message_type, "records": {},
                "error": f"{type(e).__name__}: {e}"})
        raise
    _write(describe(reply))
    return reply
