"""`dentfed simulate --compare`: FLamby-style baselines on one clinic split.

For each seed (train.seed: model init, data order, augmentation) the same clinic split
(split.seed) is used by every method:

* `Pooled`: one model trained with the shared loop (`train_fold`) on the union of the clinics'
  train rows, validated on the union of their val rows (what a central data lake would give);
* `Local k`: a model trained only on clinic k's train/val rows;
* each strategy: a real Flower simulation (`simulate`) with federation.strategy overridden; its
  `model_final.pt` (the last round) is evaluated. `model_best.pt` is not used: its round is
  chosen on the server test set, which would leak the test set into model selection.

Compute budget: pooled and local models train for federation.rounds * federation.local_epochs
epochs (with federation.local_steps set: federation.rounds epochs of exactly local_steps
batches each for a local model, local_steps x clinics for pooled: the batches the whole
federation trains on; a loader with fewer batches is cycled, as a clinic's is). They keep
the config's own early stopping (train.patience on their validation loss,
best-validation-epoch weights restored), exactly as `dentfed train` does; nothing else is
added. They use a constant train.lr, whereas clinics follow federation.lr_decay across rounds.
Pooled/local and federated models of one seed start from the same initial weights.

Every model is scored with the task's headline metric (macro_auc for multilabel,
balanced_accuracy for multiclass) on each clinic's test rows and on the pooled test set
(server_test.csv, the union of the clinic test sets).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from shared.atomic_files import atomic_folder, write_json, write_text_atomic
from shared.config import STRATEGIES, Config, config_from_dict
from shared.data.dataset import make_loader
from shared.data.manifest import Manifest
from shared.errors import ConfigError, DentfedError
from shared.metrics import headline
from shared.model_file import read_model_file
from shared.models import batch_statistics, local_prefixes, resolve_device
from shared.training import evaluate
from simulations.partition import ClinicSplit
from simulations.pooled_training import train_fold
from simulations.simulate import prepare_split, simulate
from simulations.task_manifest import load_task_manifest

log = logging.getLogger("dentfed.compare")

DEFAULT_STRATEGIES = ("fedavg", "fedprox", "fedadam")
POOLED = "Pooled"
LONG_COLUMNS = ("method", "seed", "test_set", "metric", "value")


def parse_strategies(text: str) -> list[str]:
    """'fedavg,fedprox' -> ['fedavg', 'fedprox']; unknown or repeated names are errors."""
    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    if not names:
        raise ConfigError("--strategies is empty; give a comma list such as fedavg,fedprox")
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown:
        raise ConfigError(f"--strategies: unknown strategy {', '.join(unknown)} "
                          f"(known: {', '.join(STRATEGIES)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies lists a strategy twice: {text}")
    return names


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything but distinct integers is an error."""
    parts = [s.strip() for s in text.split(",") if s.strip()]
    try:
        seeds = [int(s) for s in parts]
    except ValueError:
        raise ConfigError(f"--seeds must be a comma list of integers, got '{text}'") from None
    if not seeds:
        raise ConfigError("--seeds is empty; give a comma list such as 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds lists a seed twice: {text}")
    return seeds


def _variant(cfg: Config, **sections: dict) -> Config:
    """A validated copy of cfg with some keys of some sections replaced."""
    raw = cfg.model_dump(mode="json")
    for section, values in sections.items():
        raw[section] = {**raw[section], **values}
    return config_from_dict(raw, source="compare config")


def budget_config(cfg: Config, seed: int, clinics: int = 1) -> Config:
    """The config pooled and local baselines train with: the federated compute budget
    (rounds * local_epochs epochs, or rounds epochs of local_steps batches per clinic the
    model stands for: `clinics` = all of them for pooled, 1 for a local model) and train.seed."""
    fed = cfg.federation
    if fed.local_steps is None:
        train = {"epochs": fed.rounds * fed.local_epochs, "seed": seed}
    else:
        train = {"epochs": fed.rounds, "max_steps_per_epoch": fed.local_steps * clinics,
                 "seed": seed}
    return _variant(cfg, train=train)


