"""The `dentfed coordinator` and `dentfed clinic` command groups (see dentfed/deploy.py)."""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from dentfed import deploy
from dentfed.app_bundle import stage_app
from shared.errors import DentfedError

DEFAULT_HOME = Path.home() / ".dentfed" / "coordinator"


def _home(args: argparse.Namespace) -> Path:
    return Path(args.home).expanduser().resolve()


def _certs(args: argparse.Namespace) -> int:
    from dentfed.pki import make_certificates

    c = make_certificates(args.out, args.clinics, hosts=args.host, days=args.days,
                          overwrite=args.force, ca_key_dir=args.ca_key_dir)
    print(f"wrote {c.ca_cert.parent}: ca.crt (give to every clinic), server.crt/server.key "
          f"(SuperLink only), {len(c.clinic_keys)} clinic key pair(s) clinic_K + clinic_K.pub "
          "(private key to that clinic only; register the .pub)")
    print(f"wrote {c.ca_key}: the CA's private key (0600): give it to nobody; keep it offline "
          "to sign certificates later")
    print("throw-away CA: for tests and first set-ups; use your organisation's CA in production")
    return 0


def _start(args: argparse.Namespace) -> int:
    certs = Path(args.certs)
    home = _home(args)
    home.mkdir(parents=True, exist_ok=True)
    host, _, port = args.address.rpartition(":")
    dial = f"{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}"
    deploy.write_connection(home, dial, certs / "ca.crt")
    db = Path(args.state).expanduser().resolve() if args.state else home / "superlink.db"
    cmd = deploy.superlink_command(certs, args.address, db,
                                   messages_in_memory=not args.messages_on_disk,
                                   link_state_in_memory=not args.link_state_on_disk)
    print(f"flwr CLI connection '{deploy.CONNECTION}' -> {dial} written to {home}/config.toml "
          f"(use FLWR_HOME={home} with plain flwr commands)")
    return deploy.run_foreground(cmd, deploy.flower_env(home))


def _register(args: argparse.Namespace) -> int:
    home = _home(args)
    if not (home / "config.toml").is_file():
        raise DentfedError(f"no SuperLink connection in {home}; run `dentfed coordinator "
                           "start` first (or pass --home)")
    rc = 0
    for key in args.public_key:
        cmd = deploy.register_command(Path(key))
        deploy.show(cmd)
        rc = max(rc, subprocess.run(cmd, env=deploy.flower_env(home)).returncode)
    return rc


def _run(args: argparse.Namespace) -> int:
    home = _home(args)
    if not args.resume and not args.config:
        raise DentfedError("--config is required (or --resume to continue --run-dir)")
    config = Path(args.run_dir) / "config.yaml" if args.resume else Path(args.config)
    if not config.is_file():
        raise DentfedError(f"config not found: {config}")
    from shared.config import load_config

    cfg = load_config(config)  # the whole schema, before `flwr run` starts anything
    if args.test_manifest:
        from shared.config import with_overrides

        cfg = with_overrides(cfg, {"federation.test_manifest": args.test_manifest})
    from server.resume import CHECKPOINT, check_resumable

    if args.resume:
        from server.checkpoint import kept_federation_id  # torch: only here

        check_resumable(cfg, clinic_state_kept=bool(kept_federation_id(Path(args.run_dir))))
    elif (Path(args.run_dir) / CHECKPOINT).exists():
        raise DentfedError(f"{args.run_dir} already holds a checkpointed run: continue it "
                           "with --resume or choose another --run-dir")
    fid = deploy.federation_id_for(Path(args.run_dir), args.resume)
    with tempfile.TemporaryDirectory(prefix="dentfed-app-") as tmp:
        # flwr packs the app from a staged copy of the checkout (dentfed/app_bundle.py)
        cmd = deploy.run_command(config, Path(args.run_dir),
                                 Path(args.test_manifest) if args.test_manifest else None,
                                 resume=args.resume, federation_id=fid,
                                 app_dir=stage_app(deploy.REPO, Path(tmp) / "app"))
        deploy.show(cmd)
        return subprocess.run(cmd, env=deploy.flower_env(home), cwd=deploy.REPO).returncode


