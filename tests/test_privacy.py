"""DP-SGD: config, Opacus-compatible models, accounting across rounds in the clinic's persistent
state and across a resumed federation in its ledger, the max_epsilon refusal, pooled training,
and a real 2-clinic simulation whose every clinic message is audited (only trainable float
arrays and known scalar metrics leave a clinic; no patient id or path reaches the run folder or
the logs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from flwr.app import Context, Message, RecordDict
from torch import nn

from client.app import app as client_app
from client.clinic import CLINIC_TOKEN_FILE, DP_ACCOUNT_KEY
from shared.config import config_from_dict
from shared.dp_sgd import (
    DECLINED_BUDGET,
    DECLINED_EPSILON,
    DECLINED_RECORD,
    DpAccount,
    declined_reason,
    noise_for,
)
from shared.errors import ConfigError
from shared.fedio import (
    CLINIC_RECORD,
    CLINIC_TOKEN_KEY,
    build_global_model,
    expected_shapes,
    model_arrays,
)
from tests.conftest import tiny_config, write_tiny_multilabel
from tests.test_federation import _task_identity, _train_message, two_clinic_simulation

__all__ = ["_task_identity"]  # the autouse fixture: messages need a run/node identity

DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3}


def _dp_config(dp: dict | None = None, **fed):
    cfg = tiny_config().model_dump(mode="json")
    cfg["model"]["freeze"] = 5  # only the head trains: per-sample gradients stay cheap on CPU
    cfg["federation"] = {"local_epochs": 1, **fed}
    cfg["privacy"] = {"dp_sgd": dp or DP}
    return config_from_dict(cfg)


def test_config_needs_one_noise_source_and_refuses_what_cannot_be_clipped():
    base = tiny_config().model_dump(mode="json")
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        config_from_dict({**base, "privacy": {"dp_sgd": {"max_grad_norm": 1.0}}})
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_dict({**base, "privacy": {"dp_sgd": {"noise_multiplier": 1.0,
                                                         "target_epsilon": 3.0}}})
    dice = {**base, "train": {**base["train"], "loss": "dice"}}
    with pytest.raises(ConfigError, match="train.loss 'dice' cannot be used with privacy.dp_sgd"):
        config_from_dict({**dice, "privacy": {"dp_sgd": DP}})
    with pytest.raises(ConfigError, match="fedprox is not supported"):
        config_from_dict({**base, "federation": {"strategy": "fedprox"},
                          "privacy": {"dp_sgd": DP}})


def test_factory_makes_resnet_and_vit_opacus_compatible():
    """Trainable BatchNorm becomes GroupNorm; frozen BatchNorm (eval mode, fixed statistics,
    per sample) is kept so frozen pretrained stages are unchanged."""
    from opacus.validators import ModuleValidator

    raw = _dp_config().model_dump(mode="json")
    raw["model"]["freeze"] = 3  # stem, layer1, layer2 frozen
    model = build_global_model(config_from_dict(raw))
    bn = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    gn = [n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert bn and all(n.startswith(("bn1", "layer1", "layer2")) for n in bn)
    assert gn and all(n.startswith(("layer3", "layer4")) for n in gn)
    assert ModuleValidator.validate(model, strict=False) == []
    # what is exchanged has no BatchNorm statistics left to average
    assert not any(k.endswith("running_var") for k in expected_shapes(model))
    plain = build_global_model(config_from_dict({**raw, "privacy": {}}))
    assert set(expected_shapes(plain)) - set(expected_shapes(model)) == {
        k for k in expected_shapes(plain) if "running" in k}
    assert set(model_arrays(_dp_ready()).keys()) == {"fc.weight", "fc.bias"}
    vit_cfg = dict(raw)
    vit_cfg["model"] = {"name": "vit", "vit": {"size": "tiny", "patch_size": 8, "depth": 1}}
    vit = build_global_model(config_from_dict(vit_cfg))
    assert type(vit).__name__ == "VisionTransformer"  # attention swapped for DPMultiheadAttention
    assert "DPMultiheadAttention" in {type(m).__name__ for m in vit.modules()}
    assert ModuleValidator.validate(vit, strict=False) == []


def _dp_ready():
    return build_global_model(_dp_config())


def test_account_composes_and_target_epsilon_calibrates():
    acc = DpAccount().plus(1.0, 0.25, 4)
    more = acc.plus(1.0, 0.25, 4)
    assert 0 < acc.epsilon(1e-5) < more.epsilon(1e-5)
    assert DpAccount.from_record(more.to_record()) == more
    dp = _dp_config({"target_epsilon": 3.0, "delta": 1e-5}).privacy.dp_sgd
    sigma = noise_for(dp, 0.1, 50)
    eps = DpAccount([(sigma, 0.1, 50)]).epsilon(1e-5)
    assert 2.8 < eps <= 3.0 + 1e-6


def test_clinic_accounts_epsilon_across_rounds_and_declines_at_its_budget(tiny_manifest):
    """Same Context across calls, as a SuperNode keeps it: epsilon grows round by round; the
    call that would pass max_epsilon refuses before training and leaves the account as is."""
    cfg = _dp_config({**DP, "max_epsilon": 5.0})
    start = model_arrays(build_global_model(cfg))
    ctx = Context(run_id=1, node_id=1, node_config={"manifest": str(tiny_manifest)},
                  state=RecordDict(), run_config={})
    eps = []
    for _ in range(3):
        reply = client_app(_train_message(cfg, start), ctx)
        assert not reply.has_error(), reply.error
        declined = declined_reason(reply)  # a structured record, not an error text
        if declined is not None:
            assert not reply.content.array_records  # no update with a decline
            assert reply.content.config_records[DECLINED_RECORD][DECLINED_BUDGET] is True
            break
        # the cached model is left in eval mode by evaluation between rounds
        client_app(_eval_message(cfg, start), ctx)
        (metrics,) = reply.content.metric_records.values()
        assert set(metrics) == {"train_seconds", "num-examples", "epsilon"}
        eps.append(metrics["epsilon"])
    else:
        pytest.fail(f"the clinic never reached max_epsilon 6: {eps}")
    assert len(eps) >= 1 and all(b > a for a, b in zip(eps, eps[1:], strict=False))
    assert "privacy budget" in declined and "max_epsilon 5" in declined
    assert len(eps) == 2  # 3 steps a round at q=1/3: eps 3.47, 4.71, then 5.69 > 5
    kept = DpAccount.from_record(ctx.state.config_records[DP_ACCOUNT_KEY])
    assert kept.epsilon(DP["delta"]) == pytest.approx(eps[-1])


def _eval_message(cfg, arrays):
    msg = _train_message(cfg, arrays)
    return Message(msg.content, dst_node_id=1, message_type="evaluate")


def test_pooled_training_reports_epsilon_and_stops_at_budget(tmp_path, tiny_manifest):
    from simulations.pooled_training import run_training

    raw = _dp_config({"target_epsilon": 4.0, "delta": 1e-3}).model_dump(mode="json")
    raw["train"]["epochs"] = 2
    res = run_training(config_from_dict(raw), tiny_manifest, tmp_path / "run")
    eps = [row["epsilon"] for row in res["history"]]
    assert eps[0] < eps[1] <= 4.0 + 1e-6 and res["privacy"]["epsilon"] == eps[-1]
    assert "DP-SGD (Opacus): epsilon" in (tmp_path / "run" / "report.md").read_text()
    # a single epoch spends more than 1 here (a few steps at q >= 1/3, noise 1): nothing trains
    assert DpAccount([(1.0, 1 / 3, 3)]).epsilon(DP["delta"]) > 1.0
    raw["privacy"]["dp_sgd"] = {**DP, "max_epsilon": 1.0}
    res = run_training(config_from_dict(raw), tiny_manifest, tmp_path / "run2")
    assert res["history"] == [] and res["privacy"]["epsilon"] == 0.0
    assert "above max_epsilon 1" in res["privacy"]["budget_stop"]


def _distinctive_manifest(root: Path) -> tuple[Path, list[str]]:
    """The tiny set with patient ids and file names that cannot occur by chance in a file."""
    manifest = write_tiny_multilabel(root, n=64)
    df = pd.read_csv(manifest)
    secrets = []
    for i, row in df.iterrows():
        new = f"img/JaneDoe-{i:03d}-scan.png"
        (root / row["path"]).rename(root / new)
        df.loc[i, "path"] = new
        secrets.append(new)
    df["patient_id"] = [f"PAT-7731-{pid}" for pid in df["patient_id"]]
    secrets += list(df["patient_id"].unique())
    df.to_csv(manifest, index=False)
    return manifest, secrets


@pytest.mark.slow  # real Flower simulation
def test_real_simulation_audit_dp_epsilon_per_round_and_budget(tmp_path):
    """3 rounds, 2 clinics; each clinic's epsilon must grow from round to round (the account
    survives in Flower's context.state between rounds), and max_epsilon lets each clinic train
    exactly twice: round 3 is declined by both and the server reports it."""
    cfg_path, _ = two_clinic_simulation(tmp_path, rounds=3, local_steps=2)
    manifest, secrets = _distinctive_manifest(tmp_path / "secret")
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["freeze"] = 5
    two = DpAccount().plus(1.0, 0.5, 4).epsilon(DP["delta"])
    cfg["privacy"] = {"dp_sgd": {**DP, "max_epsilon": round(two * 1.05, 3)}}
    cfg_path.write_text(yaml.safe_dump(cfg))
    out, audit = tmp_path / "run", tmp_path / "audit"
    env = {**os.environ, "DENTFED_AUDIT_DIR": str(audit)}
    env.pop("MLFLOW_TRACKING_URI")  # the default tracking store, beside the run folder
    r = subprocess.run([sys.executable, "-m", "dentfed.cli", "simulate", "--config",
                        str(cfg_path), "--manifest", str(manifest), "--out", str(out)],
                       capture_output=True, text=True, timeout=540, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads((out / "metrics.json").read_text())
    priv = data["privacy"]
    per_round = priv["epsilon_per_round"]
    assert set(per_round) == {"1", "2"}, priv
    for clinic in ("0", "1"):
        assert per_round["2"][clinic] > per_round["1"][clinic] > 0  # composed, not reset
    assert set(priv["declined"]["3"]) == {"0", "1"}
    assert "privacy budget" in priv["declined"]["3"]["0"]
    assert priv["epsilon_max"] == max(per_round["2"].values()) <= priv["max_epsilon"]
    report = (out / "report.md").read_text()
    assert "## Privacy (DP-SGD per clinic)" in report and "declined" in report

    # Audit: every reply any clinic sent in the run.
    model = build_global_model(config_from_dict(cfg))
    shapes = {k: list(v) for k, v in expected_shapes(model).items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    entries = [json.loads(p.read_text()) for p in audit.glob("*.json")]
    kinds = [e["message_type"] for e in entries]
    assert kinds.count("train") == 6 and kinds.count("evaluate") == 6, kinds
    known = {"train": {"train_seconds", "num-examples", "epsilon"},
             "evaluate": {"val_loss", "val_macro_auc", "evaluate_seconds", "num-examples"}}
    declines = 0
    tokens = [(out / "split" / f"clinic_{k}" / "state" / CLINIC_TOKEN_FILE).read_text().strip()
              for k in (0, 1)]
    for e in entries:
        assert "error" not in e, e
        # every reply carries the clinic's random token (config record), and nothing else
        token = e["records"].pop(CLINIC_RECORD)
        assert token["kind"] == "config" and set(token["values"]) == {CLINIC_TOKEN_KEY}, e
        assert token["values"][CLINIC_TOKEN_KEY].strip("'") in tokens, e
        if DECLINED_RECORD in e["records"]:  # the budget refusals: a flag and numbers only
            assert e["message_type"] == "train" and set(e["records"]) == {DECLINED_RECORD}, e
            values = e["records"][DECLINED_RECORD]["values"]
            assert set(values) == {DECLINED_BUDGET, "detail", DECLINED_EPSILON}, e
            assert "privacy budget" in values["detail"], e
            assert 0 < float(values[DECLINED_EPSILON]) <= priv["max_epsilon"], e  # repr
            declines += 1
            continue
        for name, rec in e["records"].items():
            assert rec["kind"] in ("arrays", "metrics"), (name, rec)  # no config records
            if rec["kind"] == "arrays":
                assert name == "arrays"
                assert set(rec["arrays"]) == set(shapes) == trainable
                assert all(a["dtype"] == "float32" and a["shape"] == shapes[k]
                           for k, a in rec["arrays"].items())
            else:
                assert set(rec["values"]) <= known[e["message_type"]], rec
                assert all(isinstance(v, int | float) for v in rec["values"].values())
    assert declines == 2  # round 3, both clinics
    # No patient id or image path from any clinic's manifest in what the server wrote or
    # logged (split/ is the simulation's own partition of the researcher's data, not the
    # server's: it is left out).
    # Nor the clinics' tokens, but in the coordinator's checkpoint (docs/privacy.md).
    clinic_paths = [str((tmp_path / "secret" / s).resolve()) for s in secrets if "/" in s]
    for path in [p for p in out.rglob("*") if p.is_file() and "split" not in p.parts]:
        blob = path.read_bytes()
        for s in secrets + clinic_paths + (tokens if path.name != "checkpoint.pt" else []):
            assert s.encode() not in blob, (s, path)
    for s in secrets + tokens:
        assert s not in r.stdout and s not in r.stderr
    assert np.isfinite(data["final"]["macro_auc"])

    # The MLflow run the ServerApp logged beside the run folder: per-round metrics with the
    # round as step, per-clinic ones by anonymous index, the report and the model; and the
    # whole tracking store is as free of patient ids and paths as the run folder.
    from mlflow.tracking import MlflowClient

    from tests.test_tracking import audit_tracking_store

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("dentfed").experiment_id])
    assert run.data.tags["dentfed.kind"] == "simulate" and run.info.status == "FINISHED"
    assert run.data.params["privacy.dp_sgd.max_epsilon"] == str(cfg["privacy"]["dp_sgd"]
                                                                ["max_epsilon"])
    assert run.data.params["federation.test_manifest"] == "<path>"
    hist = client.get_metric_history(run.info.run_id, "central/macro_auc")
    assert [m.step for m in hist] == [0, 1, 2, 3]
    assert [m.value for m in hist] == [h["server"]["macro_auc"] for h in data["history"]]
    assert [m.step for m in client.get_metric_history(run.info.run_id,
                                                      "clinic/1/epsilon")] == [1, 2]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "metrics.json", "model_card.md", "plots", "model"} <= arts
    audit_tracking_store(tmp_path, secrets + clinic_paths + [str(tmp_path / "secret")] + tokens)


# --- Resuming a DP-SGD federation: each clinic's ledger in its state folder -----------------


class _KilledCoordinator:
    """An in-process grid whose coordinator dies at its `crash_at`-th training exchange:
    before sending it, or (`after_replies`) once the clinics have trained and replied, so
    their updates were released but the round never reached the checkpoint."""

    def __init__(self, grid, crash_at: int, after_replies: bool = False):
        self.grid, self.crash_at, self.after_replies, self.trains = grid, crash_at, \
            after_replies, 0

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        crash = messages and messages[0].metadata.message_type.startswith("train") and \
            self.trains + 1 == self.crash_at
        if messages and messages[0].metadata.message_type.startswith("train"):
            self.trains += 1
        if crash and not self.after_replies:
            raise KeyboardInterrupt("coordinator killed")
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        if crash:
            raise KeyboardInterrupt("coordinator killed after the clinics replied")
        return replies


def _dp_federation(tmp_path: Path, rounds: int, dp: dict | None = None):
    """A 2-clinic DP-SGD federation's config and split (2 DP-SGD steps a clinic a round)."""
    from simulations.simulate import prepare_split

    manifest = write_tiny_multilabel(tmp_path / "data", n=64)
    raw = _dp_config(dp, rounds=rounds, local_steps=2).model_dump(mode="json")
    raw["data"]["image_size"] = 16  # what the run does, not what it learns: a quick run
    raw["split"] = {"clinics": 2, "scheme": "iid", "test_fraction": 0.25}
    cfg = config_from_dict(raw)
    prepare_split(cfg, manifest, tmp_path / "split")
    return cfg, tmp_path / "split"


