"""A deployed clinic's private round state (AdamW moments, SCAFFOLD variate, int8 residual) on
its own disk, one folder per federation (`<state-dir>/<federation-id>/`), instead of in the
Flower Context that travels SuperNode <-> ClientApp with every message; and a resumed
federation (a new Flower run: empty Context, new run id, the same federation id) continuing
from exactly that state. In process, around the ClientApp's handlers: each round a new
Context-carrying "process" (the module caches cleared), as on a SuperNode."""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

import client.clinic as clinic_mod
from client.app import app as client_app
from client.clinic import CLINIC_TOKEN_FILE, OPTIMIZER_KEY, RESIDUAL_KEY, SCAFFOLD_CI_KEY
from client.handlers import ClinicError
from dentfed import cli, deploy
from server.checkpoint import (
    CHECKPOINT,
    FEDERATION_ID_FILE,
    keep_federation_id,
    kept_federation_id,
)
from shared.config import config_from_dict, dump_config
from shared.errors import DentfedError
from shared.fedio import (
    CLINIC_RECORD,
    CLINIC_TOKEN_KEY,
    FEDERATION_ID_KEY,
    SCAFFOLD_C_KEY,
    build_global_model,
    clinic_token_of,
    config_record,
    is_clinic_token,
    model_arrays,
)
from shared.upload import decode_update
from tests.test_federation import _fed_config, _task_identity

__all__ = ["_task_identity"]  # the autouse fixture: messages need a run/node identity

PRIVATE = (OPTIMIZER_KEY, SCAFFOLD_CI_KEY, RESIDUAL_KEY)


def _cfg():
    return _fed_config(local_steps=1, keep_optimizer_state=True, strategy="scaffold",
                       upload="int8")


def _ctx(manifest: Path, state_dir: Path | None, fid: str | None, run_id: int = 1) -> Context:
    """A SuperNode's Context for one Flower run: node config as `dentfed clinic start` sets
    it, run config as `dentfed coordinator run` sets it."""
    node = {"manifest": str(manifest)}
    if state_dir is not None:
        node["state-dir"] = str(state_dir)
    return Context(run_id=run_id, node_id=1, node_config=node, state=RecordDict(),
                   run_config={FEDERATION_ID_KEY: fid} if fid else {})


def _round(cfg, ctx: Context, arrays: ArrayRecord, rnd: int, control: ArrayRecord
           ) -> tuple[ArrayRecord, Message]:
    """One train message in a fresh ClientApp process; the clinic's update decoded to the
    next round's global arrays (one clinic: its update is the aggregate)."""
    clinic_mod._CLINICS.clear()
    clinic_mod._MODELS.clear()
    conf = config_record(cfg)
    conf["server-round"] = rnd
    content = {"arrays": arrays, "config": conf}
    if rnd > 1:
        content[SCAFFOLD_C_KEY] = control
    reply = client_app(Message(RecordDict(content), dst_node_id=1, message_type="train"), ctx)
    assert not reply.has_error(), reply.error
    return decode_update(reply.content, arrays), reply


def _equal(a: ArrayRecord, b: ArrayRecord) -> bool:
    return all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.fixture
def setting(tiny_manifest):
    cfg = _cfg()
    model = build_global_model(cfg)
    start = model_arrays(model)
    # a fixed server variate c (SCAFFOLD), nonzero, so c - c_i depends on the clinic's c_i
    g = torch.Generator().manual_seed(0)
    control = ArrayRecord({n: Array((1e-3 * torch.randn(p.shape, generator=g)).numpy())
                           for n, p in model.named_parameters() if p.requires_grad})
    return cfg, tiny_manifest, start, control


def test_state_on_disk_per_federation_and_a_resumed_federation_continues_from_it(setting,
                                                                                  tmp_path):
    """Round 1, then round 2 three ways: in the same Flower run; in a new Flower run (empty
    Context, new run id: a coordinator --resume) with the same federation id, which must give
    the very same update; and as another federation at the same clinic, which must read none
    of it (the same update as a clinic with no state at all, which differs). Every reply
    carries the clinic's random token for the federation, kept in its folder: the same after
    the resume, another in another federation, none without a state folder."""
    cfg, manifest, start, control = setting
    ctx = _ctx(manifest, tmp_path / "state", "fedA")
    after1, reply = _round(cfg, ctx, start, 1, control)
    # what leaves: the update, its scales, SCAFFOLD's delta, scalars; no state record
    assert set(reply.content.array_records) == {"arrays", "upload-scales", "scaffold-delta-c"}
    token = clinic_token_of(reply)
    assert set(reply.content.config_records) == {CLINIC_RECORD}
    assert dict(reply.content[CLINIC_RECORD]) == {CLINIC_TOKEN_KEY: token}
    assert re.fullmatch("[0-9a-f]{16}", token)
    assert (tmp_path / "state" / "fedA" / CLINIC_TOKEN_FILE).read_text() == token + "\n"
    # the Context the SuperNode keeps and ships with every message holds none of it
    assert not set(ctx.state.array_records) & set(PRIVATE)
    folder = tmp_path / "state" / "fedA"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    saved = torch.load(folder / "after_round_1.pt", weights_only=True)
    assert set(saved) == set(PRIVATE) and all(saved[k] for k in PRIVATE)

    resumed, reply = _round(cfg, _ctx(manifest, tmp_path / "state", "fedA", run_id=7), after1,
                            2, control)
    assert clinic_token_of(reply) == token
    uninterrupted, reply = _round(cfg, ctx, after1, 2, control)
    assert clinic_token_of(reply) == token
    assert _equal(resumed, uninterrupted)
    assert not set(ctx.state.array_records) & set(PRIVATE)

    other, reply = _round(cfg, _ctx(manifest, tmp_path / "state", "fedB", run_id=2), after1, 2,
                          control)
    assert is_clinic_token(clinic_token_of(reply)) and clinic_token_of(reply) != token
    fresh, reply = _round(cfg, _ctx(manifest, None, None, run_id=3), after1, 2, control)
    assert not reply.content.config_records  # no state folder: no token
    assert _equal(other, fresh) and not _equal(fresh, uninterrupted)
    assert sorted(p.name for p in folder.glob("after_round_*")) == \
        ["after_round_1.pt", "after_round_2.pt"]
    assert [p.name for p in (tmp_path / "state" / "fedB").glob("after_round_*")] == \
        ["after_round_2.pt"]