def _keygen(args: argparse.Namespace) -> int:
    from dentfed.pki import make_clinic_key

    key = make_clinic_key(args.out)
    print(f"wrote {key} (private: stays here) and {key}.pub (send to the coordinator)")
    return 0


def _clinic_start(args: argparse.Namespace) -> int:
    manifest = Path(args.manifest)
    if args.config:  # the same check as `dentfed data check`, before anything connects
        from shared.config import load_config
        from shared.data.manifest import read_manifest

        cfg = load_config(args.config)
        m = read_manifest(manifest, cfg.task, default_modality=cfg.data.modality)
        print(f"manifest ok: {len(m)} images")
    cache = None
    if not args.no_image_cache:
        cache = Path(args.cache_dir).expanduser() if args.cache_dir else \
            deploy.default_cache_dir(manifest)
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)  # decoded images: this user only
    state = None
    if not args.no_state_dir:  # the clinic's round state: on its disk, not in every message
        state = deploy.private_dir(Path(args.state_dir) if args.state_dir else
                                   deploy.default_state_dir(manifest, Path(args.ca)))
    cmd = deploy.supernode_command(args.superlink, Path(args.ca), Path(args.key), manifest,
                                   port=args.port, max_retries=args.max_retries,
                                   share_local_model=not args.no_share_local_model,
                                   cache_dir=cache, warm=not args.cold_clientapp,
                                   state_dir=state, brisk_polls=not args.flower_polls)
    if args.cold_clientapp:
        return deploy.run_foreground(cmd, deploy.flower_env())
    return deploy.run_with_worker(cmd, deploy.flower_env(), args.port)


