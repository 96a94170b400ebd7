"""Run the repo's Flower app on Flower's simulation runtime, the non-deprecated way.

`flwr run` needs a SuperLink. Flower's managed `:local:` one listens on fixed ports, detaches,
and outlives the run; here we start `flower-superlink --simulation` ourselves on free loopback
ports in its own process group with a private FLWR_HOME, submit the run with `flwr run`, and
stop everything afterwards, so nothing is left running and parallel runs don't collide.
SuperExec and the Ray workers start their own sessions, so a process-group kill is not enough:
every process we start carries a unique DENTFED_SIM_TAG in its environment, and the sweep at
the end kills whatever still has it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from dentfed.app_bundle import stage_app
from shared.errors import DentfedError

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Ray's default is 0.95 (see engine_env).
RAY_DISK_THRESHOLD = "0.99"
PROGRESS = re.compile(r"\[ROUND \d+/\d+\]|dentfed\.server|ERROR|Traceback")


# Ray's default worker ports are 10002-19999; free_port() picks above them.
FIRST_FREE_PORT = 20000


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for ports of outgoing connections and of bind(0) (Linux's
    ip_local_port_range; its default where that file is absent)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return lo, hi


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, for a server started next.

    Picked at random below the kernel's ephemeral range rather than with bind(0): a bind(0)
    port is free when we look, but it lies in the range every outgoing connection on the
    machine takes its local port from, so another process's connect() can take it before our
    server binds it, and the server exits with "address already in use" (a SuperNode that
    never came online on CI)."""
    lo, _ = ephemeral_port_range()
    rng = random.SystemRandom()
    for _ in range(100 if lo - FIRST_FREE_PORT >= 1000 else 0):
        port = rng.randrange(FIRST_FREE_PORT, lo)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a machine without room below its ephemeral range
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_taken(log: Path) -> bool:
    """Whether a server's log says its port was taken between free_port() and its bind."""
    return log.is_file() and "address already in use" in log.read_text(errors="replace")