def _budget_text(cfg: Config) -> str:
    fed = cfg.federation
    if fed.local_steps is None:
        e = fed.rounds * fed.local_epochs
        return (f"{e} epoch{'s' * (e != 1)} (federation.rounds {fed.rounds} x "
                f"local_epochs {fed.local_epochs})")
    return (f"{fed.rounds} epoch{'s' * (fed.rounds != 1)} of {fed.local_steps} batches a "
            "clinic (federation.rounds x local_steps)")


def method_order(methods: Sequence[str], strategies: Sequence[str] | None = None) -> list[str]:
    """Pooled, Local 0..N-1 (numeric order), then the strategies (given order, else first
    appearance), then anything else."""
    seen = list(dict.fromkeys(methods))
    local = sorted((m for m in seen if m.startswith("Local ")), key=lambda m: int(m.split()[1]))
    strat = [s for s in (strategies or []) if s in seen]
    rest = [m for m in seen if m != POOLED and m not in local and m not in strat]
    return ([POOLED] if POOLED in seen else []) + local + strat + rest


def _test_set_order(test_sets: Sequence[str]) -> list[str]:
    seen = list(dict.fromkeys(test_sets))
    clinics = sorted((t for t in seen if t.startswith("clinic ")), key=lambda t: int(t.split()[1]))
    return clinics + [t for t in seen if t not in clinics]


def format_cell(values: Sequence[float] | np.ndarray) -> str:
    """'mean ± sd' over seeds (sample sd); the mean alone for one value; 'undef' when no value
    is defined; '(n=k/K)' appended when only k of K seeds gave a defined value."""
    v = np.asarray(values, dtype=float)
    ok = v[~np.isnan(v)]
    if len(ok) == 0:
        return "undef"
    text = f"{ok.mean():.3f}"
    if len(ok) > 1:
        text += f" ± {ok.std(ddof=1):.3f}"
    if len(ok) < len(v):
        text += f" (n={len(ok)}/{len(v)})"
    return text


def build_table(long: pd.DataFrame, strategies: Sequence[str] | None = None) -> pd.DataFrame:
    """The comparison table from the long frame (method, seed, test_set, metric, value): one row
    per method (see `method_order`), one column per test set ('clinic k test', 'pooled test'),
    cells formatted by `format_cell` over seeds."""
    missing = set(LONG_COLUMNS) - set(long.columns)
    if missing:
        raise ValueError(f"long frame lacks columns {sorted(missing)}")
    if long["metric"].nunique() > 1:
        raise ValueError(f"one metric per table, got {sorted(long['metric'].unique())}")
    methods = method_order(long["method"].tolist(), strategies)
    test_sets = _test_set_order(long["test_set"].tolist())
    rows = {}
    for method in methods:
        sub = long[long["method"] == method]
        rows[method] = {f"{t} test": format_cell(sub.loc[sub["test_set"] == t, "value"]
                                                 .to_numpy(dtype=float))
                        for t in test_sets}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "method"
    return df


def table_markdown(table: pd.DataFrame) -> str:
    """The table as markdown, cells verbatim (tabulate would re-parse '1.000' as the number 1
    and print '1')."""
    return table.to_markdown(disable_numparse=True,
                             colalign=("left",) + ("right",) * len(table.columns))


def summary_stats(long: pd.DataFrame) -> dict[str, dict[str, dict[str, float | int]]]:
    """{method: {test_set: {mean, sd, n}}} over seeds, NaN-aware (NaN = undefined)."""
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for (method, test_set), grp in long.groupby(["method", "test_set"], sort=False):
        v = grp["value"].to_numpy(dtype=float)
        ok = v[~np.isnan(v)]
        out.setdefault(str(method), {})[str(test_set)] = {
            "mean": float(ok.mean()) if len(ok) else math.nan,
            "sd": float(ok.std(ddof=1)) if len(ok) > 1 else math.nan,
            "n": int(len(ok)),
        }
    return out


