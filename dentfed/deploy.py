"""`dentfed coordinator ...` and `dentfed clinic ...`: the plain Flower deployment commands
(flower-superlink, flwr supernode register, flower-supernode, flwr run) with dentfed's
defaults filled in, so nobody types certificate flags by hand. Every command prints the Flower
command line it runs; the same lines typed by hand work the same (docs/deploy.md).

Defaults that matter: TLS always (there is no --insecure here), SuperNode authentication in
allow-list mode, telemetry and update checks off, no runtime installation of app dependencies,
the registered clinics in a SQLite file so that they survive a coordinator restart (messages
and runs in memory: dentfed/superlink.py).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from shared.atomic_files import write_text_atomic
from shared.errors import DentfedError

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "dentfed"
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def flower_bin(name: str) -> str:
    """A Flower executable from this environment (they sit beside the interpreter)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flower_env(home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **QUIET,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DentfedError(f"{what} not found: {path}")
    return path.resolve()


def superlink_command(certs: Path, address: str = "0.0.0.0:9092",
                      database: Path | None = None,
                      messages_in_memory: bool = True,
                      link_state_in_memory: bool = True) -> list[str]:
    """flower-superlink with TLS from `certs` (ca.crt, server.crt, server.key) and allow-list
    SuperNode authentication. `messages_in_memory`: through dentfed/superlink.py, which keeps
    the arrays of messages in flight out of the database, and with `link_state_in_memory`
    also the runs and their messages' bookkeeping (the registered clinics stay in it); False:
    `flower-superlink` as installed."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DentfedError(f"--address must be HOST:PORT, got {address!r}")
    launcher = ([sys.executable, "-m", "dentfed.superlink"] if messages_in_memory
                else [flower_bin("flower-superlink")])
    cmd = [*launcher,
           "--ssl-ca-certfile", str(_need(certs / "ca.crt", "CA certificate")),
           "--ssl-certfile", str(_need(certs / "server.crt", "server certificate")),
           "--ssl-keyfile", str(_need(certs / "server.key", "server key")),
           "--enable-supernode-auth", "--host", host.strip("[]"), "--port", port,
           # The ServerApp runs in this installed, pinned environment; no `uv sync` of a
           # submitted app's dependencies from the network on the coordinator.
           "--disable-runtime-dependency-installation"]
    if database is not None:
        cmd += ["--database", str(database)]
    if messages_in_memory and not link_state_in_memory:
        from dentfed.superlink import LINK_STATE_ON_DISK_FLAG

        cmd.append(LINK_STATE_ON_DISK_FLAG)
    return cmd


def write_connection(home: Path, address: str, ca_cert: Path) -> Path:
    """The flwr CLI's connection to the coordinator's SuperLink ([superlink.dentfed] in
    FLWR_HOME/config.toml), so `flwr supernode register` and `flwr run` use TLS."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    ca = _need(ca_cert, "CA certificate")
    text = (f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{address}"\nroot-certificates = "{ca}"\n')
    write_text_atomic(path, text)
    return path


def register_command(public_key: Path) -> list[str]:
    return [flower_bin("flwr"), "supernode", "register",
            str(_need(public_key, "clinic public key")), CONNECTION]


def run_command(config: Path, run_dir: Path, test_manifest: Path | None = None,
                resume: bool = False, app_dir: Path = REPO, stream: bool = True,
                federation_id: str | None = None) -> list[str]:
    """`flwr run` of the dentfed app against the coordinator's SuperLink. Paths are made
    absolute: the ServerApp runs in another working directory. `federation_id`: names each
    clinic's state folder for this federation (see `federation_id_for`)."""
    conf = {"config": str(Path(config).resolve()), "run-dir": str(Path(run_dir).resolve()),
            "resume": "true" if resume else "false"}
    if federation_id:
        from shared.fedio import FEDERATION_ID_KEY, check_federation_id  # torch: not at import

        conf[FEDERATION_ID_KEY] = check_federation_id(federation_id)
    if test_manifest is not None:
        conf["test-manifest"] = str(_need(Path(test_manifest), "test manifest"))
    overrides = " ".join(f"{k}={v}" if v in ("true", "false") else f'{k}="{v}"'
                         for k, v in conf.items())
    return [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", overrides,
            *(["--stream"] if stream else [])]


def federation_id_for(run_dir: Path, resume: bool) -> str:
    """The federation id for `dentfed coordinator run`: a new random one for a new run (the
    ServerApp keeps it in the run folder), the run folder's own for `--resume`, so every clinic
    continues from its own state of this federation (docs/deploy.md, Faults and resume)."""
    from server.checkpoint import kept_federation_id  # torch: not at import
    from shared.fedio import new_federation_id

    if resume:
        kept = kept_federation_id(run_dir)
        if kept:
            return kept
        print(f"dentfed: {run_dir} keeps no federation id (a run from before them): the "
              "clinics' optimiser state / SCAFFOLD variate / int8 residual start fresh",
              file=sys.stderr, flush=True)
    return new_federation_id()


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


STATE_ROOT = Path.home() / ".dentfed" / "clinic-state"


def default_state_dir(manifest: Path, ca_cert: Path) -> Path:
    """The clinic's private state folder for this manifest and coordinator:
    ~/.dentfed/clinic-state/<hash of the manifest's path and the coordinator's CA
    certificate>. Federations of one coordinator then get `<this>/<federation-id>/`; another
    coordinator (another CA) gets another folder whatever ids it sends."""
    return STATE_ROOT / _digest(str(Path(manifest).resolve()), Path(ca_cert).read_bytes())


def clean_state(roots: list[Path], older_than_days: float, dry_run: bool = False
                ) -> list[tuple[Path, float, int]]:
    """Each federation folder `<root>/<federation-id>/` (its round state files, personalised
    model) under `roots`, with its age in days (newest file) and size in bytes; those older
    than `older_than_days` are deleted unless `dry_run`."""
    import shutil

    found = []
    now = time.time()
    for root in roots:
        for fed in sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() \
                else []:
            files = [f for f in fed.rglob("*") if f.is_file()]
            newest = max((f.stat().st_mtime for f in files), default=fed.stat().st_mtime)
            age = (now - newest) / 86400
            found.append((fed, age, sum(f.stat().st_size for f in files)))
            if age > older_than_days and not dry_run:
                shutil.rmtree(fed)
    return found


def default_cache_dir(manifest: Path) -> Path:
    """The clinic's image cache folder for this manifest (one per manifest, so two clinics on
    one machine never share one): ~/.dentfed/clinic-cache/<hash of the manifest's path>."""
    digest = hashlib.sha256(str(Path(manifest).resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".dentfed" / "clinic-cache" / digest


def private_dir(path: Path) -> Path:
    """`path` made (with its parents) and set to mode 0700: the clinic's user only."""
    path = Path(path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def supernode_command(superlink: str, ca_cert: Path, private_key: Path, manifest: Path,
                      port: int = 9094, max_retries: int | None = None,
                      share_local_model: bool = True, cache_dir: Path | None = None,
                      warm: bool = False, state_dir: Path | None = None,
                      brisk_polls: bool = True) -> list[str]:
    """flower-supernode for one clinic: TLS against `ca_cert`, authenticated with the
    clinic's private key, its data named only in its own node config. `share_local_model`
    False: the clinic keeps its personalised model even when the federation's config lets
    local models travel (federation.cross_site.share_local_models). `cache_dir`: where its
    ClientApp keeps decoded images between messages and runs (node config `cache-dir`; a
    SuperNode starts a fresh ClientApp process for every message, so without it every
    message decodes its images again). `warm`: `--isolation process`, for the warm ClientApp
    worker (dentfed/clinic_worker.py) instead of Flower's SuperExec. `state_dir`: where its
    ClientApp keeps its private round state (node config `state-dir`; AdamW moments, SCAFFOLD
    variate, int8 residual, in `<state_dir>/<federation-id>/`), read back by the next round and
    by a resumed federation; without it that state rides in Flower's Context through every
    message and a resumed federation starts it fresh. `brisk_polls`: Flower's SuperNode with
    its hard-coded waits shortened (dentfed/supernode.py); False: `flower-supernode` as
    installed."""
    node = f'manifest="{_need(manifest, "manifest")}"'
    if cache_dir is not None:
        node += f' cache-dir="{Path(cache_dir).resolve()}"'
    if state_dir is not None:
        node += f' state-dir="{Path(state_dir).resolve()}"'
    if not share_local_model:
        node += ' share-local-model="false"'
    launcher = ([sys.executable, "-m", "dentfed.supernode"] if brisk_polls
                else [flower_bin("flower-supernode")])
    cmd = [*launcher, "--superlink", superlink,
           "--root-certificates", str(_need(ca_cert, "CA certificate")),
           "--auth-supernode-private-key", str(_need(private_key, "clinic private key")),
           "--node-config", node,
           "--port", str(port)]
    if warm:
        cmd += ["--isolation", "process"]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def worker_command(runtime_port: int, supernode_pid: int) -> list[str]:
    """The warm ClientApp worker (dentfed/clinic_worker.py) for a SuperNode started with
    `--isolation process` and Runtime API port `runtime_port`."""
    return [sys.executable, "-m", "dentfed.clinic_worker", "--runtime-api-address",
            f"127.0.0.1:{runtime_port}", "--parent-pid", str(supernode_pid)]


def run_with_worker(cmd: list[str], env: dict[str, str], runtime_port: int) -> int:
    """Run a SuperNode (`cmd`, with `--isolation process`) in the foreground together with
    its warm ClientApp worker; stop the worker when the SuperNode ends, and the SuperNode when
    the worker dies (it would accept messages nobody runs); Ctrl-C stops both."""
    show(cmd)
    node = subprocess.Popen(cmd, env=env)
    wcmd = worker_command(runtime_port, node.pid)
    show(wcmd)
    worker = subprocess.Popen(wcmd, env=env)
    try:
        while node.poll() is None:
            if worker.poll() is not None:
                print(f"dentfed: the ClientApp worker exited with code {worker.returncode}; "
                      "stopping the SuperNode", file=sys.stderr, flush=True)
                node.terminate()
                node.wait()
                return worker.returncode or 1
            time.sleep(1)
        return node.returncode
    except KeyboardInterrupt:
        node.terminate()
        return node.wait()
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.kill()


def show(cmd: list[str]) -> None:
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)


def run_foreground(cmd: list[str], env: dict[str, str]) -> int:
    """Run a long-lived Flower process in the foreground; Ctrl-C stops it cleanly."""
    show(cmd)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()