def test_a_federation_id_that_is_no_plain_name_is_refused(setting, tmp_path):
    cfg, manifest, start, control = setting
    ctx = _ctx(manifest, tmp_path / "state", "../escape")
    clinic_mod._CLINICS.clear()
    conf = config_record(cfg)
    conf["server-round"] = 1
    with pytest.raises(ClinicError, match="DentfedError"):  # the handler's error reply
        client_app(Message(RecordDict({"arrays": start, "config": conf}), dst_node_id=1,
                           message_type="train"), ctx)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "state").exists()


def test_coordinator_keeps_the_federation_id_for_resume(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    fid = deploy.federation_id_for(run, resume=False)
    assert len(fid) == 32 and fid != deploy.federation_id_for(run, resume=False)
    keep_federation_id(run, fid, resume=False)  # the ServerApp, at the run's first start
    assert kept_federation_id(run) == fid
    assert deploy.federation_id_for(run, resume=True) == fid
    cmd = deploy.run_command(Path("fed.yaml"), run, resume=True, federation_id=fid)
    assert f'federation-id="{fid}"' in cmd[cmd.index("--run-config") + 1]
    keep_federation_id(run, fid, resume=True)
    with pytest.raises(DentfedError, match="federation-id"):
        keep_federation_id(run, "another", resume=True)
    with pytest.raises(DentfedError, match="federation-id"):
        keep_federation_id(tmp_path, "a/b", resume=False)
    assert (run / FEDERATION_ID_FILE).read_text().strip() == fid
    # a new run into a folder that holds a checkpoint would give the federation a new id:
    # refused before anything starts
    (run / CHECKPOINT).write_bytes(b"")
    config = tmp_path / "fed.yaml"
    config.write_text(dump_config(_cfg()))
    assert cli.main(["coordinator", "run", "--config", str(config), "--run-dir", str(run),
                     "--home", str(tmp_path / "home")]) == 1
    assert "--resume" in capsys.readouterr().err
    assert kept_federation_id(run) == fid


def test_coordinator_refuses_to_resume_dp_sgd_without_the_clinics_ledgers(tmp_path, capsys):
    """A DP-SGD run folder that keeps no federation id (a run from before them, or plain
    `flwr run`): its clinics' epsilon ledgers are in folders the resumed run cannot name, so
    `dentfed coordinator run --resume` refuses before anything starts."""
    run = tmp_path / "run"
    run.mkdir()
    raw = _cfg().model_dump(mode="json")
    raw["privacy"] = {"dp_sgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0}}
    raw["federation"].update(strategy="fedavg", upload="fp32")
    (run / "config.yaml").write_text(dump_config(config_from_dict(raw)))
    (run / CHECKPOINT).write_bytes(b"")
    assert cli.main(["coordinator", "run", "--run-dir", str(run), "--resume",
                     "--home", str(tmp_path / "home")]) == 1
    assert "keeps no federation id" in capsys.readouterr().err
    assert not (run / FEDERATION_ID_FILE).exists()


def test_clinic_start_state_folder_per_coordinator_and_clean_up(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,patient_id\n")
    ca1, ca2 = tmp_path / "ca1.crt", tmp_path / "ca2.crt"
    ca1.write_text("one CA")
    ca2.write_text("another CA")
    assert deploy.default_state_dir(manifest, ca1) != deploy.default_state_dir(manifest, ca2)
    cmd = deploy.supernode_command("127.0.0.1:1", ca1, ca1, manifest,
                                   state_dir=tmp_path / "st")
    assert f'state-dir="{tmp_path / "st"}"' in cmd[cmd.index("--node-config") + 1]
    old, new = tmp_path / "st" / "fedold", tmp_path / "st" / "fednew"
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "after_round_1.pt").write_bytes(b"x" * 10)
    ten_days = time.time() - 10 * 86400
    os.utime(old / "after_round_1.pt", (ten_days, ten_days))
    found = {p.name: age for p, age, _ in deploy.clean_state([tmp_path / "st"], 5,
                                                              dry_run=True)}
    assert found["fedold"] > 9.9 and found["fednew"] < 0.1 and old.exists()
    deploy.clean_state([tmp_path / "st"], 5)
    assert not old.exists() and new.exists()
