"""Federated tooth detection with FDI numbering on UFBA-425 (issue 15): a benchmark script, not a
test.

The UFBA teeth boxes (../shared/data/ufba425_teeth_yolo, imported by
`dental_datasets.ufba425_teeth_detection`) are split into `--clinics` clinics by UFBA category
(`split.scheme: site`, the natural non-IID key: implant, appliance and missing-teeth
populations). With Faster R-CNN MobileNetV2-FPN (ImageNet backbone from ../shared/weights) at
`--image-size` px, per seed:

* `Pooled`: the one training loop (`train_fold`) on the union of the clinics' train rows;
* `Local k`: the same on clinic k's rows only;
* `FedAvg` (and any `--strategy`): the real ServerApp loop (`run_federation`) and the real
  ClientApp over an in-process grid (`bench_quality.InProcessGrid`), only trainable arrays
  exchanged; its final global model is scored.

Every model gets the compute budget of the clinics it stands for, as `dentfed simulate
--compare` gives it: a local model rounds epochs of local_steps batches, pooled rounds epochs
of clinics x local_steps (a loader with fewer batches is cycled, as a clinic's is), and is
scored on the pooled test set (the union of the clinic test rows): mAP@0.5, mAP@0.5:0.95, and,
through `shared.fdi`, FDI numbering accuracy on matched teeth (IoU 0.5) without and with the
anatomical post-processing, tooth detection recall/precision, and per-image present-teeth
accuracy over the 32 positions. Training images/s is timed on the pooled model.

    python -m simulations.bench_detection --seeds 0,1,2 --out docs/bench_detection.md
    python -m simulations.bench_detection --smoke          # minutes on a laptop: not a result

CUDA is used when present (train.device auto).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.atomic_files import write_json, write_text_atomic
from shared.config import Config, config_from_dict
from shared.data.dataset import make_loader
from shared.data.manifest import Manifest, read_manifest
from shared.fedio import build_global_model
from shared.losses import make_loss
from shared.metrics import detection_metrics
from shared.models import resolve_device
from shared.training import Trainer, make_optimizer, predict_detections
from simulations.compare import budget_config
from simulations.pooled_training import train_fold
from simulations.simulate import prepare_split

log = logging.getLogger("dentfed.bench")
WEIGHTS = "weights/torchvision_mobilenet_v2_features_in1k.pth"


def bench_config(labels: list[str], manifest: Path, shared: Path, args: argparse.Namespace
                 ) -> Config:
    return config_from_dict({
        "task": {"type": "detection", "labels": labels},
        "data": {"manifest": str(manifest), "image_size": args.image_size,
                 "modality": "radiograph", "batch_size": args.batch_size, "augment": True,
                 "val_fraction": 0.15, "test_fraction": 0.2},
        "model": {"name": "fasterrcnn_mobilenet_v2_fpn", "pretrained": str(shared / WEIGHTS),
                  "freeze": args.freeze, "detection": {"box_head_size": args.box_head,
                                                       "box_batch_size_per_image": 128,
                                                       "roi_sampling_ratio": 1,
                                                       "rpn_proposals": 300,
                                                       "detections_per_img": 64}},
        "train": {"optimizer": args.optimizer, "lr": args.lr, "momentum": 0.9,
                  "weight_decay": 1e-4,
                  "grad_clip_norm": 10.0, "patience": None, "progress": False},
        "federation": {"strategy": "fedavg", "rounds": args.rounds,
                       "local_steps": args.local_steps, "min_train_clinics": args.clinics,
                       "min_available_clinics": args.clinics,
                       # the final global model is what is scored: the server's test set
                       # scores every 5th round and the last, the clinics do not evaluate
                       "evaluate_every": 5, "fraction_evaluate": 0.0,
                       "min_evaluate_clinics": 0},
        "split": {"clinics": args.clinics, "scheme": "site", "test_fraction": 0.2, "seed": 0},
        "tracking": {"enabled": False},
    })


def numbering_scores(model: torch.nn.Module, cfg: Config, test_m: Manifest) -> dict[str, float]:
    """mAP (torchmetrics) plus FDI numbering figures (shared.fdi) on the test manifest."""
    from shared import fdi

    device = resolve_device(cfg.train.device)
    model.to(device)
    dl = make_loader(test_m, cfg.data, train=False)
    preds, targets, _ = predict_detections(model, dl, None, device)
    names = list(cfg.task.labels)
    res = detection_metrics(preds, targets, names)  # what evaluate() reports
    out = {"map_50": res["map_50"], "map": res["map"], "mar_100": res["mar_100"]}
    raw = [fdi.findings_from_output(p, names) for p in preds]
    truth = [[[names[int(k) - 1], *map(float, b)] for b, k in zip(t["boxes"], t["labels"],
                                                                 strict=True)]
             for t in targets]
    for tag, found in (("raw", raw), ("post", [fdi.consistent_numbering(f) for f in raw])):
        m = fdi.numbering_metrics(found, truth)
        out.update({f"{k}_{tag}": float(v) for k, v in m.items()
                    if isinstance(v, int | float)})
    model.cpu()
    return out


def images_per_second(cfg: Config, m: Manifest, rows: np.ndarray, steps: int = 6) -> float:
    """Training throughput of the one loop on this machine (after one warm-up step)."""
    device = resolve_device(cfg.train.device)
    model = build_global_model(cfg).to(device)
    dl = make_loader(m.subset(rows), cfg.data, train=True)
    with Trainer(model, dl, make_loss(cfg.task, cfg.train), make_optimizer(model, cfg.train),
                 device) as tr:
        tr.run(max_steps=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = tr.run(max_steps=steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return stats["examples"] / (time.perf_counter() - t0)


def federated(cfg: Config, split_dir: Path) -> torch.nn.Module:
    from server.federation import run_federation
    from simulations.bench_quality import InProcessGrid

    res = run_federation(InProcessGrid(split_dir, cfg.split.clinics), cfg,
                         split_dir / "server_test.csv")
    model = build_global_model(cfg)
    model.load_state_dict(res.evaluator.final_state)
    return model


def _cell(v: list[float]) -> str:
    a = np.asarray([x for x in v if not math.isnan(x)], float)
    if not len(a):
        return "undef"
    return f"{a.mean():.3f}" + (f" ± {a.std(ddof=1):.3f}" if len(a) > 1 else "")


COLUMNS = (("map_50", "mAP@0.5"), ("map", "mAP@0.5:0.95"),
           ("numbering_accuracy_raw", "FDI acc. (raw)"),
           ("numbering_accuracy_post", "FDI acc. (post-proc.)"),
           ("present_teeth_accuracy_post", "present-teeth acc. (post)"),
           ("tooth_recall_post", "tooth recall"), ("tooth_precision_post", "tooth precision"))


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=None, help="../shared (default: DENTFED_SHARED or "
                    "../shared beside the repo)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--clinics", type=int, default=4)
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--lr", type=float, default=5e-4, help="(sgd: try 0.005)")
    ap.add_argument("--freeze", type=int, default=4, help="frozen backbone stages")
    ap.add_argument("--box-head", type=int, default=256, help="Faster R-CNN box head width")
    ap.add_argument("--strategy", action="append", default=[],
                    help="extra federated rows: name:section.key=value,... (repeatable)")
    ap.add_argument("--no-local", action="store_true", help="skip the local-only rows")
    ap.add_argument("--rows", default=None,
                    help="comma list of the rows to run (e.g. 'Pooled,FedAvg'; default all), "
                    "so one seed's rows can run in two processes")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    ap.add_argument("--out", help="write the table (markdown) here, raw values beside (.json)")
    ap.add_argument("--combine", nargs="+", type=Path, metavar="JSON",
                    help="print (and with --out write) one table from earlier --out JSON "
                    "files instead of training")
    args = ap.parse_args(argv)
    if args.combine:
        table = combine(args.combine)
        print(table)
        if args.out:
            write_text_atomic(Path(args.out), table + "\n")
        return table
    if args.smoke:
        args.image_size, args.rounds, args.local_steps = 128, 2, 2
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("dentfed.server").setLevel(logging.INFO)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from dental_datasets.base import shared_root
    from dental_datasets.ufba425_teeth_detection import build_manifest, fdi_names
    from simulations.bench_quality import _override

    shared = shared_root(args.shared)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-det-") as tmp:
        manifest = build_manifest(Path(tmp) / "ufba" / "manifest.csv", shared)
        base = bench_config(fdi_names(shared), manifest, shared, args)
        m = read_manifest(manifest, base.task, default_modality="radiograph")
        if args.smoke:  # a few images per category
            keep = np.concatenate([np.flatnonzero(m.sites == s)[:6] for s in np.unique(m.sites)])
            small = Path(tmp) / "ufba" / "smoke.csv"
            import pandas as pd

            pd.read_csv(manifest, dtype=str, keep_default_na=False).iloc[keep].to_csv(
                small, index=False)
            base = _override(base, f"data.manifest={small}")
            m = read_manifest(small, base.task, default_modality="radiograph")
        split_dir = Path(tmp) / "split"
        split = prepare_split(base, m.source, split_dir)
        test_m = read_manifest(split_dir / "server_test.csv", base.task,
                               default_modality="radiograph")
        parts = {s: np.concatenate([p[s] for p in split.clinics]) for s in ("train", "val")}
        ips = images_per_second(base, m, parts["train"])
        print(f"training images/s ({resolve_device('auto').type}, {args.image_size} px, "
              f"batch {args.batch_size}): {ips:.2f}", flush=True)
        for seed in seeds:
            baselines = [("Pooled", parts)]
            if not args.no_local:
                baselines += [(f"Local {c}", {s: p[s] for s in ("train", "val")})
                              for c, p in enumerate(split.clinics)]
            wanted = set(args.rows.split(",")) if args.rows else None
            for name, pr in baselines:
                if wanted is not None and name not in wanted:
                    continue
                # pooled stands for every clinic: their summed batches (as `--compare`)
                bcfg = budget_config(base, seed, clinics=split.n if name == "Pooled" else 1)
                t0 = time.perf_counter()
                fold = train_fold(bcfg, m, {**pr, "test": pr["val"]}, seed)
                sc = numbering_scores(fold.model, bcfg, test_m)
                sc["seconds"], sc["seed"] = time.perf_counter() - t0, seed
                rows.setdefault(name, []).append(sc)
                print(f"seed {seed} {name}: mAP@0.5 {sc['map_50']:.3f} ({sc['seconds']:.0f} s)",
                      flush=True)
            for spec in ["FedAvg:", *args.strategy]:
                name, _, over = spec.partition(":")
                if wanted is not None and name not in wanted:
                    continue
                fcfg = _override(base, (over + "," if over else "") + f"train.seed={seed}")
                t0 = time.perf_counter()
                sc = numbering_scores(federated(fcfg, split_dir), fcfg, test_m)
                sc["seconds"], sc["seed"] = time.perf_counter() - t0, seed
                rows.setdefault(name, []).append(sc)
                print(f"seed {seed} {name}: mAP@0.5 {sc['map_50']:.3f} ({sc['seconds']:.0f} s)",
                      flush=True)
    info = (f"UFBA teeth, {args.clinics} clinics by category, Faster R-CNN MobileNetV2-FPN "
            f"{args.image_size} px, freeze {args.freeze}, {args.rounds} rounds x "
            f"{args.local_steps} steps (batch {args.batch_size}), seeds {seeds}, "
            f"{resolve_device('auto').type}; training {ips:.2f} images/s; total "
            f"{time.perf_counter() - t_all:.0f} s" + (" -- SMOKE RUN, not a result" if
                                                      args.smoke else ""))
    table = info + "\n\n" + render(rows)
    print("\n" + table)
    if args.out:
        write_text_atomic(Path(args.out), table + "\n")
        write_json(Path(args.out).with_suffix(".json"),  # NaN (undefined) -> null
                   {"info": info, "images_per_second": ips, "rows": rows,
                    "settings": {k: getattr(args, k) for k in SETTINGS}})
    return table


def render(rows: dict[str, list[dict]]) -> str:
    """The table (mean ± sd over the seeds a row has), then each federated row's mAP@0.5 as a
    fraction of pooled's and against the best local model, paired by seed (the issue's
    criteria: >= 0.95 x pooled, above every local-only model)."""
    head = "| method | " + " | ".join(c for _, c in COLUMNS) + " | seeds | s/seed |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for name, vals in rows.items():
        cells = [_cell([v.get(k, math.nan) for v in vals]) for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " | "
                     + ",".join(str(v.get("seed", "?")) for v in vals)
                     + f" | {np.mean([v['seconds'] for v in vals]):.0f} |")
    by_seed = {name: {v.get("seed"): v["map_50"] for v in vals} for name, vals in rows.items()}
    pooled = by_seed.get("Pooled", {})
    local = [n for n in by_seed if n.startswith("Local ")]
    fed = [n for n in by_seed if n != "Pooled" and n not in local]
    for name in fed:
        seeds = [s for s in by_seed[name] if s in pooled]
        if seeds:
            r = [by_seed[name][s] / pooled[s] for s in seeds]
            lines.append(f"\n- {name} mAP@0.5 / Pooled: " + ", ".join(f"{x:.3f}" for x in r)
                         + f" (seeds {seeds}; goal >= 0.95)")
        seeds = [s for s in by_seed[name] if all(s in by_seed[n] for n in local)]
        if local and seeds:
            gap = [by_seed[name][s] - max(by_seed[n][s] for n in local) for s in seeds]
            lines.append(f"- {name} mAP@0.5 - best local model: "
                         + ", ".join(f"{x:+.3f}" for x in gap) + f" (seeds {seeds}; goal > 0)")
    return "\n".join(lines)


# Settings that must agree for invocations to be combined (seeds and rows may differ).
SETTINGS = ("clinics", "image_size", "batch_size", "rounds", "local_steps", "optimizer", "lr",
            "freeze", "box_head")


def combine(paths: list[Path]) -> str:
    """One table from several invocations' JSON files (e.g. a seed's rows split over two
    processes with --rows, or seeds run apart). Rows keep their seeds; a row run twice for
    the same seed is refused."""
    rows: dict[str, list[dict]] = {}
    settings: dict | None = None
    for p in paths:
        d = json.loads(Path(p).read_text())
        got = d.get("settings")
        if got is None:  # written before settings were stored: read them from the info line
            got = _settings_from_info(d["info"])
        clash = {k for k in got.keys() & (settings or {}).keys() if got[k] != settings[k]}
        if clash:
            raise SystemExit(f"{p}: settings {sorted(clash)} differ from an earlier file's")
        settings = {**got, **(settings or {})}
        seeds = [int(x) for x in re.search(r"seeds \[([\d, ]*)\]", d["info"]).group(1)
                 .split(",") if x.strip()]
        for name, vals in d["rows"].items():
            for i, v in enumerate(vals):
                v = {k: math.nan if x is None else x for k, x in v.items()}
                v.setdefault("seed", seeds[i])
                if any(o["seed"] == v["seed"] for o in rows.get(name, [])):
                    raise SystemExit(f"{p}: {name} seed {v['seed']} is in an earlier file")
                rows.setdefault(name, []).append(v)
    order = sorted(rows, key=lambda n: (n != "Pooled", not n.startswith("Local "), n))
    rows = {n: sorted(rows[n], key=lambda v: v["seed"]) for n in order}
    return (f"combined from {len(paths)} invocations; settings {settings}\n\n"
            + render(rows))


def _settings_from_info(info: str) -> dict:
    m = re.search(r"(\d+) clinics .* (\d+) px, freeze (\d+), (\d+) rounds x (\d+) steps "
                  r"\(batch (\d+)\)", info)
    if m is None:
        raise SystemExit(f"no settings in {info!r}")
    c, px, fr, r, st, b = map(int, m.groups())
    return {"clinics": c, "image_size": px, "freeze": fr, "rounds": r, "local_steps": st,
            "batch_size": b}

if __name__ == "__main__":
    main()