def _grid(split: Path, resume: bool = False, first_node: int = 1):
    """The clinics of one Flower run (empty context.state), in process; a resumed federation
    is a new Flower run whose run config says `resume` (and whose nodes a real SuperLink
    numbers anew: `first_node`)."""
    from simulations.bench_quality import InProcessGrid

    return InProcessGrid(split, 2, threads=1, resume=resume, first_node=first_node)


def _federate(cfg, split: Path, grid, resume: bool = False):
    from server.federation import run_federation

    return run_federation(grid, cfg, split / "server_test.csv", run_dir=split.parent / "run",
                          resume=resume)


def _ledger(split: Path, clinic: int) -> dict:
    from client.clinic import DP_LEDGER

    return json.loads((split / f"clinic_{clinic}" / "state" / DP_LEDGER).read_text())


def test_resumed_dp_federation_continues_each_clinics_ledger(tmp_path, caplog):
    """2 rounds, the coordinator killed before round 2, resumed by a new Flower run (empty
    context.state, new node ids): each clinic's round-2 epsilon composes round 1's steps from
    its ledger, it does not start again at 0; and each clinic keeps its anonymous index in the
    report (its random token, from its state folder, ties the index to it, not its node id),
    while the token itself reaches neither the report nor the logs."""
    import logging

    import torch

    from server.privacy_report import privacy_summary
    from server.run_folder import write_run_folder
    from shared.fedio import is_clinic_token

    caplog.set_level(logging.DEBUG)
    cfg, split = _dp_federation(tmp_path, rounds=2)
    with pytest.raises(KeyboardInterrupt):
        _federate(cfg, split, _KilledCoordinator(_grid(split), crash_at=2))
    tokens = [(split / f"clinic_{k}" / "state" / CLINIC_TOKEN_FILE).read_text().strip()
              for k in (0, 1)]
    assert all(is_clinic_token(t) for t in tokens) and tokens[0] != tokens[1]
    res = _federate(cfg, split, _grid(split, resume=True, first_node=101), resume=True)
    assert [(split / f"clinic_{k}" / "state" / CLINIC_TOKEN_FILE).read_text().strip()
            for k in (0, 1)] == tokens  # kept across the resume
    # clinic k (partition k) is index k in round 1 (first run, nodes 1-2) and in round 2
    # (resumed run, nodes 101-102): two clinics, not four
    assert res.recorder.n_clinics == 2
    assert set(res.recorder.rounds[1].train) == set(res.recorder.rounds[2].train) == {0, 1}
    priv = privacy_summary(cfg, res.recorder.rounds)
    for k in ("0", "1"):  # the same clinic spends more, whatever run it is in
        assert priv["epsilon_per_round"]["2"][k] > priv["epsilon_per_round"]["1"][k] > 0, priv
    for k in (0, 1):
        ledger = _ledger(split, k)
        assert [(r["round"], r["steps"]) for r in ledger["releases"]] == [(1, 2), (2, 2)]
        assert ledger["steps"] == 4
        account = DpAccount.from_state_dict(ledger["history"])
        assert account.steps == 4
        assert ledger["releases"][0]["epsilon"] == pytest.approx(
            priv["epsilon_per_round"]["1"][str(k)])
        assert ledger["epsilon"] == pytest.approx(account.epsilon(DP["delta"])) == \
            pytest.approx(priv["epsilon_per_round"]["2"][str(k)]) == \
            pytest.approx(priv["epsilon_per_clinic"][str(k)])
        (_, q, _), = {tuple(h) for h in account.history}
        assert ledger["epsilon"] == pytest.approx(DpAccount([(1.0, q, 4)]).epsilon(
            DP["delta"]))
    data = write_run_folder(res, split.parent / "run")
    assert data["clinics"] == 2
    report = (split.parent / "run" / "report.md").read_text()
    assert "| clinic 1 |" in report and "clinic 2" not in report
    # the tokens: in the coordinator's checkpoint (its own file), nowhere else it writes
    ck = torch.load(split.parent / "run" / "checkpoint.pt", weights_only=True)
    assert sorted(json.loads(ck["recorder"])["tokens"]) == sorted([t, k] for k, t in
                                                                  enumerate(tokens))
    written = [p for p in (split.parent / "run").rglob("*")
               if p.is_file() and p.name != "checkpoint.pt"]
    assert any(p.name == "report.md" for p in written)
    for t in tokens:
        assert t not in caplog.text
        assert not [p for p in written if t.encode() in p.read_bytes()]


