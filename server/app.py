"""The coordinator's Flower ServerApp (`flwr run .` or `dentfed simulate`).

Run config keys (pyproject `[tool.flwr.app.config]`, overridable with `--run-config`):
`config` (dentfed YAML), `run-dir` (where the run folder goes; default runs/fed-<time>),
`test-manifest` (server-held test set; default federation.test_manifest in the YAML) and,
in simulation, `split-dir` (read by the clinics).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server.federation import run_federation
from server.report import write_run_folder
from shared.config import load_config
from shared.errors import ConfigError

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
log = logging.getLogger("dentfed.server")
app = ServerApp()


def _log_to_console() -> None:
    """Our server logger's lines (central metric per round, rejected updates) in Flower's
    stream, so `flwr run --stream` and `dentfed simulate` show them."""
    root = logging.getLogger("dentfed")
    if not root.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)


@app.main()
def main(grid: Grid, context: Context) -> None:
    _log_to_console()
    rc = context.run_config
    cfg = load_config(str(rc["config"]))
    test = str(rc.get("test-manifest", "")) or cfg.federation.test_manifest
    if not test:
        raise ConfigError("no server test set: set federation.test_manifest or the run config "
                          "'test-manifest'")
    out = Path(str(rc.get("run-dir", "")) or f"runs/fed-{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.privacy.secagg is not None:  # SecAgg+: Flower's legacy workflow (issue 6)
        from server.secagg import run_secagg_federation

        res = run_secagg_federation(grid, context, cfg, test)
    else:
        res = run_federation(grid, cfg, test)
    data = write_run_folder(res, out)
    log.info("run folder %s: final %s %.4f", out, data["headline"],
             data["final"].get(data["headline"], float("nan")))
