"""The ServerApp and ClientApp modules import without torch, and a simulation's Ray actors
import the clinic's handlers as they start (client/warmup.py). Flower loads both apps under
one lock, and in a simulation it starts Ray only after both have loaded."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import pytest

from client import warmup
from client.app import DeferredClientApp, app


def test_the_apps_import_without_torch_or_the_training_code():
    probe = ("import sys, client.app, server.app; print(sorted(m for m in ('torch', "
             "'torchvision', 'client.handlers', 'server.run', 'ray') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_the_client_app_pickles_as_a_module_name_and_runs_its_handlers():
    # Flower's simulation pickles the loaded ClientApp with every message to an actor.
    again = pickle.loads(pickle.dumps(app))
    assert isinstance(again, DeferredClientApp) and again.module == "client.handlers"
    assert len(pickle.dumps(app)) < 2000
    with pytest.raises(ModuleNotFoundError, match="no_such_handlers"):
        DeferredClientApp("no_such_handlers")(None, None)  # type: ignore[arg-type]


def test_the_warm_up_imports_in_a_background_thread_at_the_lowest_priority(tmp_path,
                                                                          monkeypatch):
    (tmp_path / "warm_probe.py").write_text(
        "import os, threading\n"
        "NICE = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())\n"
        "THREAD = threading.current_thread().name\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    me = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, me)
    warmup.warm_actor("warm_probe").join(timeout=60)
    import warm_probe  # already imported by the thread

    assert warm_probe.THREAD == "dentfed-warm-up"
    assert warm_probe.NICE == 19
    # the nice value is the thread's: the actor's own thread (its training) keeps its own
    assert os.getpriority(os.PRIO_PROCESS, me) == before
    warmup.warm_actor("no_such_module_here").join(timeout=60)  # logged, not raised


def test_flowers_ray_backend_gives_every_actor_the_warm_up(monkeypatch):
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    monkeypatch.setattr(RayBackend, "_validate_actor_arguments",
                        RayBackend._validate_actor_arguments)  # restored after the test
    assert warmup.warm_simulation_actors()
    patched = RayBackend._validate_actor_arguments
    assert warmup.warm_simulation_actors() and RayBackend._validate_actor_arguments is patched
    args = RayBackend._validate_actor_arguments(None, {"actor": {"tensorflow": 0}})
    assert args == {"on_actor_init_fn": warmup.warm_actor}
