"""The coordinator's SuperLink with message contents in memory (dentfed/superlink.py): the
arrays of messages in flight stay out of the SQLite file, registered clinics stay in it. A
real SuperLink runs it in every deployment test (`dentfed coordinator start`,
tests/test_deploy.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

from dentfed import deploy
from dentfed.superlink import messages_in_memory


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
    out = subprocess.run([*mem[:3], "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--database" in out.stdout