def test_dp_ledger_keeps_a_released_round_the_checkpoint_lost_and_max_epsilon_holds(tmp_path):
    """The coordinator dies after the clinics replied in round 2 (checkpoint at round 1).
    Their round-2 updates were released, so the ledger keeps those steps; max_epsilon allows
    exactly two rounds, so the resumed round 2 (a third release) and round 3 are declined, and
    the report shows the epsilon each clinic really spent."""
    from server.privacy_report import privacy_summary

    probe_cfg, split = _dp_federation(tmp_path, rounds=3)
    q = 1 / len(clinic_train_loader(probe_cfg, split))
    two = DpAccount([(1.0, q, 4)]).epsilon(DP["delta"])
    three = DpAccount([(1.0, q, 6)]).epsilon(DP["delta"])
    cap = round((two + three) / 2, 4)
    raw = probe_cfg.model_dump(mode="json")
    raw["privacy"]["dp_sgd"]["max_epsilon"] = cap
    cfg = config_from_dict(raw)
    with pytest.raises(KeyboardInterrupt):
        _federate(cfg, split, _KilledCoordinator(_grid(split), crash_at=2, after_replies=True))
    res = _federate(cfg, split, _grid(split, resume=True), resume=True)
    priv = privacy_summary(cfg, res.recorder.rounds)
    assert set(priv["declined"]) == {"2", "3"}, priv
    assert set(priv["epsilon_per_round"]) == {"1"}  # round 2's first replies died with it
    assert set(priv["declined"]["2"]) == {"0", "1"}
    for k in (0, 1):
        ledger = _ledger(split, k)  # never rolled back to the checkpoint's round 1
        assert [r["round"] for r in ledger["releases"]] == [1, 2] and ledger["steps"] == 4
        assert ledger["epsilon"] == pytest.approx(two)
        assert priv["epsilon_per_clinic"][str(k)] == pytest.approx(two) and two < cap
        assert f"max_epsilon {cap:g}" in priv["declined"]["2"][str(k)]
    assert priv["epsilon_max"] == pytest.approx(two)


