"""Warm a simulation's Ray actors: each one imports the clinic's handlers as it starts.

Flower creates the actors when its simulation starts but loads the ClientApp in an actor only
when the actor's first message arrives (round 1), so round 1 used to wait ~5 s on a 2-core VM
for torch, torchvision and the training code to import in every actor, after the server had
already started and scored round 0 with one core mostly idle. Here each actor imports them
in a background thread as soon as it exists, at the lowest CPU priority (Linux: the nice
value is per thread), so the server's own start-up keeps its core. A first message that
arrives earlier waits on Python's import lock for the rest of the import.

Relies on Flower 1.42 internals (`RayBackend._validate_actor_arguments` returns the keyword
arguments of every `ClientAppActor`, whose `on_actor_init_fn` runs in the actor's
constructor); `warm_simulation_actors` returns False where they are missing, and the
actors then load the handlers on their first message as before. Recheck on a Flower upgrade.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from client.timing import mark

log = logging.getLogger("dentfed.client")
HANDLERS = "client.handlers"


def _import(module: str) -> None:
    mark("warm_up")  # DENTFED_TIMING_DIR: the first message's record shows the hook ran
    with contextlib.suppress(AttributeError, OSError):  # not Linux / not allowed: normal
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)  # this thread only
    try:
        importlib.import_module(module)
    except Exception:  # the first message imports it again and reports the error there
        log.debug("warm-up import of %s failed", module, exc_info=True)


def warm_actor(module: str = HANDLERS) -> threading.Thread:
    """A Ray actor's init hook: import `module` in a background thread; returns the thread."""
    thread = threading.Thread(target=_import, args=(module,), name="dentfed-warm-up",
                              daemon=True)
    thread.start()
    return thread


def warm_simulation_actors() -> bool:
    """Make every ClientAppActor that Flower's Ray backend creates in this process run
    `warm_actor`; False if this Flower has no such backend. Call it in Flower's simulation
    process before its backend is built (`client/app.py` does, when Flower imports it)."""
    try:
        from flwr.server.superlink.fleet.vce.backend import raybackend
    except ImportError:  # Flower without its simulation extra
        return False
    backend = getattr(raybackend, "RayBackend", None)
    original: Callable[..., dict[str, Any]] | None = getattr(
        backend, "_validate_actor_arguments", None)
    if original is None:
        return False
    if getattr(original, "_dentfed_warms_actors", False):  # already patched
        return True

    def actor_arguments(self: Any, config: Any) -> dict[str, Any]:
        arguments = dict(original(self, config))
        arguments.setdefault("on_actor_init_fn", warm_actor)  # Flower's TF hook wins
        return arguments

    actor_arguments._dentfed_warms_actors = True  # type: ignore[attr-defined]
    backend._validate_actor_arguments = actor_arguments  # type: ignore[union-attr]
    return True
