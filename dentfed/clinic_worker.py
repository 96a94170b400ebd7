"""A warm SuperExec for a clinic's SuperNode: ClientApp processes forked from a parent that has
already imported torch, torchvision and Flower.

Flower 1.42's SuperNode runs every message in a fresh `flwr-clientapp` process that its
SuperExec starts (`--isolation subprocess`, the default), and Flower keeps nothing warm between
messages (flwrlabs/flower#3670): each message pays the interpreter and the imports again
(about 4-5 CPU-seconds for torch, torchvision and the app on the development VM, 25-50 s of
wall when three clinics start at once on two loaded cores). With `--isolation process` the
SuperNode starts no SuperExec and waits for one to connect to its Runtime API; this module is
that SuperExec. It imports the heavy third-party modules once and, for every ClientApp task it
acquires, forks a child that runs Flower's own `run_clientapp` for that task's token, exactly
as `flwr-clientapp --token` would. Each message still gets its own process (Flower's
isolation between messages stays); only the imports are inherited.

The app's own modules (client/, shared/) are NOT imported here: the child loads the ClientApp
from the run's FAB the way Flower does, so the code that runs is the same as with Flower's
SuperExec. The Runtime API stays on 127.0.0.1, unauthenticated, as in subprocess mode.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

# Imported once in the parent, inherited by every forked ClientApp process. Only third-party
# modules: the ClientApp itself comes from the run's FAB (see the module docstring).
WARM_MODULES = ("numpy", "torch", "torchvision", "pandas", "PIL.Image", "sklearn.model_selection",
                "flwr.app", "flwr.clientapp", "flwr.supernode.runtime.run_clientapp")


FORCE_EXIT_SECONDS = 120


def warm_up() -> None:
    import importlib

    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _reap(children: set[int]) -> None:
    for pid in list(children):
        with contextlib.suppress(ChildProcessError):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
        children.discard(pid)


# How a ClientApp process waits for its message's objects on the SuperNode (seconds): every
# 0.05 s, no backoff. The child starts while its SuperNode is still pulling the message from
# the SuperLink (0.3-0.6 s for the demo model); with a backoff doubling to 0.5 s it asked at
# 0.05, 0.15, 0.35, 0.75 s and so slept up to 0.4 s past the arrival. A poll is one request
# to the SuperNode on this machine.
OBJECT_POLL_INITIAL, OBJECT_POLL_CAP = 0.05, 0.05

# Set in every forked child: this process waits for the app's background writes before it
# exits (client/clinic.py writes the clinic's round state after the reply has gone).
WAITS_FOR_WRITES_ENV = "DENTFED_EXIT_WAITS_FOR_WRITES"


def _poll_message_objects_briskly() -> None:
    """The SuperNode creates the ClientApp task before it has pulled the message's arrays from
    the SuperLink, and a ClientApp asking for an array that is not there yet backs off
    exponentially, 1 s doubling up to 10 s (flwr.supercore.constant PULL_INITIAL_BACKOFF,
    PULL_BACKOFF_CAP). A forked child asks within 0.1 s, so for a 45 MB model it slept through
    1 + 2 + 4 + 8 s while the arrays arrived after a few: most of the per-message wait
    (docs/speed.md, "Deployment overhead"). The SuperNode is on the same machine: poll it
    every OBJECT_POLL_CAP seconds instead."""
    import functools

    import flwr.supernode.runtime.run_clientapp as runtime

    # Flower's per-object try count (500) would give up after ~4 min at this backoff instead
    # of ~80 min at its own; its overall PULL_MAX_TIME (2 h) bounds the wait instead.
    runtime.pull_and_inflate_object_from_tree = functools.partial(
        runtime.pull_and_inflate_object_from_tree,
        initial_backoff=OBJECT_POLL_INITIAL, backoff_cap=OBJECT_POLL_CAP,
        max_tries_per_object=None)


def _run_child(address: str, token: str, parent_pid: int | None) -> None:
    """In the forked child: one ClientApp task, as `flwr-clientapp --token` runs it."""
    code = 1
    try:
        import flwr.supercore.exit.exit as flwr_exit_module
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        # Flower's flwr_exit gives the ClientApp's exit handlers 5 s before os._exit; one of
        # them pushes the task's Context back to the SuperNode, and with AdamW state kept in
        # context.state (2 x the model) that push took longer on a loaded 2-core machine: the
        # process died mid-request (SuperNode log: push-task-output ClientDisconnect), the
        # clinic's state for the next round was lost and the SuperNode sent a second, error
        # reply. This child exits right after anyway; give the push time to finish.
        flwr_exit_module.FORCE_EXIT_TIMEOUT_SECONDS = FORCE_EXIT_SECONDS
        _poll_message_objects_briskly()
        os.environ[WAITS_FOR_WRITES_ENV] = "1"

        run_clientapp(runtime_api_address=address, token=token, insecure=True,
                      certificates=None, parent_pid=parent_pid,
                      runtime_dependency_install=False)
        code = 0
    except SystemExit as e:  # flwr_exit ends every task with sys.exit
        code = e.code if isinstance(e.code, int) else 0
    finally:
        _wait_for_background_writes()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _wait_for_background_writes() -> None:
    """os._exit ends threads mid-write: first let the app's background writes (the clinic's
    round state, written while Flower pushes the reply) finish, as an interpreter exit would.
    The app's own module from the run's FAB, if this task loaded it."""
    files = sys.modules.get("shared.atomic_files")
    wait = getattr(files, "wait_for_background_writes", None)
    if wait is not None:
        with contextlib.suppress(Exception):
            wait(FORCE_EXIT_SECONDS)


def serve(address: str, parent_pid: int | None, poll_interval: float) -> None:
    """Acquire ClientApp tasks from the SuperNode's Runtime API for ever; one forked child
    per task."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker())
    children: set[int] = set()
    print(f"dentfed clinic worker: warm (pid {os.getpid()}), serving ClientApp tasks of the "
          f"SuperNode at {address}", file=sys.stderr, flush=True)
    while True:
        _reap(children)
        res = client.AcquireTask(AcquireTaskRequest(
            supported_task_types=[str(TaskType.CLIENT_APP)]))
        if res.HasField("task") and res.token:
            if res.task.type != str(TaskType.CLIENT_APP):
                print(f"dentfed clinic worker: ignoring task of type {res.task.type!r}",
                      file=sys.stderr, flush=True)
            else:
                pid = os.fork()
                if pid == 0:
                    _run_child(address, res.token, parent_pid)
                children.add(pid)
                continue  # another task may be waiting: ask again at once
        time.sleep(poll_interval)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime-api-address", required=True,
                    help="the SuperNode's Runtime API, 127.0.0.1:PORT (its --port)")
    ap.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) "
                    "is gone")
    ap.add_argument("--poll-interval", type=float, default=0.1,
                    help="seconds between task polls (Flower's SuperExec: 1)")
    args = ap.parse_args(argv)
    warm_up()
    serve(args.runtime_api_address, args.parent_pid, args.poll_interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
