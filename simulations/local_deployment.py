"""A real deployment on this machine: a TLS SuperLink with SuperNode authentication started by
`dentfed coordinator start`, clinics registered with `dentfed coordinator register` and started
with `dentfed clinic start`, runs submitted with `dentfed coordinator run`, each as its own
process tree on 127.0.0.1. Used by the deployment tests (tests/test_deploy.py) and the
deployment-overhead benchmark (simulations/bench_deploy.py).

Every process gets a unique environment tag (DENTFED_SIM_TAG) and is killed by it afterwards,
so nothing outlives `close()`, not even the SuperExec and ClientApp processes a SuperNode
starts in their own sessions.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from dentfed import deploy
from dentfed.pki import make_certificates
from simulations.engine import free_port, kill_tagged, port_taken

DENTFED = [sys.executable, "-m", "dentfed.cli"]
# Starts of a server whose port another process took between free_port() and its bind.
PORT_TRIES = 3


class LocalFederation:
    """A coordinator and clinics on this machine, as separate process trees. `keys` clinic key
    pairs are made (clinic k uses key k); `env` is added to every process's environment."""

    def __init__(self, root: Path, keys: int, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.certs = make_certificates(self.root / "certs", clinics=keys)
        self.home = self.root / "coordinator-home"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(env or {})
        self.tags: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.clinic_args: dict[int, tuple[Path, tuple[str, ...]]] = {}

    def start(self, name: str, cmd: list[str], home: Path | None = None) -> subprocess.Popen:
        """Start `cmd` as its own process tree; `home`: its own FLWR_HOME."""
        tag = self.tags.setdefault(name, uuid.uuid4().hex)
        self.logs[name] = self.root / f"{name}.log"
        env = {**deploy.flower_env(home), "DENTFED_SIM_TAG": tag, **self.env}
        with self.logs[name].open("w") as fh:
            self.procs[name] = subprocess.Popen(cmd, env=env, stdout=fh,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True)
        return self.procs[name]

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def kill(self, name: str) -> None:
        kill_tagged(self.tags[name], grace=0.0)
        self.procs[name].wait(timeout=30)
        if name.startswith("clinic"):  # gone on purpose: wait_online no longer expects it
            self.clinic_args.pop(int(name.removeprefix("clinic")), None)

    def close(self) -> None:
        for tag in self.tags.values():
            kill_tagged(tag, grace=2.0)

    def start_coordinator(self, *extra: str, timeout: float = 90) -> None:
        """`dentfed coordinator start`, `extra`: more arguments of that command."""
        for attempt in range(PORT_TRIES):
            self.start("superlink", DENTFED + ["coordinator", "start", "--certs",
                                               str(self.root / "certs"), "--address",
                                               self.address, "--home", str(self.home),
                                               *extra])
            deadline = time.monotonic() + timeout
            while "Uvicorn running on https://" not in self.log("superlink"):
                if self.procs["superlink"].poll() is not None:
                    if attempt + 1 < PORT_TRIES and port_taken(self.logs["superlink"]):
                        break
                    raise RuntimeError("SuperLink exited:\n" + self.log("superlink")[-2000:])
                if time.monotonic() > deadline:
                    raise TimeoutError("SuperLink did not start:\n" +
                                       self.log("superlink")[-2000:])
                time.sleep(0.3)
            else:
                return
            self.port = free_port()  # taken since we picked it: pick another
            self.address = f"127.0.0.1:{self.port}"

    def register(self, k: int) -> None:
        r = subprocess.run(DENTFED + ["coordinator", "register",
                                      str(self.certs.clinic_keys[k]) + ".pub",
                                      "--home", str(self.home)],
                           capture_output=True, text=True, timeout=120, env=deploy.flower_env())
        if r.returncode != 0 or "registered successfully" not in r.stdout:
            raise RuntimeError(f"registering clinic {k} failed:\n{r.stdout}{r.stderr}")

    def state_dir(self, k: int) -> Path:
        """Clinic k's state folder (`--state-dir`; not the default under ~/.dentfed)."""
        return self.root / f"clinic{k}-state"

    def start_clinic(self, k: int, manifest: Path, *extra: str) -> subprocess.Popen:
        """`dentfed clinic start` for clinic k with its own key, manifest and state folder;
        `extra`: more arguments of that command."""
        # Each clinic its own FLWR_HOME, as on its own machine: SuperNodes sharing one install
        # the run's app into the same folder at once, and one may load it half-written.
        self.clinic_args[k] = (manifest, extra)
        return self.start(f"clinic{k}", DENTFED + [
            "clinic", "start", "--superlink", self.address,
            "--ca", str(self.certs.ca_cert), "--key", str(self.certs.clinic_keys[k]),
            "--manifest", str(manifest), "--port", str(free_port()),
            "--max-retries", "3", "--state-dir", str(self.state_dir(k)), *extra],
            home=self.root / f"clinic{k}-home")

    def online(self) -> int:
        r = subprocess.run([deploy.flower_bin("flwr"), "supernode", "list", deploy.CONNECTION,
                            "--format", "json"], capture_output=True, text=True, timeout=120,
                           env=deploy.flower_env(self.home))
        if r.returncode != 0:
            raise RuntimeError(r.stdout + r.stderr)
        return sum(n.get("status") == "online" for n in json.loads(r.stdout)["nodes"])

    def wait_online(self, n: int, timeout: float = 90) -> None:
        """Wait until `n` clinics are online. A clinic whose local port was taken before its
        SuperNode bound it is started again on another; one that exited for any other reason,
        or a timeout, raises with the clinic logs."""
        deadline = time.monotonic() + timeout
        restarts = dict.fromkeys(self.clinic_args, 0)
        while self.online() < n:
            for k, (manifest, extra) in self.clinic_args.items():
                proc = self.procs[f"clinic{k}"]
                if proc.poll() is None:
                    continue
                if port_taken(self.logs[f"clinic{k}"]) and restarts[k] + 1 < PORT_TRIES:
                    restarts[k] += 1
                    LocalFederation.start_clinic(self, k, manifest, *extra)  # same arguments
                    continue
                raise RuntimeError(f"clinic {k} exited with code {proc.returncode}:\n"
                                   + self.log(f"clinic{k}")[-2000:])
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- clinic {k}\n" + self.log(f"clinic{k}")[-1000:]
                                 for k in self.clinic_args)
                raise TimeoutError(f"fewer than {n} clinics came online within {timeout:.0f} "
                                   f"s (online: {self.online()})\n{logs}")
            time.sleep(1)

    def run(self, config: Path, run_dir: Path, test_manifest: Path) -> subprocess.Popen:
        return self.start("run", DENTFED + ["coordinator", "run", "--config", str(config),
                                            "--run-dir", str(run_dir), "--test-manifest",
                                            str(test_manifest), "--home", str(self.home)])


def wait_process(proc: subprocess.Popen, timeout: float, what: str) -> int:
    """The exit code, or AssertionError naming `what` when it runs past `timeout` s."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} did not finish within {timeout} s") from None
