"""Keep a simulation's Ray actors when Ray refuses a message.

Flower 1.42's Ray backend takes an idle actor from its pool (`BasicActorPool.submit`), then
hands it the message; if that hand-off raises (Ray refusing to store the message's arguments,
e.g. "Local disk is full" once Ray's temp dir is 95% used), the actor never returns to the
pool, though nothing happened to it. The backend still runs one worker thread per actor it
created, so from then on some message finds the pool empty ("pop from empty list") and every
later round loses clinics. Seen on CI: one refused message in round 1, and rounds 1 and 2
ended with 3 and 1 of 4 clinics. The patch puts the actor back before the error goes on, as
Flower already does when the actor's own run fails. Relies on Flower 1.42 internals
(`flwr.simulation.ray_transport.ray_actor.BasicActorPool`); recheck on a Flower upgrade.
"""

from __future__ import annotations

from typing import Any


def keep_actors_on_refused_messages() -> bool:
    """Patch Flower's Ray actor pool; False if this Flower has none. Call it only in a
    simulation's process (`InMemoryGrid`): it imports Flower's Ray backend, and so Ray, which
    the simulation's backend imports anyway and a deployment's ServerApp never needs."""
    try:
        from flwr.simulation.ray_transport import ray_actor
    except ImportError:  # Flower without its simulation extra
        return False
    pool = getattr(ray_actor, "BasicActorPool", None)
    if pool is None or not hasattr(pool, "submit"):
        return False
    if getattr(pool.submit, "_dentfed_keeps_actor", False):  # already patched
        return True

    def submit(self: Any, actor_fn: Any, job: tuple) -> Any:
        actor = self.pool.pop()
        app_fn, message, cid, context = job
        try:
            future = actor_fn(actor, app_fn, message, cid, context)
        except BaseException:
            self.pool.append(actor)  # the actor ran nothing: it is still idle
            raise
        self._future_to_actor[future] = actor
        return future

    submit._dentfed_keeps_actor = True  # type: ignore[attr-defined]
    pool.submit = submit
    return True
