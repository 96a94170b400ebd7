"""Where the time and bytes of a federated simulation go, measured side by side in one run.

Runs the config's federated simulation once per variant and upload encoding (same split, same
seed; the variants: the config as it is, and a lean one that evaluates less) and
pooled training on the union of the clinics' train rows for the same number of sample-epochs
(rounds x local_epochs, no early stopping), then prints:

  1. simulation wall time / summed clinic training compute (goal <= 1.15)
  2. simulation wall time / pooled training wall time       (goal <= 1.15)
  3. upload bytes per clinic per round / full fp32 model    (goal <= 0.25)

plus the breakdown of the simulation's wall time (start-up, clinic train phase, clinic evaluate
phase, central evaluation, the server's own work between exchanges) and the final central
metric per encoding, so a cheaper encoding that costs accuracy shows it. "train phase beyond
compute" is the clinic train phase minus the clinics' summed compute spread over the
clinics that train at once (min(max_concurrent, clinics)): what the exchanges add to the
training itself (messages to and from the actors, encoding the replies, clinics waiting for
a slot in a round that does not fill it). "server work between exchanges" is the run's
seconds outside the exchanges and central evaluation: decoding and aggregating the replies,
the checkpoint, building the next messages. "round-0 central eval" and "round 1 beyond a
later round" (round 1's seconds minus the median of rounds 2.. without their evaluations)
are what the engine's start still costs inside the rounds: the actors starting and importing
the clinic's code, each clinic's first decode. Absolute times drift on a noisy machine; the
ratios are what to compare.

    .venv/bin/python -m simulations.bench_overhead --config configs/demo-photos.yaml \
        --uploads fp32 --variants baseline,lean --out runs/bench
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from shared.atomic_files import write_text_atomic
from shared.config import load_config
from simulations.compare import _variant, budget_config
from simulations.pooled_training import train_fold
from simulations.simulate import prepare_split, simulate
from simulations.task_manifest import load_task_manifest

log = logging.getLogger("dentfed.bench")


def start_costs(history: list[dict]) -> tuple[float, float]:
    """(round 0's central evaluation s, round 1's seconds beyond the median of the later
    rounds, each without its central and clinic evaluation) from metrics.json's history."""
    def bare(h: dict) -> float:
        return (h.get("round_seconds") or 0.0) - (h.get("central_eval_seconds") or 0.0) \
            - (h.get("clinic_evaluate_seconds") or 0.0)
    by_round = {h["round"]: h for h in history}
    later = [bare(h) for r, h in sorted(by_round.items()) if r >= 2]
    first = bare(by_round[1]) - float(np.median(later)) if 1 in by_round and later \
        else float("nan")
    return float(by_round.get(0, {}).get("central_eval_seconds") or 0.0), first


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/demo-photos.yaml")
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--uploads", default="fp32", help="comma list of upload encodings")
    ap.add_argument("--variants", default="baseline,lean",
                    help="comma list: baseline (the config as it is, without the clinics' "
                    "disk image cache) and lean (central evaluation only before round 1 and "
                    "after the last, federation.evaluate_every = rounds; no clinic-side "
                    "evaluation, fraction_evaluate 0; the disk image cache on) and "
                    "clinic-eval (the baseline with every clinic evaluating in the evaluated "
                    "rounds, fraction_evaluate 1: with bn_recalibration, the statistics then "
                    "come with those evaluate replies instead of the next train replies)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--local-epochs", type=int, default=None)
    ap.add_argument("--out", type=Path,
                    default=Path(f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    cfg = load_config(args.config)
    fed = {k: v for k, v in {"rounds": args.rounds, "local_epochs": args.local_epochs}.items()
           if v is not None}
    if fed:
        cfg = _variant(cfg, federation=fed)
    m = load_task_manifest(cfg, args.manifest)
    args.out.mkdir(parents=True, exist_ok=False)
    split = prepare_split(cfg, m.source, args.out / "split")
    rows, sims = [], {}
    variants = {
        "baseline": lambda c: _variant(c, data={"disk_cache": False}),
        "lean": lambda c: _variant(c, data={"disk_cache": True}, federation={
            "evaluate_every": c.federation.rounds, "fraction_evaluate": 0.0,
            "min_evaluate_clinics": 0}),
        "clinic-eval": lambda c: _variant(c, data={"disk_cache": False}, federation={
            "fraction_evaluate": 1.0, "min_evaluate_clinics": c.split.clinics}),
    }
    for enc in args.uploads.split(","):
        for var in args.variants.split(","):
            name = f"{var} {enc}"
            log.info("federated simulation, %s, upload %s", var, enc)
            sims[name] = simulate(variants[var](_variant(cfg, federation={"upload": enc})),
                                  m.source, args.out / f"sim-{var}-{enc}", echo=False)
    log.info("pooled training, same sample-epochs")
    pooled_parts = {s: np.concatenate([p[s] for p in split.clinics])
                    for s in ("train", "val", "test")}
    bcfg = _variant(budget_config(cfg, cfg.train.seed, clinics=split.n),
                    train={"patience": None, "progress": False})
    t0 = time.perf_counter()
    fold = train_fold(bcfg, m, pooled_parts, cfg.train.seed)
    pooled_wall = time.perf_counter() - t0

    headline = next(iter(sims.values()))["headline"]
    for enc, d in sims.items():
        tb = d["time_breakdown"]
        wall = d["wall_seconds"]
        at_once = min(cfg.simulation.max_concurrent, split.n)
        round0_eval, round1_beyond = start_costs(d["history"])
        rows.append({
            "run": enc,
            "sim wall s": wall,
            "start-up s": wall - d["seconds"],
            "clinic train phase s": tb["clinic_train_phase"],
            "clinic evaluate phase s": tb["clinic_evaluate_phase"],
            "central eval s": tb["central_evaluation"],
            "server work between exchanges s": d["seconds"] - tb["clinic_train_phase"]
            - tb["clinic_evaluate_phase"] - tb["central_evaluation"],
            "round-0 central eval s": round0_eval,
            "round 1 beyond a later round s": round1_beyond,
            "summed clinic compute s": tb["clinic_train_compute"],
            "train phase beyond compute s": tb["clinic_train_phase"]
            - tb["clinic_train_compute"] / at_once,
            "wall / clinic compute": wall / tb["clinic_train_compute"],
            "wall / pooled": wall / pooled_wall,
            "upload / full model": d["upload_ratio"],
            f"final {headline}": d["final"].get(headline, float("nan")),
        })
    table = pd.DataFrame(rows).set_index("run").T
    pooled_metric = fold.test.get(headline, float("nan"))
    per_round = (f"{cfg.federation.local_epochs} local epochs" if cfg.federation.local_steps
                 is None else f"{cfg.federation.local_steps} local steps")
    text = (f"config {args.config}: {split.n} clinics, {cfg.federation.rounds} rounds x "
            f"{per_round}, task {cfg.task.type}\n"
            f"pooled training (same sample-epochs): {pooled_wall:.1f} s, test {headline} "
            f"{pooled_metric:.3f} (same test rows as the server's)\n\n"
            + table.to_markdown(floatfmt=".3f") + "\n\ngoals: wall / clinic compute <= 1.15, "
            "wall / pooled <= 1.15, upload / full model <= 0.25\n")
    print(text)
    write_text_atomic(args.out / "bench.md", text)
    write_text_atomic(args.out / "bench.json",
                      json.dumps({"rows": rows, "pooled_seconds": pooled_wall,
                                  "pooled_test": fold.test}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