def clinic_train_loader(cfg, split: Path):
    """Clinic 0's training loader as its ClientApp builds it (for its sampling rate)."""
    from client.clinic import get_clinic

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
                  run_config={"split-dir": str(split)})
    return get_clinic(ctx, cfg).train_loader


def test_clinic_without_state_folder_declines_a_resumed_dp_federation(tiny_manifest, tmp_path):
    """A clinic whose DP-SGD account lives only in the Flower run (no state folder, or one
    per Flower run) cannot continue it in a resumed federation: it declines, loudly and
    without an update, instead of counting from epsilon 0. With its state folder for the
    federation it continues from its ledger."""
    from shared.fedio import FEDERATION_ID_KEY, RESUME_KEY

    cfg = _dp_config()
    start = model_arrays(build_global_model(cfg))

    def ctx(run_id: int, resume: bool, state_dir: Path | None = None, fid: str = ""):
        node = {"manifest": str(tiny_manifest)}
        if state_dir is not None:
            node["state-dir"] = str(state_dir)
        run = {RESUME_KEY: resume, **({FEDERATION_ID_KEY: fid} if fid else {})}
        return Context(run_id=run_id, node_id=1, node_config=node, state=RecordDict(),
                       run_config=run)

    for resumed in (ctx(2, True), ctx(2, True, tmp_path / "per-run")):
        reply = client_app(_train_message(cfg, start), resumed)
        assert not reply.has_error(), reply.error
        assert not reply.content.array_records
        assert "privacy budget" in declined_reason(reply)
        assert "declining to train rather than count from epsilon 0" in declined_reason(reply)
        assert DP_ACCOUNT_KEY not in resumed.state.config_records
    # today's behaviour without a state folder when not resumed: context.state only
    plain = ctx(1, False)
    reply = client_app(_train_message(cfg, start), plain)
    assert declined_reason(reply) is None and DP_ACCOUNT_KEY in plain.state.config_records
    # a state folder for the federation: round 1, then a resumed run continues the ledger
    first = ctx(1, False, tmp_path / "state", fid="fed1")
    (m1,) = client_app(_train_message(cfg, start), first).content.metric_records.values()
    assert (tmp_path / "state" / "fed1" / "dp_account.json").is_file()
    again = ctx(2, True, tmp_path / "state", fid="fed1")
    (m2,) = client_app(_train_message(cfg, start), again).content.metric_records.values()
    assert m2["epsilon"] > m1["epsilon"] > 0
