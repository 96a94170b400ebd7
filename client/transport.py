"""The ClientApp's side of packed transport (shared/packed_transport.py)."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from shared.packed_transport import pack_arrays, unpack_arrays


def packed_transport_mod(msg: Message, context: Context, call_next: ClientAppCallable
                         ) -> Message:
    """Outermost mod: unpack a packed message before anything else reads it, and pack the
    reply's arrays on the way out, but only if the message came packed (a coordinator that
    does not pack gets what it sent)."""
    packed = unpack_arrays(msg.content)
    reply = call_next(msg, context)
    if packed and not reply.has_error():
        pack_arrays(reply.content)
    return reply
