"""Deployment overhead: a real TLS deployment on 127.0.0.1, round wall time vs clinic compute.

Splits the config's manifest (the demo photos by default) into N clinics, starts a SuperLink
with TLS and SuperNode authentication (`dentfed coordinator start`), registers and starts one
SuperNode per clinic (`dentfed clinic start`), runs a few rounds (`dentfed coordinator run`),
all through simulations/local_deployment.py (the same harness as tests/test_deploy.py), once
per variant, one after another in the same invocation, and prints per round:

  train wall     the server's train exchange: train messages sent -> last reply in (the
                 ServerApp's Grid timing, metrics.json `round_seconds`)
  eval wall      the same for the clinic evaluate exchange (`clinic_evaluate_seconds`; in the
                 demo config, without clinic-side evaluation, only the last round has one:
                 the BatchNorm statistics of the other evaluated rounds ride on the next
                 round's train replies)
  compute k      clinic k's own seconds for the round: `train_seconds` (+
                 `bn_statistics_seconds` when its train reply carries BatchNorm statistics)
                 + `evaluate_seconds` from its replies (the training loop, or the
                 evaluation/statistics pass; a
                 fresh process's first decode of the images it touches is inside them)
  overhead       (train wall - max_k train_seconds_k) + (eval wall - max_k evaluate_seconds_k):
                 the seconds a round of clinic exchanges takes beyond the slowest clinic's
                 compute, i.e. the per-round overhead each clinic sees (message transport,
                 Flower's polling, the SuperNode starting a fresh ClientApp process per
                 message, imports, manifest, model build). Goal (issue 16): <= 2 s.

Central evaluation on the server is server compute and printed apart (not in the overhead).
With DENTFED_TIMING_DIR set on the clinics, each ClientApp process records where its own
seconds went (client/timing.py); the medians over all messages are printed as a breakdown.

Variants (`--variants`, each a full deployment, run one after another):
  cold    `dentfed clinic start --cold-clientapp --no-image-cache --flower-polls`: Flower's
          SuperNode and SuperExec as installed start every ClientApp process from scratch and
          every message decodes its images again
  cache   `--cold-clientapp` with the clinic's disk image cache
  warm    the default `dentfed clinic start`: the warm ClientApp worker (processes forked with
          torch, torchvision and Flower already imported), the image cache and the clinic's
          state folder (node config state-dir: the AdamW moments on the clinic's disk) and
          the SuperNode's waits shortened while a federation is active (dentfed/supernode.py)
  warm-flower-polls  `warm --flower-polls`: the SuperNode with Flower's own waits (3 s idle
          sleep, 0.5 s reply checks, 1-10 s backoff for arrays not on the SuperLink yet)
  warm-context  `warm --no-state-dir`: as before the state folder, the clinic's AdamW moments
          (2 x the model) in Flower's context.state, sent SuperNode <-> ClientApp with every
          message (train and evaluate)
  warm-nostate  diagnosis only, it changes the training: `warm` with
          federation.keep_optimizer_state false, i.e. without the clinic's AdamW moments
          (2 x the model) in Flower's context.state, which the SuperNode and every ClientApp
          process send each other with every message
  warm-unpacked  `warm` with federation.pack_arrays false: every array its own Flower object
          on the wire (as before packed transport, shared/packed_transport.py)
  warm-int8  `warm` with federation.upload int8: the replies carry int8 deltas from the
          round's global model, a quarter of the fp32 bytes (it changes the training a
          little: error feedback carries each round's rounding into the next)
  warm-fp16-down  `warm` with federation.download fp16: the train messages carry the global
          model in half precision, half the bytes down (the server keeps its fp32 model and
          measures each update from the rounded start: server/download.py)
  warm-fp16  `warm` with federation.download and upload fp16: half the bytes both ways (the
          replies carry the clinics' changes in half precision: shared/upload.py)
  warm-fp16-down-int8  half the bytes down, a quarter up
  warm-messages-on-disk  `warm` with `dentfed coordinator start --messages-on-disk`: the
          SuperLink as installed, writing the arrays of every message in flight into its
          SQLite database (the default keeps them in memory: dentfed/superlink.py)
  warm-flower-io  `warm-flower-polls` and `warm-messages-on-disk` together: Flower's
          SuperNode and SuperLink as installed (the warm variant before stop 26)
  warm-link-state-on-disk, warm-fp16-link-state-on-disk  `warm` and `warm-fp16` with
          `dentfed coordinator start --link-state-on-disk`: Flower's link state (runs, the
          bookkeeping of messages in flight) in the SQLite database, not only the registered
          clinics (the default keeps the rest in memory: dentfed/superlink.py)
  warm-clinic-eval  `warm` with federation.fraction_evaluate 1: every clinic evaluates in the
          evaluated rounds, and the BatchNorm statistics come with those evaluate replies (a
          second exchange in the round) instead of the next round's train replies
The server polls the SuperLink for replies every 0.2 s in every variant (server/federation.py).

    .venv/bin/python -m simulations.bench_deploy --clinics 3 --rounds 3 \
        --manifest data/demo-photos/manifest.csv --variants cold,cache,warm
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import time
from datetime import datetime
from pathlib import Path

import yaml

from shared.atomic_files import write_text_atomic
from shared.config import load_config
from simulations.compare import _variant
from simulations.local_deployment import LocalFederation, wait_process
from simulations.simulate import prepare_split

log = logging.getLogger("dentfed.bench")

VARIANTS: dict[str, list[str]] = {  # extra `dentfed clinic start` arguments
    # Flower's own SuperExec starts every ClientApp from scratch, no image cache: as before
    "cold": ["--cold-clientapp", "--no-image-cache", "--flower-polls"],
    # the same with the clinic's disk image cache
    "cache": ["--cold-clientapp", "--cache-dir", "{root}/cache_{k}"],
    # the default: warm ClientApp worker (dentfed/clinic_worker.py), the image cache, the
    # clinic's state folder (its AdamW moments on its disk, not in Flower's Context) and the
    # SuperNode's brisk polls (dentfed/supernode.py)
    "warm": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with the SuperNode's own waits (3 s idle sleep, 0.5 s reply checks, 1-10 s
    # backoff for arrays the SuperLink does not have yet)
    "warm-flower-polls": ["--cache-dir", "{root}/cache_{k}", "--flower-polls"],
    # warm as before the state folder: the clinic's round state in Flower's context.state,
    # which travels SuperNode <-> ClientApp with every message
    "warm-context": ["--cache-dir", "{root}/cache_{k}", "--no-state-dir"],
    # diagnosis only (changes the training): warm, without the clinics' AdamW state in
    # Flower's context.state, which travels SuperNode <-> ClientApp with every message
    "warm-nostate": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with the coordinator sending every array as its own Flower object (one request
    # per array per hop) instead of one packed array per message (shared/packed_transport.py)
    "warm-unpacked": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with every clinic evaluating in the evaluated rounds (fraction_evaluate 1): the
    # BatchNorm statistics come with those evaluate replies, a second exchange in the round,
    # instead of with the next round's train replies (the demo configs' default)
    "warm-clinic-eval": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with federation.upload int8: the clinics send int8 deltas (a quarter of the fp32
    # bytes) with their rounding error kept for the next round (shared/upload.py)
    "warm-int8": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with federation.download fp16: the global model goes out in half precision
    # (server/download.py)
    "warm-fp16-down": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with fp16 downloads and fp16 uploads (changes)
    "warm-fp16": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with fp16 downloads and int8 uploads
    "warm-fp16-down-int8": ["--cache-dir", "{root}/cache_{k}"],
    # warm, with the SuperLink writing every message's arrays into its database as Flower's
    # does (`dentfed coordinator start --messages-on-disk`)
    "warm-messages-on-disk": ["--cache-dir", "{root}/cache_{k}"],
    # both of the above: the SuperNode's and the SuperLink's own I/O, as before stop 26
    "warm-flower-io": ["--cache-dir", "{root}/cache_{k}", "--flower-polls"],
    # warm, with the SuperLink's whole link state (runs, message bookkeeping) in its database
    # (`dentfed coordinator start --link-state-on-disk`; before stop 29), fp32 and fp16
    "warm-link-state-on-disk": ["--cache-dir", "{root}/cache_{k}"],
    "warm-fp16-link-state-on-disk": ["--cache-dir", "{root}/cache_{k}"],
}
COORDINATOR_ARGS: dict[str, list[str]] = {  # extra `dentfed coordinator start` arguments
    "warm-messages-on-disk": ["--messages-on-disk"],
    "warm-flower-io": ["--messages-on-disk"],
    "warm-link-state-on-disk": ["--link-state-on-disk"],
    "warm-fp16-link-state-on-disk": ["--link-state-on-disk"]}
CONFIG_OVERRIDES: dict[str, dict] = {"warm-nostate": {"keep_optimizer_state": False},
                                     "warm-unpacked": {"pack_arrays": False},
                                     "warm-clinic-eval": {"fraction_evaluate": 1.0},
                                     "warm-int8": {"upload": "int8"},
                                     "warm-fp16-down": {"download": "fp16"},
                                     "warm-fp16": {"download": "fp16", "upload": "fp16"},
                                     "warm-fp16-link-state-on-disk": {"download": "fp16",
                                                                      "upload": "fp16"},
                                     "warm-fp16-down-int8": {"download": "fp16",
                                                             "upload": "int8"}}
# Consecutive marks of client/timing.py and what the seconds between them are.
STAGES = [("process_start", "app_loaded", "start-up: interpreter, Flower, FAB, message, imports"),
          ("app_loaded", "handler_start", "mods"),
          ("handler_start", "manifest_read", "manifest read"),
          ("manifest_read", "model_built", "model build"),
          ("model_built", "loaders_ready", "data loaders (and disk cache check)"),
          ("loaders_ready", "computed", "compute (train / evaluate)"),
          ("handler_start", "computed", "handler to computed (set-up + compute)"),
          ("computed", "reply", "encoding the reply"),
          ("process_start", "reply", "whole process up to the reply")]


def per_round(metrics: dict) -> list[dict]:
    """Per round: walls, each clinic's compute and the overhead (see the module docstring)."""
    rows = []
    for h in metrics["history"]:
        if h["round"] == 0:
            continue
        train = h["clinics_train"]["per_clinic"]
        ev = h["clinics_evaluate"]["per_clinic"]
        def trained(c: dict) -> float:  # a train reply may carry BatchNorm statistics too
            return c.get("train_seconds", 0.0) + c.get("bn_statistics_seconds", 0.0)

        t_max = max((trained(c) for c in train.values()), default=0.0)
        e_max = max((c.get("evaluate_seconds", 0.0) for c in ev.values()), default=0.0)
        compute = {k: trained(train.get(k, {}))
                   + ev.get(k, {}).get("evaluate_seconds", 0.0)
                   for k in sorted(set(train) | set(ev), key=int)}
        overhead = (h["round_seconds"] - t_max) + (
            h["clinic_evaluate_seconds"] - e_max if ev else 0.0)
        rows.append({"round": h["round"], "train_wall": h["round_seconds"],
                     "eval_wall": h["clinic_evaluate_seconds"],
                     "central_eval": h.get("central_eval_seconds", 0.0),
                     "compute": compute, "overhead": overhead,
                     "replied": h["clinics_replied"]})
    return rows