def _wait_port(port: int, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DentfedError(f"flower-superlink exited with code {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DentfedError(f"flower-superlink did not open port {port} within {timeout:.0f} s")


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _tagged_pids(tag: str, also: str | None = None) -> list[int]:
    needles = {f"DENTFED_SIM_TAG={tag}".encode()} | ({also.encode()} if also else set())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needles & set((entry / "environ").read_bytes().split(b"\0")):
                pids.append(int(entry.name))
    return pids


def kill_tagged(tag: str, grace: float = 5.0, also: str | None = None) -> None:
    """SIGTERM, then SIGKILL, every process whose environment carries our tag (Linux), or
    the entry `also` (e.g. the run's FLWR_HOME=...). Ray's agents retitle themselves
    (setproctitle), which overwrites the start of what /proc shows of their environment
    (seen: two agents of a killed run without the tag, left running): the run's processes
    get FLWR_HOME and the tag as their last entries (`simulation_superlink`)."""
    if not Path("/proc").is_dir():
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _tagged_pids(tag, also)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _tagged_pids(tag, also):
            time.sleep(0.2)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail in one line when nothing listens at a Ray cluster's HOST:PORT (the head's GCS
    port, 6379 unless `ray start --head --port` said otherwise)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise DentfedError(f"ray address {address!r}: expected HOST:PORT of the cluster's head "
                           "(the address `ray start --head` prints)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise DentfedError(f"no Ray cluster at {address} ({e.strerror or e}); start one with "
                           "`ray start --head` (docs/scale.md)") from None


def engine_env(home: Path, tag: str, ray_address: str | None) -> dict[str, str]:
    """The environment of the SuperLink and `flwr run` (and so of Ray and every ClientApp)."""
    last = ("FLWR_HOME", "DENTFED_SIM_TAG")  # see kill_tagged
    env = {**{k: v for k, v in os.environ.items() if k not in last},
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    # The embedded engine never joins a cluster by accident: without an address, ray.init()
    # would join the last cluster `ray start` left on this machine (/tmp/ray/ray_current_cluster);
    # "local" always starts a private one.
    env["RAY_ADDRESS"] = ray_address or "local"
    # Ray refuses to create any object ("Local disk is full") once its temp dir's file system is
    # 95% used, whatever is left: tens of GB on a large disk. A clinic's message is a few MB,
    # and a refused one fails that clinic's round (its actor is kept: server/actor_pool.py).
    # 99% unless the caller chose a threshold.
    env.setdefault("RAY_local_fs_capacity_threshold", RAY_DISK_THRESHOLD)
    env["FLWR_HOME"], env["DENTFED_SIM_TAG"] = str(home), tag  # last: see kill_tagged
    return env


@contextlib.contextmanager
def simulation_superlink(work: Path, ray_address: str | None = None
                         ) -> Iterator[tuple[int, dict[str, str]]]:
    """A private SuperLink in simulation mode; yields (port, env for flwr). With
    `ray_address`, the simulation process it starts joins that Ray cluster (Flower's Ray
    backend calls ray.init() without an address, which honours RAY_ADDRESS) instead of
    starting a private single-machine Ray."""
    home = work / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    # An inherited tag lets a supervisor (a test that crashes the run on purpose) find and
    # kill everything this run starts.
    tag = os.environ.get("DENTFED_SIM_TAG") or uuid.uuid4().hex
    env = engine_env(home, tag, ray_address)
    log = work / "superlink.log"
    proc = None
    try:
        for attempt in range(3):
            port = free_port()  # flwr >= 1.42 serves runtime, control and fleet APIs on one port
            # No runtime dependency installation: Flower would otherwise `uv sync` a fresh
            # virtual environment for every run (seconds, an index to reach, and other package
            # versions than the ones this environment was tested with).
            cmd = [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation",
                   "subprocess", "--disable-runtime-dependency-installation",
                   "--host", "127.0.0.1", "--port", str(port)]
            with log.open("w") as fh:
                proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            try:
                _wait_port(port, proc, 60, log)
                break
            except DentfedError:
                if attempt == 2 or proc.poll() is None or not port_taken(log):
                    raise
        yield port, env
    finally:
        if proc is not None:
            stop_group(proc)
        kill_tagged(tag, also=f"FLWR_HOME={home}")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_flower_simulation(run_config: dict[str, object], num_clinics: int, client_cpus: float,
                          client_gpus: float, max_concurrent: int, work: Path,
                          timeout: float = 3600, app_dir: Path = REPO,
                          echo: bool = True, ray_address: str | None = None) -> Path:
    """`flwr run` the app in `app_dir` with `num_clinics` virtual SuperNodes; at most
    `max_concurrent` ClientApps train at once (Ray gets max_concurrent * client_cpus CPUs).
    With `ray_address` (HOST:PORT of a running Ray cluster's head) the clinics run on that
    cluster instead: as many at once as its nodes' CPUs/GPUs fit (max_concurrent does not
    apply), and the actors end with the run (they belong to its Ray job).
    Returns the path of the captured Flower log."""
    work.mkdir(parents=True, exist_ok=True)
    ray_cpus = max(1, int(round(max_concurrent * client_cpus)))
    flwr_log = work / "flower.log"
    if ray_address:
        check_ray_address(ray_address)
    with simulation_superlink(work, ray_address) as (control, env):
        Path(env["FLWR_HOME"], "config.toml").write_text(
            '[superlink]\ndefault = "dentfed-sim"\n\n[superlink.dentfed-sim]\n'
            f'address = "127.0.0.1:{control}"\ninsecure = true\n')
        # Ray refuses num_cpus in ray.init() when it joins an existing cluster: the cluster's
        # nodes declare their own resources.
        federation = (f"num-supernodes={num_clinics} "
                      f"client-resources-num-cpus={int(max(1, client_cpus))} "
                      f"client-resources-num-gpus={float(client_gpus)}"
                      + ("" if ray_address else f" init-args-num-cpus={ray_cpus}"))
        overrides = " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())
        # flwr packs the app from a staged copy: walking the checkout (its .venv, data/) cost
        # ~6 s a run (dentfed/app_bundle.py); the bundle is the same
        bundle = stage_app(app_dir, work / "app")
        cmd = [_bin("flwr"), "run", str(bundle), "dentfed-sim", "--stream",
               "--federation-config", federation, "--run-config", overrides]
        with flwr_log.open("w") as fh:
            proc = subprocess.Popen(cmd, env=env, cwd=app_dir, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            def pump() -> None:  # in a thread, so a run that prints nothing still times out
                assert proc.stdout is not None
                for line in proc.stdout:
                    fh.write(line)
                    fh.flush()
                    if echo:
                        sys.stderr.write(line)
                    elif PROGRESS.search(line):  # quiet mode: rounds and problems only
                        sys.stderr.write(ANSI.sub("", line).replace("INFO :", "").strip() + "\n")

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise DentfedError(f"simulation exceeded {timeout:.0f} s; see {flwr_log}"
                                   ) from None
            finally:
                if proc.poll() is None:
                    stop_group(proc)
                reader.join(timeout=10)
        if proc.returncode != 0:
            raise DentfedError(f"flwr run failed with code {proc.returncode}; see {flwr_log}")
    return flwr_log
