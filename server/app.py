"""The coordinator's Flower ServerApp (`server.app:app`; `flwr run .` or `dentfed simulate`),
light to import. The run itself, and its run config keys, are in `server/run.py`.

Flower loads a ServerApp and a ClientApp under one lock (`flwr.supercore.object_ref`'s
`_import_lock`). In a simulation both load in one process, and Flower starts Ray only after
the ClientApp has loaded. While this module imported torch and the training code (~6 s on a
2-core VM), Ray, and so every clinic's actor, started that much later. Now the heavy imports
happen when the ServerApp is called, outside the lock (`client/app.py` does the same)."""

from __future__ import annotations

import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from server.run import main as run_federation_main

    run_federation_main(grid, context)