def breakdown(folder: Path) -> dict[str, dict[str, float]]:
    """Median seconds per stage over the ClientApp processes' timing files, per message
    type."""
    out: dict[str, dict[str, float]] = {}
    records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    for kind in sorted({r["message_type"] for r in records}):
        stages: dict[str, list[float]] = {}
        for r in (r for r in records if r["message_type"] == kind):
            t = {name: ts for name, ts in r["marks"]}
            if r.get("process_start"):
                t["process_start"] = r["process_start"]
            for a, b, label in STAGES:
                if a in t and b in t:
                    stages.setdefault(label, []).append(t[b] - t[a])
        out[kind] = {label: statistics.median(v) for label, v in stages.items()}
        out[kind]["messages"] = float(sum(r["message_type"] == kind for r in records))
    return out


# A SuperNode's own log lines (dentfed/supernode.py turns Flower's timestamps on): when a
# message started and finished arriving from the SuperLink, and its reply going back.
_HOP_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*:\s+"
                       r"(Receiving|Received successfully|Sending|Sent successfully)")


def supernode_hops(logs: list[Path]) -> dict[str, float]:
    """Median seconds of each SuperNode hop over the clinics' logs (empty where the log has
    no timestamps, i.e. Flower's own `flower-supernode`): receive = the message's arrays from
    the SuperLink; clientapp = message received to reply in the SuperNode's store (the
    ClientApp process, compute included); send = the reply to the SuperLink; wait = reply sent
    to the next message arriving (the other clinics, the server's aggregation and evaluation,
    the poll)."""
    stages: dict[str, list[float]] = {"receive": [], "clientapp": [], "send": [], "wait": []}
    for log_file in logs:
        events = [(datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp(), m[2])
                  for m in _HOP_LINE.finditer(log_file.read_text(errors="replace"))]
        last: dict[str, float] = {}
        for t, what in events:
            if what == "Receiving" and "Sent successfully" in last:
                stages["wait"].append(t - last.pop("Sent successfully"))
            elif what == "Received successfully" and "Receiving" in last:
                stages["receive"].append(t - last["Receiving"])
            elif what == "Sending" and "Received successfully" in last:
                stages["clientapp"].append(t - last["Received successfully"])
            elif what == "Sent successfully" and "Sending" in last:
                stages["send"].append(t - last["Sending"])
            last[what] = t
    return {k: statistics.median(v) for k, v in stages.items() if v}


