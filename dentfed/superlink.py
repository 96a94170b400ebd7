"""Flower's SuperLink with message contents and run bookkeeping in memory: what `dentfed
coordinator start` runs.

`flower-superlink --database FILE` keeps everything in that SQLite file: the registered clinics,
which a coordinator restart must keep, and also everything about the messages in flight,
which nothing needs once the run is over:

- every array of every message: Flower 1.42 writes each 5 MB chunk of a model into the file
  in its own transaction on its way through (`SqlObjectStore`) and deletes it once the
  recipient confirms. For the demo's 45 MB ResNet-18 that is ~18 chunk writes and deletes per
  clinic per round. A profile of the SuperLink during `simulations/bench_deploy.py` had half
  of its busy samples in SQLite, a quarter in those object writes and deletes alone;
- the link state: runs, messages, the push sessions of their objects, task tokens and node
  heartbeats, read and written through SQLAlchemy by every request (each checks the run's
  status, for one). With the arrays in memory this was most of the SQLite time left.

Here the arrays live in Flower's in-memory object store and the link state in Flower's
`InMemoryLinkState`, except the registered clinics: `flwr supernode register` (`dentfed
coordinator register`) and unregistering also go to the database file, and a SuperLink
started on that file knows them again with the same node ids (`RegisteredClinicsOnDisk`).
What a restart loses: the runs and their messages in flight. A run ended with its ServerApp
anyway (`dentfed coordinator run --resume` starts a new run from the run folder's
checkpoint), and a SuperNode still asking for an old message gets "unknown", not a wait;
`flwr ls` lists only the runs since the start.
`dentfed coordinator start --link-state-on-disk` keeps Flower's link state in the file (the
arrays still in memory), `--messages-on-disk` runs `flower-superlink` as installed.

If this Flower's SuperLink does not build its stores the way this module knows, it runs
unchanged and says so on stderr.
"""

from __future__ import annotations

import sys
from typing import Any

LINK_STATE_ON_DISK_FLAG = "--dentfed-link-state-on-disk"  # ours; taken out before Flower's


def messages_in_memory(config_loader: Any = None, superlink_main: Any = None,
                       link_state_in_memory: bool = True) -> bool:
    """Make the SuperLink keep message contents in memory, and with `link_state_in_memory`
    its link state too, except the registered clinics (the database keeps the rest); False,
    changing nothing, where this Flower has no such seam."""
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
        if link_state_in_memory and database != FLWR_IN_MEMORY_DB_NAME:
            return objects, RegisteredClinicsOnDiskFactory(database, federation_manager,
                                                           objects)
        return objects, LinkStateFactory(database, federation_manager, objects)

    factories.dentfed_in_memory = True  # type: ignore[attr-defined]
    config_loader.get_objectstore_linkstate_factories = factories
    superlink_main.get_objectstore_linkstate_factories = factories
    return True


def _registered_clinics_on_disk_class() -> type:
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    class RegisteredClinicsOnDisk(InMemoryLinkState):
        """Flower's in-memory link state, with node registrations and removals also written
        to Flower's SQL link state in `database`, from which a new instance starts."""

        def __init__(self, database: str, federation_manager: Any, object_store: Any) -> None:
            self._disk = SqlLinkState(database, federation_manager, object_store)
            self._disk.initialize()
            super().__init__(federation_manager, object_store)  # the manager's state: this
            for node in self._disk.get_node_info():
                self._remember(node)

        def _remember(self, node: Any) -> None:
            self.nodes[node.node_id] = node
            self.node_public_key_to_node_id[node.public_key] = node.node_id
            self.owner_to_node_ids.setdefault(node.owner_aid, set()).add(node.node_id)

        def create_node(self, owner_aid: str, owner_name: str, public_key: bytes,
                        heartbeat_interval: float, *, location: str | None = None,
                        name: str | None = None) -> int:
            with self.lock:
                if public_key in self.node_public_key_to_node_id:
                    raise ValueError("Public key already in use")
                node_id = self._disk.create_node(owner_aid, owner_name, public_key,
                                                 heartbeat_interval, location=location,
                                                 name=name)
                if node_id:  # 0: Flower's "unexpected registration failure", logged there
                    self._remember(self._disk.get_node_info(node_ids=[node_id])[0])
                return node_id

        def delete_node(self, owner_aid: str, node_id: int) -> None:
            with self.lock:
                super().delete_node(owner_aid, node_id)
                self._disk.delete_node(owner_aid, node_id)

    return RegisteredClinicsOnDisk


def registered_clinics_on_disk(database: str, federation_manager: Any, object_store: Any
                               ) -> Any:
    """The link state `dentfed coordinator start` runs by default (module docstring)."""
    return _registered_clinics_on_disk_class()(database, federation_manager, object_store)


class RegisteredClinicsOnDiskFactory:
    """Flower's LinkStateFactory interface (`state()`, one instance per SuperLink)."""

    def __init__(self, database: str, federation_manager: Any, objectstore_factory: Any
                 ) -> None:
        import threading

        self.database = database
        self.federation_manager = federation_manager
        self.objectstore_factory = objectstore_factory
        self.state_instance: Any = None
        self._lock = threading.Lock()

    def state(self) -> Any:
        with self._lock:
            if self.state_instance is None:
                self.state_instance = registered_clinics_on_disk(
                    self.database, self.federation_manager, self.objectstore_factory.store())
            return self.state_instance


def main() -> None:
    """`flower-superlink` with message contents (and, unless LINK_STATE_ON_DISK_FLAG, the link
    state but the registered clinics) in memory; otherwise Flower's arguments."""
    link_in_memory = LINK_STATE_ON_DISK_FLAG not in sys.argv
    sys.argv = [a for a in sys.argv if a != LINK_STATE_ON_DISK_FLAG]
    if not messages_in_memory(link_state_in_memory=link_in_memory):
        print("dentfed superlink: this Flower's SuperLink is not the one dentfed knows; "
              "running it as installed (message contents in its database)", file=sys.stderr,
              flush=True)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
