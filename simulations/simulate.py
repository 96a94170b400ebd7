"""`dentfed simulate`: split one dataset into virtual clinics and run them through Flower's
simulation runtime with the repo's ServerApp/ClientApp; the run folder is the server's."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from server.resume import CHECKPOINT, check_resumable
from shared.atomic_files import write_json, write_text_atomic
from shared.config import Config, dump_config, load_config
from shared.errors import DentfedError
from simulations.engine import REPO, run_flower_simulation
from simulations.partition import ClinicSplit, read_raw, split_clinics, write_split
from simulations.task_manifest import load_task_manifest

log = logging.getLogger("dentfed.simulate")


def prepare_split(cfg: Config, manifest: str | Path | None, out: Path) -> ClinicSplit:
    m = load_task_manifest(cfg, manifest)
    raw = read_raw(m.source)
    split = split_clinics(m, raw, cfg)
    table = write_split(m, raw, split, out)
    log.info("split %s into %d clinics (%s):\n%s", m.source.name, split.n, cfg.split.scheme,
             table.to_markdown())
    return split


def simulate(cfg: Config | None, manifest: str | Path | None, out: Path, echo: bool = True,
             resume: bool = False, app_dir: Path = REPO) -> dict:
    """Split, run cfg.federation.rounds rounds with cfg.split.clinics virtual clinics, and
    return metrics.json of the run folder `out` (which also holds the split, the server's
    checkpoint and Flower's log). With `resume`, `out` is an interrupted run: its own
    config.yaml and split are reused and the server continues after the last checkpoint."""
    out = Path(out).resolve()
    if resume:
        if not (out / CHECKPOINT).is_file() or not (out / "split").is_dir():
            raise DentfedError(f"cannot resume {out}: no {CHECKPOINT} and split/ there "
                               "(was it started by `dentfed simulate`, and did a round finish?)")
        cfg = load_config(out / "config.yaml")
        check_resumable(cfg)
    elif out.exists() and any(out.iterdir()):
        raise DentfedError(f"output folder {out} exists and is not empty; choose another --out"
                           " (or --resume it)")
    if cfg is None:
        raise DentfedError("simulate needs a config")
    work = out.parent / f".{out.name}.work-{time.strftime('%H%M%S')}"
    work.mkdir(parents=True)
    failed_log = out.parent / f"{out.name}.failed-flower.log"
    try:
        if not resume:
            out.mkdir(parents=True, exist_ok=True)
            prepare_split(cfg, manifest, out / "split")
            write_text_atomic(out / "config.yaml", dump_config(cfg))
        t0 = time.perf_counter()
        flwr_log = run_flower_simulation(
            {"config": str(out / "config.yaml"), "run-dir": str(out),
             "split-dir": str(out / "split"), "resume": resume,
             "test-manifest": str(out / "split" / "server_test.csv")},
            num_clinics=cfg.split.clinics, client_cpus=cfg.simulation.client_cpus,
            client_gpus=cfg.simulation.client_gpus,
            max_concurrent=cfg.simulation.max_concurrent, work=work / "flower",
            timeout=cfg.federation.round_timeout * (cfg.federation.rounds + 1), echo=echo,
            app_dir=app_dir, ray_address=cfg.simulation.ray_address)
        wall = time.perf_counter() - t0
        if not (out / "metrics.json").is_file():
            shutil.copyfile(flwr_log, failed_log)
            raise DentfedError(f"the ServerApp did not write a run folder; see {failed_log}")
        name = "flower-resumed.log" if resume else "flower.log"
        shutil.move(str(flwr_log), out / name)
        data = json.loads((out / "metrics.json").read_text())
        data["wall_seconds"] = wall  # Flower start-up included; `seconds` is the strategy's
        write_json(out / "metrics.json", data)
        return data
    except BaseException as e:  # Ctrl-C too: leave a resumable run or nothing
        checkpointed = (out / CHECKPOINT).is_file()
        if not checkpointed and not resume:
            shutil.rmtree(out, ignore_errors=True)  # nothing to resume: leave no half run
        if not isinstance(e, DentfedError):
            if checkpointed:
                log.warning("completed rounds are checkpointed: dentfed simulate --resume %s",
                            out)
            raise
        msg = str(e)
        if "flower.log" in msg and (work / "flower" / "flower.log").is_file():
            shutil.copyfile(work / "flower" / "flower.log", failed_log)  # outlives the work dir
            msg = msg.replace(str(work / "flower" / "flower.log"), str(failed_log))
        if checkpointed:
            msg += f"; completed rounds are checkpointed: dentfed simulate --resume {out}"
        raise DentfedError(msg) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
