"""The coordinator's federation run behind the ServerApp (`server/app.py`): reads the run
config, runs the rounds (`server/federation.py`, or SecAgg+'s workflow), writes the run folder
and logs it to the tracking store. Imports torch and the training code: `server/app.py`
imports this module when its ServerApp is called, not when Flower loads the app.

Run config keys (pyproject `[tool.flwr.app.config]`, overridable with `--run-config`):
`config` (dentfed YAML), `run-dir` (where the run folder goes; default runs/fed-<time>),
`test-manifest` (server-held test set; default federation.test_manifest in the YAML),
`resume` (true: continue the run in `run-dir` after its last checkpointed round, with the
run folder's own config.yaml), `federation-id` (deployment: names each clinic's state folder
for this federation; `dentfed coordinator run` makes one and `--resume` reuses the one the run
folder keeps) and, in simulation, `split-dir` (read by the clinics).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server.actor_pool import keep_actors_on_refused_messages
from server.checkpoint import keep_federation_id, kept_federation_id
from server.federation import run_federation
from server.reply_polling import poll_reply_objects_briskly
from server.resume import CHECKPOINT, check_resumable
from server.run_folder import write_run_folder
from server.tracking import log_run_folder
from shared.atomic_files import write_text_atomic
from shared.config import dump_config, load_config, with_overrides
from shared.errors import ConfigError
from shared.fedio import FEDERATION_ID_KEY, resumed_run

log = logging.getLogger("dentfed.server")


def _log_to_console() -> None:
    """Our server logger's lines (central metric per round, rejected updates) in Flower's
    stream, so `flwr run --stream` and `dentfed simulate` show them."""
    root = logging.getLogger("dentfed")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)


def main(grid: Grid, context: Context) -> None:
    """One federation on `grid` as the run config in `context` says; see server/app.py."""
    _log_to_console()
    rc = context.run_config
    resume = resumed_run(rc)
    out = Path(str(rc.get("run-dir", "")) or f"runs/fed-{time.strftime('%Y%m%d-%H%M%S')}")
    if resume:
        if not (out / "config.yaml").is_file():
            raise ConfigError(f"resume: {out} has no config.yaml; pass the run folder as "
                              "run-dir")
        cfg = load_config(out / "config.yaml")
        # the clinics find their state folders again (DP-SGD ledgers included): simulation's
        # are in the run's split folder, a deployment's are named by the kept federation id
        check_resumable(cfg, clinic_state_kept=bool(str(rc.get("split-dir", "")))
                        or bool(kept_federation_id(out)))
    else:
        cfg = load_config(str(rc["config"]))
        if (out / CHECKPOINT).exists():
            raise ConfigError(f"{out} already holds a checkpointed run: resume it "
                              "(run config resume=true) or choose another run-dir")
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", dump_config(cfg))
    keep_federation_id(out, str(rc.get(FEDERATION_ID_KEY, "")), resume)
    if str(rc.get("test-manifest", "")):  # run-config overrides go through the one schema
        cfg = with_overrides(cfg, {"federation.test_manifest": str(rc["test-manifest"])},
                             source="run config")
    test = cfg.federation.test_manifest
    if not test:
        raise ConfigError("no server test set: set federation.test_manifest or the run config "
                          "'test-manifest'")
    poll_reply_objects_briskly()  # deployment: a reply's arrays are fetched as they land
    if isinstance(grid, InMemoryGrid):  # simulation: a refused message keeps its Ray actor
        keep_actors_on_refused_messages()
    if cfg.privacy.secagg is not None:  # SecAgg+: Flower's legacy workflow (issue 6)
        from server.secagg import run_secagg_federation

        res = run_secagg_federation(grid, context, cfg, test)
    else:
        res = run_federation(grid, cfg, test, run_dir=out, resume=resume)
    data = write_run_folder(res, out)
    log_run_folder(out, "simulate" if str(rc.get("split-dir", "")) else "deploy", cfg)
    log.info("run folder %s: final %s %.4f", out, data["headline"],
             data["final"].get(data["headline"], float("nan")))