def _test_loaders(cfg: Config, m: Manifest, split: ClinicSplit) -> dict[str, DataLoader]:
    """'clinic k' -> that clinic's test rows; 'pooled' -> all of them (= server_test.csv)."""
    loaders = {f"clinic {c}": make_loader(m.subset(p["test"]), cfg.data, train=False)
               for c, p in enumerate(split.clinics)}
    pooled = np.concatenate([p["test"] for p in split.clinics])
    loaders["pooled"] = make_loader(m.subset(pooled), cfg.data, train=False)
    return loaders


def score(model: torch.nn.Module, cfg: Config, loaders: dict[str, DataLoader]
          ) -> dict[str, float]:
    """The headline metric of `model` on every test loader (NaN where undefined)."""
    device = resolve_device(cfg.train.device)
    model.to(device)
    key = headline(cfg.task.type)
    with batch_statistics(model, local_prefixes(model)):  # FedBN: as the server evaluates
        out = {name: float(evaluate(model, dl, None, cfg.task, device).get(key, math.nan))
               for name, dl in loaders.items()}
    model.cpu()
    return out


def _same_split(ours: Path, theirs: Path, n: int) -> bool:
    names = ["server_test.csv"] + [f"clinic_{c}/{f}" for c in range(n)
                                   for f in ("manifest.csv", "test.csv")]
    return all((theirs / f).is_file() and (ours / f).read_bytes() == (theirs / f).read_bytes()
               for f in names)


def _fmt(scores: dict[str, float], key: str) -> str:
    v = scores.get("pooled", math.nan)
    return f"pooled test {key} " + ("undef" if math.isnan(v) else f"{v:.4f}")


