"""The clinic's Flower ClientApp (`client.app:app` in pyproject.toml), light to import.

Flower imports this module wherever it checks or loads the app. Its simulation process
imports it, under the one lock Flower loads both apps with, before it starts Ray; while the
app modules imported torch and the training code (~6 s each on a 2-core VM), Ray and every
clinic's actor started that much later (`server/app.py` says more). The handlers live in
`client/handlers.py` and load on the first message; in a simulation each Ray actor loads
them as it starts, in the background (`client/warmup.py`), while the server starts and
scores round 0."""

from __future__ import annotations

import importlib
import os
import sys

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.warmup import HANDLERS, warm_simulation_actors

# Flower's simulation runtime: imported in its simulation process only, before it loads the
# ClientApp and builds the Ray backend.
SIMULATION_RUNTIME = "flwr.server.superlink.fleet.vce.vce_api"


class DeferredClientApp(ClientApp):
    """A ClientApp whose handlers, mods and imports are another module's `app`, imported on
    the first message. The instance holds only that module's name, so it is cheap to pickle:
    Flower's simulation sends the ClientApp it loaded along with every message."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module

    def __call__(self, message: Message, context: Context) -> Message:
        return importlib.import_module(self.module).app(message, context)


os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
app = DeferredClientApp(HANDLERS)

if SIMULATION_RUNTIME in sys.modules:
    warm_simulation_actors()