def run_variant(name: str, extra: list[str], root: Path, manifests: list[Path],
                test_manifest: Path, config: Path, timeout: float) -> dict:
    root.mkdir(parents=True)
    timing = root / "timing"
    fed = LocalFederation(root, keys=len(manifests),
                          env={"OMP_NUM_THREADS": "1", "DENTFED_TIMING_DIR": str(timing)})
    try:
        fed.start_coordinator(*COORDINATOR_ARGS.get(name, []))
        for k, m in enumerate(manifests):
            fed.register(k)
            fed.start_clinic(k, m, *(a.format(root=root, k=k) for a in extra))
        fed.wait_online(len(manifests))
        t0 = time.perf_counter()
        proc = fed.run(config, root / "run", test_manifest)
        rc = wait_process(proc, timeout, f"variant {name}: the federated run")
        wall = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"variant {name}: run failed:\n" + fed.log("run")[-3000:])
    finally:
        fed.close()
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return {"name": name, "wall": wall, "rounds": per_round(metrics),
            "breakdown": breakdown(timing) if timing.is_dir() else {},
            "hops": supernode_hops(sorted(root.glob("clinic*.log")))}


def report(results: list[dict], header: str) -> str:
    lines = [header, ""]
    failed = [r for r in results if "failed" in r]
    results = [r for r in results if "failed" not in r]
    for res in failed:
        lines += [f"### {res['name']}: FAILED", "", "```", res["failed"], "```", ""]
    for res in results:
        extra = CONFIG_OVERRIDES.get(res["name"])
        lines += [f"### {res['name']}: `dentfed clinic start` "
                  f"{' '.join(VARIANTS[res['name']]) or '(defaults)'}"
                  f"{f', federation {extra}' if extra else ''}; whole run "
                  f"{res['wall']:.1f} s", "",
                  "| round | train wall s | eval wall s | clinic compute s (train+eval) "
                  "| overhead s | central eval s |", "|--:|--:|--:|---|--:|--:|"]
        for r in res["rounds"]:
            comp = ", ".join(f"{v:.2f}" for v in r["compute"].values())
            lines.append(f"| {r['round']} | {r['train_wall']:.2f} | {r['eval_wall']:.2f} | "
                         f"{comp} | **{r['overhead']:.2f}** | {r['central_eval']:.2f} |")
        ov = [r["overhead"] for r in res["rounds"]]
        # Round 1 has no clinic state to read yet and the last round adds the exchange for
        # its model's BatchNorm statistics: once per run, not per round.
        middle = (f"; rounds 2-{len(ov) - 1}: mean {statistics.mean(ov[1:-1]):.2f} s"
                  if len(ov) > 2 else "")
        lines += ["", f"overhead per round per clinic: mean {statistics.mean(ov):.2f} s, "
                  f"max {max(ov):.2f} s{middle} (goal <= 2 s)", ""]
        if res.get("hops"):
            lines.append("SuperNode hops, median s over clinics and messages: " + "; ".join(
                f"{k} {v:.2f}" for k, v in res["hops"].items()) + " (receive: arrays from "
                "the SuperLink; clientapp: received to reply stored, compute included; send: "
                "reply to the SuperLink; wait: reply sent to next message)")
        for kind, stages in res["breakdown"].items():
            lines.append(f"ClientApp process, {kind} messages "
                         f"({int(stages.pop('messages'))}), median s: "
                         + "; ".join(f"{k} {v:.2f}" for k, v in stages.items()))
        lines.append("")
    if len(results) > 1:
        lines += ["| variant | mean overhead s | max overhead s | mean round wall s "
                  "(train + eval) |", "|---|--:|--:|--:|"]
        for res in results:
            ov = [r["overhead"] for r in res["rounds"]]
            rw = [r["train_wall"] + r["eval_wall"] for r in res["rounds"]]
            lines.append(f"| {res['name']} | {statistics.mean(ov):.2f} | {max(ov):.2f} | "
                         f"{statistics.mean(rw):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo-photos-scratch.yaml")
    ap.add_argument("--manifest", default=None, help="default: the config's data.manifest")
    ap.add_argument("--clinics", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="cold,cache,warm",
                    help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--round-timeout", type=float, default=300,
                    help="federation.round_timeout: a clinic that has not replied by then "
                    "counts as failed for the round")
    ap.add_argument("--out", type=Path,
                    default=Path(f"runs/bench-deploy-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}")

    n = args.clinics
    cfg = _variant(load_config(args.config),
                   split={"clinics": n, "scheme": "iid"},
                   federation={"rounds": args.rounds, "min_available_clinics": n,
                               "min_train_clinics": n, "min_evaluate_clinics": n,
                               "node_wait_timeout": 120,
                               "round_timeout": args.round_timeout})
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=False)
    split_dir = args.out / "split"
    prepare_split(cfg, args.manifest, split_dir)
    config = args.out / "fed.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    manifests = [split_dir / f"clinic_{k}" / "manifest.csv" for k in range(n)]
    load = os.getloadavg()
    results = []
    for name in args.variants.split(","):
        log.info("variant %s: deployment with %d clinics, %d rounds", name, n, args.rounds)
        vconfig = config
        if name in CONFIG_OVERRIDES:
            vconfig = args.out / f"fed-{name}.yaml"
            vconfig.write_text(yaml.safe_dump(_variant(
                cfg, federation=CONFIG_OVERRIDES[name]).model_dump(mode="json")))
        try:
            results.append(run_variant(name, VARIANTS[name], args.out / name, manifests,
                                       split_dir / "server_test.csv", vconfig, args.timeout))
        except (RuntimeError, AssertionError, TimeoutError) as e:  # report the others anyway
            log.error("variant %s failed: %s", name, e)
            results.append({"name": name, "failed": str(e)[-500:]})
    per = (f"{cfg.federation.local_epochs} local epochs" if cfg.federation.local_steps is None
           else f"{cfg.federation.local_steps} local steps")
    header = (f"config {args.config}: {n} clinics (iid split), {args.rounds} rounds x {per}, "
              f"{cfg.model.name} at {cfg.data.image_size} px; {os.cpu_count()} CPUs; load "
              f"average before {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}, after "
              + "/".join(f"{x:.1f}" for x in os.getloadavg()) + "\n\n"
              "overhead = (train wall - slowest clinic's train_seconds) + (eval wall - slowest "
              "clinic's evaluate_seconds): what a round of clinic exchanges takes beyond the "
              "slowest clinic's own compute")
    text = report(results, header)
    print(text)
    write_text_atomic(args.out / "bench.md", text)
    write_text_atomic(args.out / "bench.json", json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
