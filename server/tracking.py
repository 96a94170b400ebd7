"""MLflow experiment tracking, read from a finished run folder.

Every pooled training, simulation and deployment run writes its run folder first; this module
then copies what is in it into one MLflow run, so tracking needs no hooks in the training or
round loops and logs exactly what the run folder (already audited for privacy) holds:

- params: the resolved config, flattened (`train.lr`, ...), with every path-valued entry
  (data.manifest, federation.test_manifest, model.pretrained, the tracking URI, ...) replaced
  by `<path>`: a data path can name a clinic or a patient;
- metrics with the round (federated) or epoch (pooled) as step: central test metrics
  (`central/<name>`), aggregated clinic metrics (`clinics/<name>`), per-clinic metrics by
  anonymous index (`clinic/<i>/<name>`), counts, bytes and seconds; `final/<name>` once;
- artifacts: report.md, metrics.json, the plots, the model card and the final model (its
  embedded config with the same paths redacted).

Where: `tracking.uri`, else $MLFLOW_TRACKING_URI, else a local SQLite store beside the run
folder (`<runs>/mlflow.db`, artifacts in `<runs>/mlartifacts`; `mlflow ui
--backend-store-uri sqlite:///runs/mlflow.db` shows it). A tracking failure (server down) is
a warning, never a failed run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from shared.config import Config, load_config
from shared.model_card import CARD_JSON, CARD_MD

log = logging.getLogger("dentfed.tracking")
REDACTED = "<path>"
PATH_SUFFIXES = (".csv", ".pt", ".pth", ".safetensors", ".yaml", ".yml", ".json", ".png",
                 ".jpg", ".jpeg", ".dcm", ".db")
MODEL_FILES = ("model_final.pt", "model.pt")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def looks_like_path(value: object) -> bool:
    """True for a string that names a file, folder or store (anything with a path separator,
    a URI scheme or a data-file suffix)."""
    if not isinstance(value, str):
        return False
    v = value.strip().lower()
    return ("/" in v or "\\" in v or "://" in v or v.startswith(("file:", "sqlite:", "~"))
            or v.endswith(PATH_SUFFIXES))


def redact_paths(obj: Any) -> Any:
    """A copy of a JSON-like config with every path-valued string replaced by `<path>`."""
    if isinstance(obj, dict):
        return {k: redact_paths(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_paths(v) for v in obj]
    return REDACTED if looks_like_path(obj) else obj


def flat_params(cfg: Config) -> dict[str, str]:
    """The resolved config as `section.key` -> value strings, paths redacted, unset left out."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, sub in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), sub)
        elif v is not None:
            out[prefix] = json.dumps(v) if isinstance(v, list) else str(v)

    walk("", redact_paths(cfg.model_dump(mode="json")))
    return out


def _metric_name(*parts: object) -> str:
    return "/".join(_BAD_CHARS.sub("_", str(p)) for p in parts if p != "")


def _numbers(prefix: tuple, d: Any) -> dict[str, float]:
    """Finite numbers in a (nested) dict as metric name -> value."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_numbers((*prefix, k), v))
    elif isinstance(d, int | float) and not isinstance(d, bool) and math.isfinite(d):
        out[_metric_name(*prefix)] = float(d)
    return out


COUNTERS = ("clinics_sampled", "clinics_replied", "clinics_failed", "clinics_no_reply",
            "attempts", "bytes_sent", "bytes_received", "round_seconds",
            "clinic_evaluate_seconds", "central_eval_seconds")


def round_metrics(row: dict) -> dict[str, float]:
    """One federated round of metrics.json's history as MLflow metric name -> value."""
    m = _numbers(("central",), row.get("server") or {})  # None: round not evaluated
    for phase in ("clinics_train", "clinics_evaluate"):
        block = row.get(phase, {})
        m.update(_numbers(("clinics",), block.get("aggregated", {})))
        for idx, vals in block.get("per_clinic", {}).items():
            m.update(_numbers(("clinic", idx), vals))
    m.update(_numbers(("round",), {k: row[k] for k in COUNTERS if k in row}))
    m.update(_numbers(("round",), {"clinics_rejected": len(row.get("clinics_rejected", {})),
                                   "clinics_declined": len(row.get("clinics_declined", {}))}))
    return m


