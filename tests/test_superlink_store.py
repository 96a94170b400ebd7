"""The coordinator's SuperLink with message contents and runs in memory (dentfed/superlink.py):
the arrays of messages in flight and the link state's bookkeeping stay out of the SQLite file,
registered clinics stay in it. A real SuperLink runs it in every deployment test (`dentfed
coordinator start`, tests/test_deploy.py), which registers clinics and resumes runs."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

from dentfed import deploy
from dentfed.superlink import LINK_STATE_ON_DISK_FLAG, messages_in_memory


def _fresh(module_name: str) -> types.ModuleType:
    """A private copy of a Flower module, so patching it changes nothing else."""
    real = importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location(f"copy_of_{module_name}", real.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_message_contents_in_memory_and_registered_clinics_in_the_database(tmp_path: Path):
    from flwr.supercore.object_store.in_memory_object_store import InMemoryObjectStore
    from flwr.superlink.federation import NoOpFederationManager

    loader, main = _fresh("flwr.superlink.config_loader"), _fresh("flwr.superlink.main")
    # main's binding is its own import of the loader's function; the copy must match it
    main.get_objectstore_linkstate_factories = loader.get_objectstore_linkstate_factories
    assert messages_in_memory(loader, main)
    assert messages_in_memory(loader, main)  # twice in one process: still patched
    assert main.get_objectstore_linkstate_factories is loader.get_objectstore_linkstate_factories

    db = tmp_path / "superlink.db"
    objects, link = loader.get_objectstore_linkstate_factories(
        str(db), NoOpFederationManager(simulation=False))
    state = link.state()
    assert isinstance(objects.store(), InMemoryObjectStore)
    assert state.object_store is objects.store()
    key = b"clinic-public-key"
    node = state.create_node("owner", "owner", key, heartbeat_interval=30)
    assert db.is_file()

    # a restarted SuperLink on the same file still knows the registered clinic
    _, again = loader.get_objectstore_linkstate_factories(
        str(db), NoOpFederationManager(simulation=False))
    assert again.state().get_node_id_by_public_key(key) == node


def _restarted(loader, db: Path):
    from flwr.superlink.federation import NoOpFederationManager

    return loader.get_objectstore_linkstate_factories(
        str(db), NoOpFederationManager(simulation=False))[1].state()


def test_runs_in_memory_registrations_on_disk_and_a_restart_keeps_them(tmp_path: Path):
    """The default link state: Flower's in-memory one (no SQL on any request of a round), with
    `flwr supernode register` and unregistering also in the file, read back at a restart:
    same node ids, an unregistered clinic stays out, a key cannot be registered twice."""
    import pytest
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.supercore.constant import NodeStatus, TaskType

    loader, main = _fresh("flwr.superlink.config_loader"), _fresh("flwr.superlink.main")
    main.get_objectstore_linkstate_factories = loader.get_objectstore_linkstate_factories
    assert messages_in_memory(loader, main)
    db = tmp_path / "superlink.db"
    state = _restarted(loader, db)
    assert isinstance(state, InMemoryLinkState) and not isinstance(state, SqlLinkState)
    kept = state.create_node("owner", "owner", b"key-kept", heartbeat_interval=30)
    gone = state.create_node("owner", "owner", b"key-gone", heartbeat_interval=30)
    assert state.activate_node(kept, 30)  # heartbeats stay in memory
    state.delete_node("owner", gone)
    with pytest.raises(ValueError, match="in use"):
        state.create_node("owner", "owner", b"key-kept", heartbeat_interval=30)
    run = state.create_run(None, None, "fab-hash", {}, "default", None, "owner",
                           TaskType.SERVER_APP)

    again = _restarted(loader, db)
    assert again is not state
    assert again.get_node_id_by_public_key(b"key-kept") == kept
    assert again.get_node_id_by_public_key(b"key-gone") is None
    assert again.get_node_info(node_ids=[kept])[0].status == NodeStatus.REGISTERED
    assert again.activate_node(kept, 30)  # the restarted SuperLink lets the clinic in
    with pytest.raises(ValueError, match="in use"):  # the file refuses a key twice, too
        again.create_node("other", "other", b"key-kept", heartbeat_interval=30)
    assert run not in again.run_ids  # runs are not kept across a restart
    assert again.get_node_id_by_public_key(b"key-kept") == kept


def test_the_link_state_stays_on_disk_when_asked(tmp_path: Path):
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    loader, main = _fresh("flwr.superlink.config_loader"), _fresh("flwr.superlink.main")
    main.get_objectstore_linkstate_factories = loader.get_objectstore_linkstate_factories
    assert messages_in_memory(loader, main, link_state_in_memory=False)
    assert isinstance(_restarted(loader, tmp_path / "superlink.db"), SqlLinkState)


def test_a_flower_without_that_seam_is_left_alone():
    loader = types.SimpleNamespace()  # no get_objectstore_linkstate_factories
    assert messages_in_memory(loader, types.SimpleNamespace()) is False
    assert not hasattr(loader, "get_objectstore_linkstate_factories")


def test_coordinator_start_runs_it_unless_asked_not_to(tmp_path: Path):
    certs = tmp_path
    for name in ("ca.crt", "server.crt", "server.key"):
        (certs / name).write_text("x")
    mem = deploy.superlink_command(certs, "127.0.0.1:9092", tmp_path / "s.db")
    assert mem[:3] == [sys.executable, "-m", "dentfed.superlink"]
    disk = deploy.superlink_command(certs, "127.0.0.1:9092", tmp_path / "s.db",
                                    messages_in_memory=False)
    assert Path(disk[0]).name == "flower-superlink" and mem[3:] == disk[1:]
    runs_on_disk = deploy.superlink_command(certs, "127.0.0.1:9092", tmp_path / "s.db",
                                            link_state_in_memory=False)
    assert runs_on_disk == [*mem, LINK_STATE_ON_DISK_FLAG]
    out = subprocess.run([*mem[:3], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--database" in out.stdout
