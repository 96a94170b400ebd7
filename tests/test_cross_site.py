"""End-of-run personalisation and cross-site evaluation (issue 13): the clinic's handler on the
evaluate path, the coordinator's models x clinics matrix, and a real Flower simulation whose
clinics audit what they send."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

import client.clinic as clinic_mod
from client.app import app as client_app
from client.clinic import CLINIC_TOKEN_FILE
from server.cross_site import cross_site_evaluation
from server.run_folder import cross_site_markdown
from shared.config import config_from_dict
from shared.errors import ConfigError
from shared.fedio import (
    CLINIC_RECORD,
    CLINIC_TOKEN_KEY,
    CROSS_SITE_KEY,
    LOCAL_MODEL_KEY,
    build_global_model,
    clinic_token_of,
    config_record,
    exchanged_keys,
    model_arrays,
    personal_keys,
)
from shared.upload import SCALES_KEY
from tests.conftest import tiny_config
from tests.test_federation import (
    _pids_with_flwr_home_under,
    _task_identity,
    describe_pids,
    expected_shapes,
    two_clinic_simulation,
)

__all__ = ["_task_identity"]  # the autouse fixture: messages need a run/node identity
SCALAR_KEYS = {"val_loss", "val_macro_auc"}


def _cfg(**fed):
    raw = tiny_config().model_dump(mode="json")
    raw["model"]["freeze"] = 3
    raw["federation"] = {"local_epochs": 1, **fed}
    return config_from_dict(raw)


def _msg(cfg, records: dict, phase: str) -> Message:
    conf = config_record(cfg)
    conf["server-round"] = cfg.federation.rounds
    conf[CROSS_SITE_KEY] = phase
    return Message(RecordDict({**records, "config": conf}), dst_node_id=1,
                   message_type="evaluate")


def _ctx(manifest, **node) -> Context:
    return Context(run_id=1, node_id=1, node_config={"manifest": str(manifest), **node},
                   state=RecordDict(), run_config={})


def _scalars_only(reply: Message) -> dict[str, float]:
    assert not reply.has_error(), reply.error
    # no config record, but for the clinic's random token when it has a state folder
    assert set(reply.content.config_records) <= {CLINIC_RECORD}
    if CLINIC_RECORD in reply.content.config_records:
        assert dict(reply.content[CLINIC_RECORD]) == {CLINIC_TOKEN_KEY: clinic_token_of(reply)}
    (metrics,) = reply.content.metric_records.values()
    assert all(isinstance(v, int | float) for v in metrics.values())
    return dict(metrics)


def test_personalise_head_changes_only_the_classifier_and_sends_only_scalars(tiny_manifest,
                                                                              tmp_path):
    cfg = _cfg(personalize={"steps": 6, "scope": "head", "lr": 0.01},
               cross_site={"enabled": True})
    model = build_global_model(cfg)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reply = client_app(_msg(cfg, {"arrays": model_arrays(model)}, "own"),
                       _ctx(tiny_manifest, **{"state-dir": str(tmp_path / "state")}))
    metrics = _scalars_only(reply)
    assert not reply.content.array_records  # share_local_models off: no model leaves
    assert set(metrics) == {f"{m}/{k}" for m in ("global", "personalised")
                            for k in SCALAR_KEYS} | {"num-examples"}
    # the clinic's own validation figures: global vs its fine-tuned model
    assert metrics["personalised/val_loss"] < metrics["global/val_loss"]
    # head only: the model kept at the clinic differs from the global one in the classifier
    # alone (BatchNorm statistics of the body did not move either)
    saved = torch.load(tmp_path / "state" / "run-1" / "personalised_model.pt",
                       weights_only=False)["state_dict"]
    changed = {k for k in start if not torch.equal(saved[k], start[k])}
    assert changed == {"fc.weight", "fc.bias"}
    # and the head-only scope is undone: the clinic's model trains its usual layers again
    (clinic,) = [c for c in clinic_mod._CLINICS.values() if c.cfg == cfg]
    assert [p.requires_grad for p in clinic.model.parameters()] == \
        [p.requires_grad for p in model.parameters()]
    assert personal_keys(clinic.model) == personal_keys(model)


def test_shared_local_model_travels_whole_and_scores_the_same_elsewhere(tiny_manifest):
    """share_local_models under FedBN, scope all: the personalised model leaves with its own
    BatchNorm (more than the exchanged keys), and scored by another clinic on the same images
    it gives the same loss its own clinic reported; the reply to the 'shared' phase is scalars
    only. A clinic whose node config says share-local-model=false keeps its model."""
    cfg = _cfg(local_bn=True, personalize={"steps": 4, "scope": "all"},
               cross_site={"enabled": True, "share_local_models": True})
    model = build_global_model(cfg)
    own = client_app(_msg(cfg, {"arrays": model_arrays(model)}, "own"), _ctx(tiny_manifest))
    metrics = _scalars_only(own)
    assert set(own.content.array_records) == {LOCAL_MODEL_KEY}
    local = own.content[LOCAL_MODEL_KEY]
    assert set(local) == set(personal_keys(model)) > set(exchanged_keys(model))
    assert any("bn" in k for k in set(local) - set(exchanged_keys(model)))

    other = client_app(_msg(cfg, {"personalised-0": local}, "shared"), _ctx(tiny_manifest))
    scored = _scalars_only(other)
    assert not other.content.array_records
    assert set(scored) == {f"personalised-0/{k}" for k in SCALAR_KEYS} | {"num-examples"}
    assert scored["personalised-0/val_loss"] == pytest.approx(metrics["personalised/val_loss"],
                                                              rel=1e-5)

    kept = client_app(_msg(cfg, {"arrays": model_arrays(model)}, "own"),
                      _ctx(tiny_manifest, **{"share-local-model": "false"}))
    assert not kept.content.array_records and "personalised/val_loss" in _scalars_only(kept)


class _FakeGrid:
    """Two clinics (node ids 7 and 9) answering the cross-site phases with canned scalars;
    records what the coordinator sends."""

    def __init__(self, with_models: bool):
        self.with_models, self.sent = with_models, []

    def get_node_ids(self):
        return [9, 7]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, m in enumerate(messages):
            m.metadata.__dict__["_message_id"] = f"m{len(self.sent) + i}"
            node = m.metadata.dst_node_id
            phase = m.content["config"][CROSS_SITE_KEY]
            base = 0.6 if node == 7 else 0.8
            content = RecordDict()
            if phase == "own":
                values = {"global/val_macro_auc": base, "global/val_loss": 1.0,
                          "personalised/val_macro_auc": base + 0.1,
                          "personalised/val_loss": 0.5}
                if self.with_models:
                    content[LOCAL_MODEL_KEY] = ArrayRecord(
                        {k: Array(np.zeros(a.shape, np.float32))
                         for k, a in m.content["arrays"].items()} | self.extra)
            else:
                values = {f"{name}/val_macro_auc": base - 0.2
                          for name in m.content.array_records}
            content["metrics"] = MetricRecord({**values, "num-examples": 5})
            reply = Message(content=content, reply_to=m)
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        self.sent += messages
        return replies


@pytest.mark.parametrize("share", [False, True])
def test_cross_site_matrix_has_a_row_per_model_and_a_column_per_clinic(share):
    cfg = _cfg(rounds=2, personalize={"steps": 2},
               cross_site={"enabled": True, "share_local_models": share})
    model = build_global_model(cfg)
    grid = _FakeGrid(with_models=True)  # even when sharing is off, a clinic sends a model
    state = model.state_dict()
    grid.extra = {k: Array(state[k].numpy()) for k in personal_keys(model)
                  if k not in exchanged_keys(model)}
    index = {7: 0, 9: 1}  # the anonymous indices of the round loop
    cs = cross_site_evaluation(grid, lambda n, _token: index[n], cfg, model_arrays(model),
                               model)
    assert cs["clinics"] == [0, 1]
    assert cs["models"] == ["global", "personalised-0", "personalised-1"]
    assert all(set(row) == {"0", "1"} for row in cs["matrix"].values())
    assert cs["matrix"]["global"] == {"0": 0.6, "1": 0.8}
    g = cs["summary"]["global"]
    assert g["mean"] == pytest.approx(0.7) and g["worst"] == 0.6 and g["worst_clinic"] == 0
    assert cs["personalisation"]["per_clinic"]["0"]["change"] == pytest.approx(0.1)
    forwarded = [m for m in grid.sent if m.content["config"][CROSS_SITE_KEY] == "shared"]
    if share:  # clinic 0's model scored at clinic 1 and vice versa, never sent back to itself
        assert cs["matrix"]["personalised-0"] == {"0": pytest.approx(0.7),
                                                  "1": pytest.approx(0.6)}
        assert {m.metadata.dst_node_id: sorted(m.content.array_records) for m in forwarded} \
            == {7: ["personalised-1"], 9: ["personalised-0"]}
        assert cs["summary"]["personalised-1"]["worst_clinic"] == 0
    else:  # the coordinator neither uses nor forwards a model it did not ask for
        assert not forwarded and cs["local_models_shared"] == []
        assert cs["matrix"]["personalised-0"] == {"0": pytest.approx(0.7), "1": None}
        assert set(cs["local_models_rejected"]) == {"0", "1"}
    report = " ".join(cross_site_markdown(cs).split())
    assert "| global (final) | 0.600 | 0.800 | 0.700 | 0.600 (0) |" in report
    assert ("| clinic 0 personalised | 0.700 | 0.600 | 0.650 | 0.600 (1) |" if share else
            "| clinic 0 personalised | 0.700 | - | 0.700 | 0.700 (0) |") in report


def test_cross_site_config_rules():
    with pytest.raises(ConfigError, match="share_local_models needs"):
        _cfg(cross_site={"enabled": True, "share_local_models": True})
    raw = tiny_config().model_dump(mode="json")
    raw["federation"] = {"personalize": {"steps": 2}}
    raw["privacy"] = {"dp_sgd": {"noise_multiplier": 1.0}}
    with pytest.raises(ConfigError, match="personalize cannot be combined"):
        config_from_dict(raw)


@pytest.mark.slow  # real Flower simulation (the suite's one plain `dentfed simulate` run)
def test_real_simulation_two_clinics_int8_cross_site_and_audited_replies(tmp_path):
    """One real 2-clinic, 2-round Flower simulation through the CLI checks (one engine start
    instead of two): the run folder and history; int8 uploads of the trainable arrays only;
    the cross-site matrix with personalised models; and (issue 13) each clinic's optimiser
    state persisting across rounds in its own state (mirrored to its state folder), never in
    a message."""
    cfg_path, manifest = two_clinic_simulation(
        tmp_path, rounds=2, local_steps=2, personalize={"steps": 3, "scope": "all"},
        cross_site={"enabled": True, "share_local_models": True}, keep_optimizer_state=True,
        upload="int8")
    out, audit = tmp_path / "run", tmp_path / "audit"
    env = {**os.environ, "DENTFED_AUDIT_DIR": str(audit)}
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                        str(cfg_path), "--manifest", str(manifest), "--out", str(out)],
                       capture_output=True, text=True, timeout=540, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "macro_auc over rounds" in r.stdout
    data = json.loads((out / "metrics.json").read_text())
    assert [h["round"] for h in data["history"]] == [0, 1, 2]
    assert data["clinics"] == 2 and "macro_auc" in data["final"]
    cfg = yaml.safe_load(cfg_path.read_text())
    shapes = expected_shapes(build_global_model(config_from_dict(cfg)))
    int8_bytes = sum(int(np.prod(s)) for s in shapes.values()) + 4 * len(shapes)  # + scales
    for h in data["history"][1:]:
        assert h["clinics_replied"] == 2 and not h["clinics_rejected"]
        assert set(h["clinics_train"]["per_clinic"]) == {"0", "1"}
        assert h["bytes_received"] == 2 * int8_bytes  # int8 deltas; frozen stages never sent
    assert data["upload_bytes_per_clinic_round"] < data["full_model_bytes"]
    for name in ("config.yaml", "model_best.pt", "model_final.pt", "rounds.png", "report.md",
                 "flower.log", "split/server_test.csv", "split/clinic_1/manifest.csv",
                 "model_card.json", "model_card.md"):
        assert (out / name).is_file(), name
    assert torch.load(out / "model_final.pt", weights_only=False)["labels"] == [
        "bright", "stripe"]
    assert not (left := _pids_with_flwr_home_under(tmp_path)), describe_pids(left)
    cs = data["cross_site"]
    assert cs["clinics"] == [0, 1] and cs["failed_replies"] == 0
    assert cs["models"] == ["global", "personalised-0", "personalised-1"]
    assert all(v is not None for row in cs["loss"].values() for v in row.values())
    assert cs["local_models_shared"] == [0, 1]
    assert "## Cross-site evaluation" in (out / "report.md").read_text()
    model = build_global_model(config_from_dict(yaml.safe_load(cfg_path.read_text())))
    sent = [json.loads(p.read_text()) for p in audit.glob("*.json")]
    train = [e for e in sent if e["message_type"] == "train"]
    assert len(train) == 2 * 2
    for e in train:  # the model's trainable arrays and scalars, never the optimiser state
        assert "error" not in e
        arrays = [n for n, rec in e["records"].items() if rec["kind"] == "arrays"]
        assert sorted(arrays) == ["arrays", SCALES_KEY]
        assert not any("momentum" in k or "exp_avg" in k
                       for rec in e["records"].values() for k in rec.get("arrays", {}))
    for k in (0, 1):  # the clinic's own disk: its optimiser moments after each round
        state = out / "split" / f"clinic_{k}" / "state"
        r1, r2 = (torch.load(state / f"after_round_{r}.pt") for r in (1, 2))
        (opt_key,) = [key for key in r1 if "optimizer" in key]
        assert any(not torch.equal(r1[opt_key][n], r2[opt_key][n]) for n in r1[opt_key])
    evaluate = [e for e in sent if e["message_type"] == "evaluate"]
    assert len(evaluate) == 2 * 2 + 2 + 2  # rounds 1-2, then the "own" and "shared" phases
    tokens = {(out / "split" / f"clinic_{k}" / "state" / CLINIC_TOKEN_FILE).read_text().strip()
              for k in (0, 1)}
    assert len(tokens) == 2
    for e in evaluate:
        assert "error" not in e
        for name, rec in e["records"].items():
            if rec["kind"] == "arrays":  # only the shared personalised model, whole
                assert name == LOCAL_MODEL_KEY and set(rec["arrays"]) == set(personal_keys(model))
            elif rec["kind"] == "config":  # the clinic's random token, nothing else
                assert name == CLINIC_RECORD and set(rec["values"]) == {CLINIC_TOKEN_KEY}
                assert rec["values"][CLINIC_TOKEN_KEY].strip("'") in tokens
            else:
                assert rec["kind"] == "metrics"
                assert all(isinstance(v, int | float) for v in rec["values"].values())
    assert sum(LOCAL_MODEL_KEY in e["records"] for e in evaluate) == 2
    assert all(CLINIC_RECORD in e["records"] for e in sent)  # every reply: train, evaluate
    # The coordinator keeps the tokens in its checkpoint only: not in the report, metrics,
    # model card, its log or what it printed.
    for path in [p for p in out.rglob("*") if p.is_file() and "split" not in p.parts
                 and p.name != "checkpoint.pt"]:
        assert not [t for t in tokens if t.encode() in path.read_bytes()], path
    assert not [t for t in tokens if t in r.stdout + r.stderr]



def test_clinic_start_can_keep_its_local_model(tmp_path):
    """`dentfed clinic start --no-share-local-model` puts the node-config key the ClientApp
    reads (test above: share-local-model=false keeps the model) into Flower's node config."""
    from flwr.common.config import parse_config_args

    from dentfed import deploy

    ca, key, manifest = (tmp_path / n for n in ("ca.crt", "clinic_0", "my data.csv"))
    for p in (ca, key, manifest):
        p.write_text("x")

    def node_config(**kw) -> dict:
        cmd = deploy.supernode_command("fed.example.org:9092", ca, key, manifest, **kw)
        return parse_config_args([cmd[cmd.index("--node-config") + 1]])

    assert node_config() == {"manifest": str(manifest)}
    assert node_config(share_local_model=False) == {"manifest": str(manifest),
                                                    "share-local-model": "false"}
