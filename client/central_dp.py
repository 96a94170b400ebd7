"""Client side of client-level (central) DP: Flower's clipping mods, applied only when the
coordinator's DP wrapper asks for client-side clipping (it then sends the clipping norm)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from shared.dp_sgd import declined_reason
from shared.fedio import config_from_record


def central_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Clip this clinic's update before it leaves (fixed or adaptive, as configured)."""
    config = msg.content.config_records.get("config")
    if (not msg.metadata.message_type.startswith("train") or config is None
            or KEY_CLIPPING_NORM not in config):
        return call_next(msg, context)
    central = config_from_record(config).privacy.central
    if central is None or not central.clipping.startswith("client"):
        return call_next(msg, context)
    mod = fixedclipping_mod if central.clipping == "client-fixed" else adaptiveclipping_mod
    declined: list[Message] = []

    def inner(m: Message, c: Context) -> Message:
        reply = call_next(m, c)
        if declined_reason(reply) is not None:
            declined.append(reply)
        return reply

    out = mod(msg, context, inner)
    return declined[0] if declined else out  # a budget decline carries no update to clip
