"""Flower's SuperLink with message contents in memory: what `dentfed coordinator start` runs.

`flower-superlink --database FILE` keeps everything in that SQLite file: the registered clinics
and runs, which a coordinator restart must keep, and also every array of every message in
flight, which nothing needs after the message is delivered. Flower 1.42 writes each 5 MB chunk
of a model into the file in its own transaction on its way through (`SqlObjectStore`), and
deletes it again once the recipient confirms: for the demo's 45 MB ResNet-18, ~18 chunk writes
and deletes per clinic per round, on the path of every message (a profile of the SuperLink
during `simulations/bench_deploy.py`: half of its busy samples in SQLite, a quarter in those
object writes and deletes alone; docs/speed.md).

This module runs Flower's own `flower-superlink` entry point with the message contents in
Flower's in-memory object store and everything else in the database as before. What that
changes: a SuperLink restarted mid-run loses the arrays of the messages then in flight. That
run is over anyway (its ServerApp died with the SuperLink; `dentfed coordinator run --resume`
starts a new run from the run folder's checkpoint, whose messages are new), and a SuperNode
that still asks for an old message's arrays gets "unknown object", not a wait.
`dentfed coordinator start --messages-on-disk` runs `flower-superlink` as installed.

If this Flower's SuperLink does not build its stores the way this module knows, it runs
unchanged and says so on stderr.
"""

from __future__ import annotations

import sys
from typing import Any


def messages_in_memory(config_loader: Any = None, superlink_main: Any = None) -> bool:
    """Make the SuperLink keep message contents in memory (its database keeps the rest);
    False, changing nothing, where this Flower has no such seam."""
    try:
        if config_loader is None:
            from flwr.superlink import config_loader
        if superlink_main is None:
            from flwr.superlink import main as superlink_main
        from flwr.server.superlink.linkstate import LinkStateFactory
        from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
        from flwr.supercore.object_store import ObjectStoreFactory
    except ImportError:
        return False
    original = getattr(config_loader, "get_objectstore_linkstate_factories", None)
    other_server = getattr(config_loader, "_is_non_sqlite_database_url", None)
    if original is None or other_server is None or getattr(
            superlink_main, "get_objectstore_linkstate_factories", None) is not original:
        return bool(getattr(original, "dentfed_in_memory", False))  # patched, or unknown

    def factories(database: str, federation_manager: Any) -> tuple[Any, Any]:
        if other_server(database):  # a database server (Flower's enterprise stores): as is
            return original(database, federation_manager)
        objects = ObjectStoreFactory(FLWR_IN_MEMORY_DB_NAME)
        return objects, LinkStateFactory(database, federation_manager, objects)

    factories.dentfed_in_memory = True  # type: ignore[attr-defined]
    config_loader.get_objectstore_linkstate_factories = factories
    superlink_main.get_objectstore_linkstate_factories = factories
    return True


def main() -> None:
    """`flower-superlink` with message contents in memory; the same arguments."""
    if not messages_in_memory():
        print("dentfed superlink: this Flower's SuperLink is not the one dentfed knows; "
              "running it as installed (message contents in its database)", file=sys.stderr,
              flush=True)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
