"""What a process that plays clinics keeps in memory (docs/speed.md, Memory): one model for
all the clinics it plays, and a clinic's optimiser state on the clinic's own disk, not in the
Flower context that a simulation keeps for every clinic at once and ships with each message.
Neither may change what a clinic computes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict

import client.clinic as clinic_mod
from client.app import app as client_app
from client.clinic import ON_DISK_STATE, OPTIMIZER_KEY
from shared.config import config_from_dict
from shared.fedio import SCAFFOLD_DELTA_KEY, build_global_model, config_record, model_arrays
from shared.upload import decode_update
from tests.conftest import tiny_config, write_tiny_multilabel
from tests.test_federation import _task_identity

__all__ = ["_task_identity"]  # the autouse fixture: messages need a run/node identity


def _cfg(**fed):
    raw = tiny_config().model_dump(mode="json")
    raw["model"]["freeze"] = 3
    raw["federation"] = {"local_steps": 1, "keep_optimizer_state": True, **fed}
    return config_from_dict(raw)


def _msg(cfg, arrays, rnd: int) -> Message:
    conf = config_record(cfg)
    conf["server-round"] = rnd
    return Message(RecordDict({"arrays": arrays, "config": conf}), dst_node_id=1,
                   message_type="train")


def _sim_ctx(split: Path, k: int) -> Context:
    """A virtual clinic as the simulation runtime makes it: its state folder is
    <split>/clinic_<k>/state."""
    return Context(run_id=1, node_id=k + 1, node_config={"partition-id": k},
                   state=RecordDict(), run_config={"split-dir": str(split)})


def _train(cfg, ctx: Context, arrays, rnd: int) -> dict[str, np.ndarray]:
    reply = client_app(_msg(cfg, arrays, rnd), ctx)
    assert not reply.has_error(), reply.error
    return {k: a.numpy() for k, a in reply.content["arrays"].items()}


def _fresh_process() -> None:
    clinic_mod._CLINICS.clear()
    clinic_mod._MODELS.clear()


@pytest.fixture
def split(tmp_path: Path) -> Path:
    for k in range(3):
        write_tiny_multilabel(tmp_path / "split" / f"clinic_{k}", n=16, seed=k)
    return tmp_path / "split"


def test_a_process_playing_three_clinics_holds_one_model_and_no_optimizer_state(split):
    cfg = _cfg()
    _fresh_process()
    start = model_arrays(build_global_model(cfg))
    ctxs = [_sim_ctx(split, k) for k in range(3)]
    played = [_train(cfg, ctx, start, 1) for ctx in ctxs]
    models = {id(c.model) for c in clinic_mod._CLINICS.values()}
    assert len(clinic_mod._CLINICS) == 3 and len(models) == 1 == len(clinic_mod._MODELS)
    for k, ctx in enumerate(ctxs):
        # the optimiser's moments are on the clinic's disk, not in the context Flower keeps
        assert OPTIMIZER_KEY not in ctx.state.array_records
        saved = torch.load(split / f"clinic_{k}" / "state" / "after_round_1.pt")
        assert saved[OPTIMIZER_KEY]
    # sharing the model changed nothing: the third clinic alone in a fresh process (a fresh
    # state folder too) replies with the very same weights
    _fresh_process()
    alone = split.parent / "alone"
    shutil.copytree(split / "clinic_2", alone / "clinic_2", ignore=shutil.ignore_patterns("state"))
    again = _train(cfg, _sim_ctx(alone, 2), start, 1)
    assert all(np.array_equal(again[k], played[2][k]) for k in again)


@pytest.mark.parametrize("fed", [{}, {"strategy": "scaffold"}, {"upload": "int8"}],
                         ids=["adamw-moments", "scaffold-variate", "int8-residual"])
def test_round_state_kept_on_disk_trains_like_state_kept_in_the_context(split, fed):
    """Round 2 with the large round state (the optimiser's moments, SCAFFOLD's c_i, the int8
    residual) read back from the state folder as tensors (simulation) equals round 2 with it
    kept in context.state (a clinic without a state folder), each round in a new process; a
    fresh start gives other weights."""
    cfg = _cfg(**fed)
    start = model_arrays(build_global_model(cfg))
    manifest = split / "clinic_0" / "manifest.csv"

    def own_manifest() -> Context:  # no state folder: the state stays in the context
        return Context(run_id=1, node_id=1, node_config={"manifest": str(manifest)},
                       state=RecordDict(), run_config={})

    def global_after(ctx: Context, arrays: ArrayRecord, rnd: int) -> ArrayRecord:
        reply = client_app(_msg(cfg, arrays, rnd), ctx)
        assert not reply.has_error(), reply.error
        records = dict(reply.content.array_records)
        records.pop(SCAFFOLD_DELTA_KEY, None)
        return decode_update(records, arrays)  # int8: the clinic's weights back from the delta

    def two_rounds(ctx: Context) -> tuple[dict[str, np.ndarray], ArrayRecord]:
        _fresh_process()
        first = global_after(ctx, start, 1)
        if "split-dir" in ctx.run_config:  # a state folder: the large state is on disk only
            assert not any(k in ctx.state.array_records for k in ON_DISK_STATE)
        _fresh_process()
        second = global_after(ctx, first, 2)
        return {k: a.numpy() for k, a in second.items()}, first

    on_disk, first = two_rounds(_sim_ctx(split, 0))
    in_context, first_b = two_rounds(own_manifest())
    assert all(np.array_equal(first[k].numpy(), first_b[k].numpy()) for k in first)
    assert all(np.array_equal(on_disk[k], in_context[k]) for k in on_disk)
    _fresh_process()
    fresh = {k: a.numpy() for k, a in global_after(own_manifest(), first, 2).items()}
    assert any(not np.array_equal(fresh[k], on_disk[k]) for k in fresh)
