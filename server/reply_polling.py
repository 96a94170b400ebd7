"""How the ServerApp waits for a reply's arrays on its SuperLink.

Flower 1.42's deployment Grid (`flwr.superlink.grid.http_grid.HttpGrid`) lists a clinic's
reply as soon as the SuperLink has its message, possibly before the clinic's SuperNode has
uploaded all of its objects, and a fetch of an object not there yet backs off 1 s doubling to
10 s (flwr.supercore.constant PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP). Measured on the
quiet VM (docs/speed.md, "Deployment overhead"): pulling the first train reply of a round took
2.1-3.9 s against 0.7-0.9 s for the next one. The SuperLink is the coordinator's own, usually
on the same machine: ask again after 0.05 s doubling to 0.5 s instead. Relies on Flower 1.42
internals (the module-level name `pull_objects` in http_grid); recheck on a Flower upgrade.
"""

from __future__ import annotations

import functools

REPLY_OBJECT_POLL_INITIAL, REPLY_OBJECT_POLL_CAP = 0.05, 0.5


def poll_reply_objects_briskly() -> bool:
    """Patch the deployment Grid's object fetch backoff; False if this Flower has no such
    name (then Flower's own backoff applies)."""
    try:
        from flwr.superlink.grid import http_grid
    except ImportError:
        return False
    pull = getattr(http_grid, "pull_objects", None)
    if pull is None:
        return False
    if isinstance(pull, functools.partial):  # already patched in this process
        return True
    # Not Flower's per-object try count (500: ~4 min at this backoff, ~80 min at its own, and
    # a clinic on a slow link uploads its reply for minutes) but its overall PULL_MAX_TIME.
    http_grid.pull_objects = functools.partial(
        pull, initial_backoff=REPLY_OBJECT_POLL_INITIAL, backoff_cap=REPLY_OBJECT_POLL_CAP,
        max_tries_per_object=None)
    return True