def run_metrics(data: dict) -> list[tuple[int, dict[str, float]]]:
    """(step, metrics) pairs from a run folder's metrics.json: rounds for a federated run,
    epochs for a pooled one (per fold with --cv), then the final metrics at the last step."""
    steps: list[tuple[int, dict[str, float]]] = []
    history = data.get("history", [])
    if history and isinstance(history[0], dict) and "round" in history[0]:
        steps = [(int(row["round"]), round_metrics(row)) for row in history]
    else:
        folds = history if history and isinstance(history[0], list) else [history]
        for f, rows in enumerate(folds):
            prefix = (f"fold{f}",) if len(folds) > 1 else ()
            for i, row in enumerate(rows):
                step = int(row.get("epoch", i + 1))
                steps.append((step, _numbers(prefix, {k: v for k, v in row.items()
                                                      if k != "epoch"})))
    last = max((s for s, _ in steps), default=0)
    final = _numbers(("final",), data.get("final", {}))
    final.update(_numbers(("final",), {k: data[k] for k in ("seconds", "wall_seconds",
                                                            "best_round", "upload_ratio")
                                       if k in data}))
    steps.append((last, final))
    return steps


def tracking_uri(cfg: Config, run_dir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else the local store beside the run folder."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return _local_uri(run_dir)


def _local_uri(run_dir: Path) -> str:
    return f"sqlite:///{Path(run_dir).resolve().parent / 'mlflow.db'}"


def _experiment_id(client: Any, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # A local SQLite store keeps its artifacts beside it (MLflow's default is ./mlruns in the
    # current directory, wherever that is); a server decides for itself.
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent
                    / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _redacted_model(src: Path, dst: Path) -> None:
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    ckpt["config"] = redact_paths(ckpt["config"])
    torch.save(ckpt, dst)


def log_run_folder(run_dir: str | Path, kind: str, cfg: Config | None = None) -> str | None:
    """Log a finished run folder as one MLflow run; returns its run id (None when tracking is
    off or failed: tracking never fails the run)."""
    run_dir = Path(run_dir)
    try:
        cfg = cfg or load_config(run_dir / "config.yaml")
        if not cfg.tracking.enabled:
            return None
        return _log(run_dir, kind, cfg)
    except Exception as e:  # noqa: BLE001 - a tracking server being down must not fail a run
        log.warning("MLflow tracking failed (%s: %s); the run folder is complete",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return None


def _log(run_dir: Path, kind: str, cfg: Config) -> str:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg, run_dir)
    if uri.startswith("sqlite:"):
        logging.getLogger("alembic").setLevel(logging.WARNING)
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=uri)
    exp = _experiment_id(client, cfg.tracking.experiment, uri)
    data = json.loads((run_dir / "metrics.json").read_text())
    run = client.create_run(exp, run_name=run_dir.name, tags={
        "dentfed.kind": kind, "dentfed.task": cfg.task.type, "dentfed.model": cfg.model.name,
        **({"dentfed.strategy": cfg.federation.strategy} if kind != "train" else {})})
    rid = run.info.run_id
    try:
        params = [Param(k, v[:6000]) for k, v in flat_params(cfg).items()]
        ts = int(run.info.start_time)
        metrics = [Metric(name, value, ts, step) for step, vals in run_metrics(data)
                   for name, value in vals.items()]
        for i in range(0, len(params), 100):  # MLflow's batch limits
            client.log_batch(rid, params=params[i:i + 100])
        for i in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[i:i + 1000])
        client.log_batch(rid, tags=[RunTag("dentfed.headline", str(data.get("headline", "")))])
        for name in ("report.md", "metrics.json", CARD_MD, CARD_JSON):
            if (run_dir / name).is_file():
                client.log_artifact(rid, str(run_dir / name))
        for png in sorted(run_dir.glob("*.png")):
            client.log_artifact(rid, str(png), artifact_path="plots")
        model = next((run_dir / m for m in MODEL_FILES if (run_dir / m).is_file()), None)
        if model is not None:
            with tempfile.TemporaryDirectory() as tmp:
                _redacted_model(model, Path(tmp) / model.name)
                client.log_artifact(rid, str(Path(tmp) / model.name), artifact_path="model")
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    log.info("MLflow run %s in experiment %r", rid, cfg.tracking.experiment)
    return rid