def run_compare(cfg: Config, manifest: str | Path | None, out: str | Path,
                strategies: Sequence[str] = DEFAULT_STRATEGIES, seeds: Sequence[int] = (0,),
                command: str | None = None, echo: bool = False) -> dict:
    """Pooled, local and federated models on one clinic split, per seed; writes compare.csv
    (long format), compare.md and compare.json plus split/ and federated/seed_<s>/<strategy>/
    run folders into `out` (built in a hidden folder, renamed when complete) and returns
    compare.json's content with the table (DataFrame) under 'table' and 'long'."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise DentfedError(f"output folder {out} exists and is not empty; choose another --out")
    strategies = list(strategies)
    seeds = [int(s) for s in seeds]
    if not strategies or not seeds:
        raise ConfigError("--compare needs at least one strategy and one seed")
    for s in strategies:  # fail before any training on a bad strategy / config combination
        _variant(cfg, federation={"strategy": s})
    key = headline(cfg.task.type)
    m = load_task_manifest(cfg, manifest)
    t_all = time.perf_counter()
    rows: list[dict] = []
    runs: list[dict] = []

    def keep_finished_runs(partial: Path) -> bool:
        if rows:  # hours of finished runs are worth keeping; the folder name says partial
            log.error("compare did not finish; finished runs are kept in %s", partial)
        return bool(rows)

    with atomic_folder(out, keep_on_error=keep_finished_runs) as tmp:
        split = prepare_split(cfg, m.source, tmp / "split")
        n = split.n
        loaders = _test_loaders(cfg, m, split)
        pooled_parts = {s: np.concatenate([p[s] for p in split.clinics])
                        for s in ("train", "val", "test")}

        def record(method: str, seed: int, scores: dict[str, float], seconds: float,
                   **extra: object) -> None:
            for test_set, value in scores.items():
                rows.append({"method": method, "seed": seed, "test_set": test_set,
                             "metric": key, "value": value})
            runs.append({"method": method, "seed": seed, "seconds": seconds, **extra})
            log.info("[seed %d] %s: done in %.1f s, %s", seed, method, seconds, _fmt(scores, key))

        for seed in seeds:
            baselines = [(POOLED, pooled_parts)] + [(f"Local {c}", p)
                                                    for c, p in enumerate(split.clinics)]
            for method, parts in baselines:
                bcfg = budget_config(cfg, seed, clinics=n if method == POOLED else 1)
                log.info("[seed %d] %s: training on %d images (%s)", seed, method,
                         len(parts["train"]), _budget_text(cfg))
                t0 = time.perf_counter()
                fold = train_fold(bcfg, m, parts, seed)
                scores = score(fold.model, bcfg, loaders)
                record(method, seed, scores, time.perf_counter() - t0,
                       best_epoch=fold.best_epoch, epochs_run=len(fold.history),
                       train_images=fold.sizes["train"], val_images=fold.sizes["val"])
            for strategy in strategies:
                fcfg = _variant(cfg, federation={"strategy": strategy}, train={"seed": seed})
                run_dir = tmp / "federated" / f"seed_{seed}" / strategy
                log.info("[seed %d] %s: federated simulation, %d rounds x %d clinics", seed,
                         strategy, cfg.federation.rounds, n)
                t0 = time.perf_counter()
                data = simulate(fcfg, m.source, run_dir, echo=echo)
                if not _same_split(tmp / "split", run_dir / "split", n):
                    raise DentfedError(f"the {strategy} run made a different clinic split than "
                                       "the baselines; is the split deterministic?")
                model = read_model_file(run_dir / "model_final.pt").model
                scores = score(model, fcfg, loaders)
                server = data.get("final", {}).get(key)
                if server is not None and not math.isnan(scores["pooled"]) and \
                        abs(float(server) - scores["pooled"]) > 1e-3:
                    log.warning("%s seed %d: pooled test %s %.4f differs from the run's own "
                                "%.4f", strategy, seed, key, scores["pooled"], server)
                record(strategy, seed, scores, time.perf_counter() - t0,
                       run_folder=str(run_dir.relative_to(tmp)),
                       flower_wall_seconds=data.get("wall_seconds"))

        long = pd.DataFrame(rows, columns=list(LONG_COLUMNS))
        table = build_table(long, strategies)
        result = {
            "task": cfg.task.type,
            "metric": key,
            "command": command,
            "seeds": seeds,
            "strategies": strategies,
            "clinics": n,
            "split": cfg.split.model_dump(mode="json"),
            "budget": _budget_text(cfg),
            "seconds": time.perf_counter() - t_all,
            "summary": summary_stats(long),
            "runs": runs,
            "results": long.to_dict(orient="records"),
        }
        write_text_atomic(tmp / "compare.csv", long.to_csv(index=False))
        write_json(tmp / "compare.json", result)
        write_text_atomic(tmp / "compare.md", render_markdown(table, result))
    return {**result, "table": table, "long": long, "out": str(out)}


def render_markdown(table: pd.DataFrame, result: dict) -> str:
    """compare.md: the table with what produced it."""
    seeds = result["seeds"]
    cells = "mean ± sd over seeds" if len(seeds) > 1 else "one seed"
    return (f"# dentfed baseline comparison\n\n"
            f"command: `{result.get('command') or 'run_compare(...)'}`\n\n"
            f"metric: **{result['metric']}** ({result['task']}), {cells} "
            f"({', '.join(map(str, seeds))}); 'undef' = not defined on that test set\n\n"
            f"{table_markdown(table)}\n\n"
            f"- split: {result['clinics']} clinics, scheme {result['split']['scheme']}, "
            f"split.seed {result['split']['seed']} (same split for every method and seed; "
            "see split/summary.md)\n"
            f"- Pooled / Local k: shared training loop, {result['budget']}, the config's early "
            "stopping (train.patience, best validation epoch kept)\n"
            "- federated rows: model_final.pt of federated/seed_<s>/<strategy>/\n"
            f"- total wall time {result['seconds']:.0f} s; raw per-seed values in compare.csv\n")