def _clean_state(args: argparse.Namespace) -> int:
    roots = [Path(d).expanduser() for d in args.state_dir] if args.state_dir else (
        sorted(p for p in deploy.STATE_ROOT.iterdir() if p.is_dir())
        if deploy.STATE_ROOT.is_dir() else [])
    found = deploy.clean_state(roots, args.older_than_days, dry_run=args.dry_run)
    for fed, age, size in found:
        gone = age > args.older_than_days
        verb = ("would delete" if args.dry_run else "deleted") if gone else "kept"
        print(f"{verb} {fed}: last used {age:.1f} days ago, {size / 1e6:.1f} MB")
    if not found:
        print("no federation state folders")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    co = sub.add_parser("coordinator", help="run a federation over TLS with authenticated "
                        "clinics (wraps flower-superlink / flwr)").add_subparsers(
        dest="coordinator_command", required=True)
    home_help = f"flwr CLI home for this coordinator (default {DEFAULT_HOME})"

    c = co.add_parser("certs", help="throw-away CA, server certificate and clinic key pairs")
    c.add_argument("--out", required=True)
    c.add_argument("--clinics", type=int, default=2)
    c.add_argument("--host", action="append", help="name or IP clinics dial (repeatable; "
                   "default localhost, 127.0.0.1, ::1)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--force", action="store_true", help="replace an existing set")
    c.add_argument("--ca-key-dir", help="where the CA's private key goes (default "
                   "OUT-ca-private, beside OUT; never inside it)")
    c.set_defaults(func=_certs)

    s = co.add_parser("start", help="start the SuperLink (TLS, SuperNode allow-list)")
    s.add_argument("--certs", required=True, help="folder with ca.crt, server.crt, server.key")
    s.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT to listen on")
    s.add_argument("--state", help="SuperLink database file (default HOME/superlink.db)")
    s.add_argument("--home", default=str(DEFAULT_HOME), help=home_help)
    s.add_argument("--messages-on-disk", action="store_true",
                   help="run flower-superlink as installed, which also writes the arrays of "
                   "every message in flight into the database, instead of keeping them in "
                   "memory (dentfed/superlink.py)")
    s.add_argument("--link-state-on-disk", action="store_true",
                   help="keep Flower's whole link state (runs, their messages' bookkeeping) in "
                   "the database, not only the registered clinics (dentfed/superlink.py)")
    s.set_defaults(func=_start)

    r = co.add_parser("register", help="allow clinics' public keys (flwr supernode register)")
    r.add_argument("public_key", nargs="+")
    r.add_argument("--home", default=str(DEFAULT_HOME), help=home_help)
    r.set_defaults(func=_register)

    u = co.add_parser("run", help="start a federated run (flwr run) on the SuperLink")
    u.add_argument("--config", help="dentfed YAML (not with --resume)")
    u.add_argument("--run-dir", required=True, help="run folder on the coordinator")
    u.add_argument("--test-manifest", help="server-held test set (default: "
                   "federation.test_manifest)")
    u.add_argument("--resume", action="store_true", help="continue --run-dir after its last "
                   "checkpointed round")
    u.add_argument("--home", default=str(DEFAULT_HOME), help=home_help)
    u.set_defaults(func=_run)

    cl = sub.add_parser("clinic", help="join a federation (wraps flower-supernode)"
                        ).add_subparsers(dest="clinic_command", required=True)
    k = cl.add_parser("keygen", help="this clinic's SuperNode key pair")
    k.add_argument("--out", required=True, help="private key path; public key gets .pub")
    k.set_defaults(func=_keygen)

    st = cl.add_parser("start", help="start this clinic's SuperNode")
    st.add_argument("--superlink", required=True, help="coordinator HOST:PORT")
    st.add_argument("--ca", required=True, help="the coordinator's ca.crt")
    st.add_argument("--key", required=True, help="this clinic's private key")
    st.add_argument("--manifest", required=True, help="this clinic's manifest CSV")
    st.add_argument("--config", help="the federation's YAML: check the manifest against its "
                    "task before connecting")
    st.add_argument("--port", type=int, default=9094, help="local port for the SuperNode's "
                    "own ClientApp API")
    st.add_argument("--max-retries", type=int, help="give up after N failed connection tries")
    st.add_argument("--no-share-local-model", action="store_true",
                    help="never send this clinic's personalised model to other clinics, even "
                    "when the federation's cross_site.share_local_models allows it")
    st.add_argument("--cache-dir", help="this clinic's cache of decoded, resized images, "
                    "reused across messages and runs, never sent (default "
                    "~/.dentfed/clinic-cache/<hash of the manifest path>)")
    st.add_argument("--no-image-cache", action="store_true",
                    help="decode every image again for every message")
    st.add_argument("--cold-clientapp", action="store_true",
                    help="let Flower's own SuperExec start every ClientApp process from "
                    "scratch (--isolation subprocess), instead of the warm worker that forks "
                    "them with torch already imported (dentfed/clinic_worker.py)")
    st.add_argument("--flower-polls", action="store_true",
                    help="run flower-supernode with Flower's own waits (a 3 s sleep whenever "
                    "it finds no message, 0.5 s checks for its ClientApp's reply) instead of "
                    "the shorter ones dentfed uses while a federation is active "
                    "(dentfed/supernode.py)")
    st.add_argument("--state-dir", help="this clinic's private round state (optimiser "
                    "moments, SCAFFOLD variate, int8 residual, personalised model), one "
                    "sub-folder per federation, never sent (default ~/.dentfed/clinic-state/"
                    "<hash of the manifest path and the CA certificate>)")
    st.add_argument("--no-state-dir", action="store_true",
                    help="keep that state in Flower's Context only (as before: it travels "
                    "with every message and a resumed federation starts it fresh)")
    st.set_defaults(func=_clinic_start)

    cs = cl.add_parser("clean-state", help="list this clinic's federation state folders and "
                       "delete those unused for a while")
    cs.add_argument("--state-dir", action="append", help="a --state-dir given to `dentfed "
                    f"clinic start` (repeatable; default every folder in {deploy.STATE_ROOT})")
    cs.add_argument("--older-than-days", type=float, default=30.0,
                    help="delete federation folders whose newest file is older (default 30)")
    cs.add_argument("--dry-run", action="store_true", help="list only")
    cs.set_defaults(func=_clean_state)
