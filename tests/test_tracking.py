"""MLflow tracking: a finished run read back through MLflow's client API, with no patient id
or data path in anything logged. The simulation's tracking store is audited in
test_privacy's real-simulation audit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.tracking import (
    REDACTED,
    flat_params,
    log_run_folder,
    redact_paths,
    round_metrics,
    tracking_uri,
)
from shared.config import config_from_dict, with_overrides
from shared.model_file import read_model_file
from tests.conftest import tiny_config
from tests.test_privacy import _distinctive_manifest


def test_paths_are_redacted_from_params():
    cfg = config_from_dict({**tiny_config().model_dump(mode="json"),
                            "tracking": {"uri": "sqlite:////srv/mlflow.db"}})
    cfg = with_overrides(cfg, {"data.manifest": "/clinics/dr-smith/manifest.csv",
                               "federation.test_manifest": "held_out.csv"})
    params = flat_params(cfg)
    assert params["data.manifest"] == params["federation.test_manifest"] == REDACTED
    assert params["tracking.uri"] == REDACTED
    assert params["train.lr"] == "0.001" and params["task.labels"] == '["bright", "stripe"]'
    assert "model.pretrained" not in params  # unset values are left out
    assert redact_paths({"a": ["x", "C:\\data\\p.png", 3]}) == {"a": ["x", REDACTED, 3]}


def test_tracking_uri_config_then_environment_then_local_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config()
    assert tracking_uri(cfg, tmp_path / "runs" / "r1") == \
        f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000")
    assert tracking_uri(cfg, tmp_path / "r") == "http://mlflow.lab:5000"
    cfg = with_overrides(cfg, {"tracking.uri": "http://other:5000"})
    assert tracking_uri(cfg, tmp_path / "r") == "http://other:5000"


def test_round_metrics_name_central_aggregated_and_per_clinic_values():
    row = {"round": 2, "server": {"loss": 0.5, "auc": {"bright": 0.9, "stripe": float("nan")}},
           "clinics_train": {"aggregated": {"train_loss": 0.4},
                             "per_clinic": {"1": {"train_loss": 0.3, "num-examples": 10}}},
           "clinics_evaluate": {"aggregated": {"val_loss": 0.6}, "per_clinic": {}},
           "clinics_sampled": 2, "clinics_rejected": {"0": "shape"}, "bytes_received": 123}
    assert round_metrics(row) == {
        "central/loss": 0.5, "central/auc/bright": 0.9, "clinics/train_loss": 0.4,
        "clinic/1/train_loss": 0.3, "clinic/1/num-examples": 10.0, "clinics/val_loss": 0.6,
        "round/clinics_sampled": 2.0, "round/bytes_received": 123.0,
        "round/clinics_rejected": 1.0, "round/clinics_declined": 0.0}  # NaN left out


def test_pooled_run_is_read_back_through_mlflow_without_patient_ids_or_paths(tmp_path,
                                                                             monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the default: a store beside the run folder

    from simulations.pooled_training import run_training

    manifest, secrets = _distinctive_manifest(tmp_path / "secret")
    cfg = with_overrides(tiny_config(epochs=2), {"data.manifest": str(manifest)})
    out = tmp_path / "runs" / "train-tiny"
    run_training(cfg, None, out)

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("dentfed")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "train-tiny"
    assert run.data.tags["dentfed.kind"] == "train"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["data.manifest"] == REDACTED
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    assert run.data.metrics["final/macro_auc"] == pytest.approx(
        json.loads((out / "metrics.json").read_text())["final"]["macro_auc"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    arts |= {a.path for d in ("plots", "model") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"report.md", "metrics.json", "model_card.md", "model_card.json",
            "plots/learning_curve.png", "model/model.pt"} <= arts
    local = Path(client.download_artifacts(run.info.run_id, "model", str(tmp_path / "dl")))
    mf = read_model_file(local / "model.pt")  # still a dentfed model file, paths redacted
    assert mf.cfg.data.manifest == REDACTED

    audit_tracking_store(tmp_path / "runs", secrets + [str(tmp_path / "secret")])

    # The off switch: nothing logged.
    off = with_overrides(cfg, {"tracking.enabled": False})
    assert log_run_folder(out, "train", off) is None
    assert len(client.search_runs([exp.experiment_id])) == 1


def audit_tracking_store(runs: Path, secrets: list[str]) -> int:
    """Every byte of the local MLflow store (the SQLite file with params, metrics and tags,
    and every artifact) is free of the given patient ids and paths; returns files checked."""
    files = [runs / "mlflow.db", *(p for p in (runs / "mlartifacts").rglob("*") if p.is_file())]
    assert files[0].is_file() and len(files) > 1, files
    for path in files:
        blob = path.read_bytes()
        for s in secrets:
            assert s.encode() not in blob, (s, path)
    return len(files)
