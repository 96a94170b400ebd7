"""Federated vs pooled quality at equal sample-epochs (issue 13): a benchmark script, not a test.

Every row trains on the same clinic split (`split` section of the config) and the same number of
sample-epochs (federation.rounds x local_epochs, or rounds x local_steps batches):

* `Pooled`: `train_fold` on the union of the clinics' train rows (`dentfed train`'s loop, the
  config's optimiser, early stopping on the union of their val rows), scored on the pooled test
  set (server_test.csv);
* each variant: the config with some keys overridden (`--variant name:section.key=value,...`),
  run through the real ServerApp loop (`server.federation.run_federation`) and the real
  ClientApp (`client.app.app`) in this process, over an in-process grid (`InProcessGrid`):
  no Flower processes, so a variant costs only its training. Its final global model is scored
  on the same pooled test set. `--flower` runs the variants through `dentfed simulate` instead
  (real Flower simulation runtime), which is what the README's command does.

    python -m simulations.bench_quality --config configs/demo-photos.yaml --seeds 0,1 \\
        --variant "fedavg-adamw:federation.strategy=fedavg" --variant "sgd:train.optimizer=sgd"

Prints (and with --out writes as markdown) one row per method: final pooled-test metric as
mean ± sd over seeds, federated / pooled, the central loss per round of the first seed, and the
seconds per seed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import yaml
from flwr.app import Context, Message, RecordDict

from client.app import app as client_app
from server.federation import run_federation
from shared.config import Config, config_from_dict, load_config
from shared.data.manifest import read_manifest
from shared.metrics import headline
from simulations.compare import budget_config
from simulations.pooled_training import train_fold
from simulations.simulate import prepare_split, simulate
from simulations.task_manifest import load_task_manifest

log = logging.getLogger("dentfed.bench")


class InProcessGrid:
    """Just enough of Flower's Grid for `run_federation`: node i is clinic i of the split,
    whose ClientApp (the real one, with its mods) is called in this process with its own
    persistent Context, as a SuperNode keeps it.

    Each clinic call runs with `threads` torch threads: Flower's simulation runs a clinic in a
    Ray actor with `simulation.client_cpus` CPUs, and Ray sets OMP_NUM_THREADS to that, so the
    same count here gives the same kernels, the same rounding and so the same run as
    `dentfed simulate` (with the process's default thread count the runs drift apart).

    Clinic i is node `first_node + i`: a resumed federation is a new Flower run, whose node ids
    a real SuperLink gives anew (pass another `first_node` to play that)."""

    def __init__(self, split_dir: Path, n: int, threads: int | None = None,
                 resume: bool = False, first_node: int = 1):
        from flwr.supercore.task_identity import TaskIdentity

        from client.clinic import CLINIC_TOKEN_FILE, DP_LEDGER
        from shared.fedio import RESUME_KEY


        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app = client_app
        self.contexts = {first_node + i: Context(run_id=1, node_id=first_node + i,
                                                 node_config={"partition-id": i},
                                                 state=RecordDict(),
                                                 run_config={"split-dir": str(split_dir),
                                                             RESUME_KEY: resume})
                         for i in range(n)}
        if not resume:
            # A new federation over a split an earlier one used (benchmarks run variants and
            # seeds over one split): the clinics' round state, epsilon ledgers and clinic
            # tokens of that run go, as `dentfed simulate` starts with a new split folder. The
            # image cache stays. A resumed one keeps them all (the token keeps each clinic's
            # index in the report).
            for i in range(n):
                state = Path(split_dir) / f"clinic_{i}" / "state"
                for stale in [*state.glob("after_round_*.pt"), state / DP_LEDGER,
                              state / CLINIC_TOKEN_FILE]:
                    stale.unlink(missing_ok=True)
        self.sent: list[Message] = []  # every message, both ways (tests audit them)
        self._ids = 0
        self.threads = threads

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self._ids += 1
            msg.metadata.__dict__["_message_id"] = f"m{self._ids}"
            node = msg.metadata.dst_node_id
            reply = self._call(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            self.sent += [msg, reply]
            replies.append(reply)
        return replies

    def _call(self, msg: Message, context: Context) -> Message:
        if self.threads is None:
            return self.app(msg, context)
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.app(msg, context)
        finally:
            torch.set_num_threads(before)


def _override(cfg: Config, spec: str) -> Config:
    """'section.key=value,section.key=value' (values parsed as YAML) applied to cfg."""
    raw = cfg.model_dump(mode="json")
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        *path, last = key.strip().split(".")
        node = raw
        for p in path:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        node[last] = yaml.safe_load(value)
    return config_from_dict(raw, source=f"variant {spec}")


def run_in_process(cfg: Config, split_dir: Path) -> dict:
    """One federation with the real server loop and real ClientApp, in this process: central
    history per round (metric and loss)."""
    grid = InProcessGrid(split_dir, cfg.split.clinics,
                         threads=max(1, int(cfg.simulation.client_cpus)))
    res = run_federation(grid, cfg, split_dir / "server_test.csv")
    return {r: {"metric": h.get(res.evaluator.key, math.nan), "loss": h["loss"]}
            for r, h in sorted(res.evaluator.history.items())}


def run_flower(cfg: Config, manifest: Path, out: Path) -> dict:
    data = simulate(cfg, manifest, out, echo=False)
    key = data["headline"]
    return {int(h["round"]): {"metric": h["server"].get(key, math.nan),
                              "loss": h["server"]["loss"]} for h in data["history"]
            if h["server"] is not None}  # None: not evaluated (federation.evaluate_every)


def _cell(v: list[float]) -> str:
    a = np.asarray(v, float)
    return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variant", action="append", default=[],
                    help="name:section.key=value,... (repeatable); name alone = the config")
    ap.add_argument("--pooled-value", type=float,
                    help="the pooled figure from an earlier run of this script (same config, "
                    "split and seeds): no pooled row is trained")
    ap.add_argument("--pooled", default="",
                    help="overrides for the pooled row (e.g. train.optimizer=sgd); "
                    "'skip' = no pooled row")
    ap.add_argument("--flower", action="store_true", help="variants via `dentfed simulate`")
    ap.add_argument("--pooled-only", action="store_true",
                    help="train only the pooled row (no federated variant)")
    ap.add_argument("--dataset", help="a dental_datasets module (e.g. ufba425_panoramic): its "
                    "build_manifest (absolute paths, patient_id, its natural `site`) replaces "
                    "data.manifest")
    ap.add_argument("--set", default="", help="overrides of the config itself, before the "
                    "split (e.g. split.scheme=dirichlet,split.alpha=0.1): every row sees them")
    ap.add_argument("--local", action="store_true",
                    help="also train each clinic alone (its own train/val rows, the same "
                    "epochs as pooled) and score it on the pooled test set")
    ap.add_argument("--out", help="write the table (markdown) here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("dentfed.server").setLevel(logging.INFO)  # one line per round
    logging.getLogger("flwr").setLevel(logging.WARNING)
    base = load_config(args.config)
    if args.set:
        base = _override(base, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [(v.partition(":")[0], v.partition(":")[2]) for v in args.variant] or \
        [("config", "")]
    if args.pooled_only:
        if args.pooled == "skip" or args.pooled_value is not None:
            ap.error("--pooled-only trains the pooled row: drop --pooled skip / --pooled-value")
        variants = []
    key = headline(base.task.type)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        if args.dataset:
            module = importlib.import_module(f"dental_datasets.{args.dataset}")
            built = module.build_manifest(Path(tmp) / "manifest.csv")
            base = _override(base, f"data.manifest={built}")
        m = load_task_manifest(base, None)
        split = prepare_split(base, m.source, Path(tmp) / "split")
        parts = {s: np.concatenate([p[s] for p in split.clinics]) for s in ("train", "val")}
        test_m = read_manifest(Path(tmp) / "split" / "server_test.csv", base.task,
                               default_modality=base.data.modality)
        if args.pooled != "skip" and args.pooled_value is None:
            pcfg = _override(base, args.pooled)
            for seed in seeds:
                t0 = time.perf_counter()
                bcfg = budget_config(pcfg, seed, clinics=len(split.clinics))
                fold = _pooled(bcfg, m, parts, test_m, seed)
                r = rows.setdefault("Pooled", {"values": [], "seconds": [], "curve": None,
                                               "spec": args.pooled})
                r["values"].append(fold[0])
                r["seconds"].append(time.perf_counter() - t0)
                r["curve"] = r["curve"] or fold[1]
                print(f"Pooled seed {seed}: {key} {fold[0]:.4f} ({time.perf_counter() - t0:.0f} s)",
                      flush=True)
        if args.local:
            pcfg = _override(base, args.pooled if args.pooled != "skip" else "")
            for c, clinic in enumerate(split.clinics):
                for seed in seeds:
                    t0 = time.perf_counter()
                    fold = _pooled(budget_config(pcfg, seed), m,
                                   {s: clinic[s] for s in ("train", "val")}, test_m, seed)
                    r = rows.setdefault(f"Local clinic {c}", {
                        "values": [], "seconds": [], "curve": None, "spec": args.pooled})
                    r["values"].append(fold[0])
                    r["seconds"].append(time.perf_counter() - t0)
                    r["curve"] = r["curve"] or fold[1]
                    print(f"Local clinic {c} seed {seed}: {key} {fold[0]:.4f}", flush=True)
        for name, spec in variants:
            for seed in seeds:
                cfg = _override(base, (spec + "," if spec else "") + f"train.seed={seed}")
                t0 = time.perf_counter()
                if args.flower:
                    hist = run_flower(cfg, m.source, Path(tmp) / f"{name}-{seed}")
                else:
                    hist = run_in_process(cfg, Path(tmp) / "split")
                last = hist[max(hist)]
                r = rows.setdefault(name, {"values": [], "seconds": [], "curve": None,
                                           "spec": spec})
                r["values"].append(last["metric"])
                r["seconds"].append(time.perf_counter() - t0)
                curve = [(h["metric"], h["loss"]) for h in hist.values()]
                r["curve"] = r["curve"] or curve  # the table shows the first seed's
                print(f"{name} seed {seed}: {key} {last['metric']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s); rounds "
                      + " ".join(f"{a:.3f}/{b:.2f}" for a, b in curve), flush=True)
    pooled = (np.mean(rows["Pooled"]["values"]) if "Pooled" in rows
              else args.pooled_value if args.pooled_value is not None else math.nan)
    lines = [f"| method | overrides | pooled-test {key} | / pooled | central {key}/loss by "
             "round (seed " + str(seeds[0]) + ") | s/seed |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ratio = np.mean(r["values"]) / pooled
        curve = " ".join(f"{a:.2f}/{b:.2f}" for a, b in (r["curve"] or []))
        lines.append(f"| {name} | `{r['spec'] or '-'}` | {_cell(r['values'])} | {ratio:.3f} | "
                     f"{curve} | {np.mean(r['seconds']):.0f} |")
    table = "\n".join(lines)
    print(f"\nseeds {seeds}, config {args.config}, budget per seed: "
          f"{base.federation.rounds} x {base.federation.local_epochs} (config)\n{table}")
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return table


def _pooled(cfg: Config, m, parts: dict, test_m, seed: int) -> tuple[float, list]:
    """Pooled training (train_fold's loop and early stopping) scored on the pooled test set;
    also the per-epoch (val metric, val loss) curve."""
    from shared.data.dataset import make_loader
    from shared.models import resolve_device
    from shared.training import evaluate

    fold = train_fold(cfg, m, {**parts, "test": parts["val"]}, seed)
    device = resolve_device(cfg.train.device)
    res = evaluate(fold.model.to(device), make_loader(test_m, cfg.data, train=False), None,
                   cfg.task, device)
    k = headline(cfg.task.type)
    return float(res.get(k, math.nan)), [(h.get(f"val_{k}", math.nan), h["val_loss"])
                                         for h in fold.history]


if __name__ == "__main__":
    main()
