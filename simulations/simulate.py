"""`dentfed simulate`: split one dataset into virtual clinics and run them through Flower's
simulation runtime with the repo's ServerApp/ClientApp; the run folder is the server's."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from shared.config import Config, dump_config
from shared.errors import DentfedError
from shared.experiment import load_task_manifest
from shared.report import write_json
from simulations.engine import run_flower_simulation
from simulations.partition import ClinicSplit, read_raw, split_clinics, write_split

log = logging.getLogger("dentfed.simulate")


def prepare_split(cfg: Config, manifest: str | Path | None, out: Path) -> ClinicSplit:
    m = load_task_manifest(cfg, manifest)
    raw = read_raw(m.source)
    split = split_clinics(m, raw, cfg)
    table = write_split(m, raw, split, out)
    log.info("split %s into %d clinics (%s):\n%s", m.source.name, split.n, cfg.split.scheme,
             table.to_markdown())
    return split


def simulate(cfg: Config, manifest: str | Path | None, out: Path, echo: bool = True) -> dict:
    """Split, run cfg.federation.rounds rounds with cfg.split.clinics virtual clinics, and
    return metrics.json of the run folder `out` (which also holds the split and Flower's log)."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        raise DentfedError(f"output folder {out} exists and is not empty; choose another --out")
    work = out.parent / f".{out.name}.work-{time.strftime('%H%M%S')}"
    work.mkdir(parents=True)
    failed_log = out.parent / f"{out.name}.failed-flower.log"
    try:
        prepare_split(cfg, manifest, work / "split")
        (work / "config.yaml").write_text(dump_config(cfg))
        t0 = time.perf_counter()
        flwr_log = run_flower_simulation(
            {"config": str(work / "config.yaml"), "run-dir": str(out),
             "split-dir": str(work / "split"),
             "test-manifest": str(work / "split" / "server_test.csv")},
            num_clinics=cfg.split.clinics, client_cpus=cfg.simulation.client_cpus,
            client_gpus=cfg.simulation.client_gpus,
            max_concurrent=cfg.simulation.max_concurrent, work=work / "flower",
            timeout=cfg.federation.round_timeout * (cfg.federation.rounds + 1), echo=echo)
        wall = time.perf_counter() - t0
        if not (out / "metrics.json").is_file():
            shutil.copyfile(flwr_log, failed_log)
            raise DentfedError(f"the ServerApp did not write a run folder; see {failed_log}")
        shutil.move(str(work / "split"), out / "split")
        shutil.move(str(flwr_log), out / "flower.log")
        data = json.loads((out / "metrics.json").read_text())
        data["wall_seconds"] = wall  # Flower start-up included; `seconds` is the strategy's
        write_json(out / "metrics.json", data)
        return data
    except DentfedError as e:
        if "flower.log" in str(e) and (work / "flower" / "flower.log").is_file():
            shutil.copyfile(work / "flower" / "flower.log", failed_log)  # outlives the work dir
            raise DentfedError(str(e).replace(str(work / "flower" / "flower.log"),
                                              str(failed_log))) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
