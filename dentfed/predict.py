"""`dentfed predict`: predictions for images with a saved model, as CSV and JSON, and optional
saliency overlays with one HTML contact sheet."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dentfed.inference import (
    Detections,
    Inputs,
    LoadedModel,
    PredictDataset,
    Predictions,
    check_modality,
    check_task,
    collect_inputs,
    detect_paths,
    finalise_findings,
    load_model,
    numbers_teeth,
    predict_paths,
    predictions_table,
)
from dentfed.saliency import (
    SheetRow,
    compute_maps,
    denormalise,
    display_image,
    methods_for,
    overlay,
    write_sheet,
)
from shared.atomic_files import atomic_folder, write_json, write_text_atomic
from shared.config import TaskConfig
from shared.data.readers import read_image
from shared.errors import DentfedError, ManifestError
from shared.model_card import build_card, card_markdown

log = logging.getLogger("dentfed")


def model_card_text(loaded: LoadedModel) -> str:
    """The run's model card; for run folders made before cards existed, one rebuilt from the
    checkpoint and metrics.json (data counts then unknown)."""
    card = loaded.card
    if card is None:
        metrics_path = loaded.checkpoint.parent / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        kind = "federated" if loaded.checkpoint.name.startswith("model_") else "pooled"
        card = build_card(loaded.cfg, kind=kind, checkpoint=loaded.checkpoint.name,
                          thresholds=loaded.thresholds,
                          data={"note": "not recorded (run made before model cards)"},
                          metrics=metrics, evaluated_on="as recorded in metrics.json")
    return card_markdown(card)


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label)


def write_saliency(loaded: LoadedModel, inputs: Inputs, pred: Predictions, out: Path,
                   limit: int, batch_size: int = 8) -> Path:
    """PNG overlays for every label and method of the first `limit` readable images, and
    sheet.html showing each image's predicted labels (or its most likely one)."""
    folder = out / "saliency"
    folder.mkdir(parents=True, exist_ok=True)
    labels = loaded.labels
    methods = methods_for(loaded.model)
    chosen = [i for i, e in enumerate(pred.errors) if not e][:limit]
    ds = PredictDataset([inputs.paths[i] for i in chosen], loaded.cfg.data.image_size,
                        loaded.cfg.data.modality)
    model = loaded.model.to(memory_format=torch.contiguous_format)
    rows: list[SheetRow] = []
    for start in range(0, len(chosen), batch_size):
        items = [ds[k] for k in range(start, min(start + batch_size, len(chosen)))]
        x = torch.stack([it[0] for it in items])
        maps = compute_maps(model, x, list(range(len(labels))), methods)
        for b, (xi, _, _) in enumerate(items):
            i = chosen[start + b]
            stem = f"{i + 1:04d}"
            image = denormalise(xi)
            display_image(image).save(folder / f"{stem}_input.png")
            overlays: dict[str, dict[str, str]] = {}
            for j, lab in enumerate(labels):
                for m in methods:
                    name = f"{stem}_{_slug(lab)}_{m}.png"
                    overlay(image, maps[m][b, j]).save(folder / name)
                    overlays.setdefault(lab, {})[m] = name
            probs = {lab: float(pred.probs[i, j]) for j, lab in enumerate(labels)}
            predicted = [lab for j, lab in enumerate(labels) if pred.decisions[i, j] == 1]
            shown = predicted or [labels[int(np.argmax(pred.probs[i]))]]
            rows.append(SheetRow(inputs.names[i], f"{stem}_input.png", probs, predicted, shown,
                                 overlays))
    thr = (dict(zip(labels, loaded.decision_thresholds(), strict=True))
           if loaded.task_type == "multilabel" else None)
    header = (f"<p>Model: {loaded.cfg.model.name}, {loaded.task_type}; decisions at "
              f"{'tuned' if loaded.thresholds else 'default'} thresholds. {len(rows)} of "
              f"{len(inputs.names)} images shown. A saliency map shows which pixels the "
              "label's score is sensitive to, not a diagnosis.</p>")
    sheet = folder / "sheet.html"
    write_sheet(sheet, "dentfed saliency sheet", rows, methods, thr, header)
    return sheet


def detection_table(names: list[str], det: Detections) -> pd.DataFrame:
    """One row per box (label, score, x1..y2 in original-image pixels); an image without
    boxes, or unreadable, has one row with the label blank."""
    rows = []
    for i, name in enumerate(names):
        base = {"image": name, "status": "unreadable" if det.errors[i] else "ok",
                "error": det.errors[i]}
        if not det.findings[i]:
            rows.append({**base, "label": "", "score": None, "x1": None, "y1": None,
                         "x2": None, "y2": None})
        for f in det.findings[i]:
            rows.append({**base, "label": f["label"], "score": round(f["score"], 4),
                         **dict(zip(("x1", "y1", "x2", "y2"), f["box"], strict=True))})
    return pd.DataFrame(rows, columns=["image", "status", "error", "label", "score", "x1",
                                       "y1", "x2", "y2"])


def run_detect(loaded: LoadedModel, inputs: Inputs, out: Path, *, batch_size: int,
               workers: int, min_score: float, numbering: bool = True, fhir: bool = False,
               patient_reference: str | None = None) -> dict:
    """`dentfed predict` for a detector: predictions.csv (one row per box), predictions.json
    (per image its boxes) and, per readable image, `images/<n>.boxes.png` (the image with its
    boxes), `images/<n>.chart.png` (a dental chart, for a tooth-numbering model) and with
    `fhir` `images/<n>.fhir.json` (an HL7 FHIR Bundle; no patient unless `patient_reference`),
    all from `dentfed.clinic_outputs`. When every label is an FDI tooth number and `numbering`
    is on, each image's teeth are first renumbered anatomically consistently (at most one box
    per number, numbers in order left to right per quadrant; `shared.fdi.consistent_numbering`).
    A broken image is listed as unreadable; the others are still written."""
    from dentfed.clinic_outputs import clinic_outputs, write_clinic_outputs

    t0 = time.perf_counter()
    det = detect_paths(loaded, inputs.paths, batch_size=batch_size, workers=workers)
    numbered = numbering and numbers_teeth(loaded)
    det.findings = [finalise_findings(loaded, f, numbering=numbering, min_score=min_score)
                    for f in det.findings]
    seconds = time.perf_counter() - t0
    summary = {
        "model": {"checkpoint": loaded.checkpoint.name, "architecture": loaded.cfg.model.name,
                  "task": "detection", "labels": loaded.labels, "min_score": min_score,
                  "fdi_numbering": "anatomically consistent (shared.fdi.consistent_numbering)"
                  if numbered else "as detected"},
        "images": len(inputs.names), "failed": det.n_failed, "precision": "fp32",
        "boxes": sum(len(f) for f in det.findings), "seconds": seconds,
        "images_per_second": len(inputs.names) / seconds if seconds > 0 else None,
    }
    records = []
    keep = ("boxes.png", "chart.png", "fhir.json") if fhir else ("boxes.png", "chart.png")
    with atomic_folder(out) as tmp:
        for i, name in enumerate(inputs.names):
            rec = {"image": name, "status": "unreadable" if det.errors[i] else "ok",
                   "error": det.errors[i] or None, "boxes": det.findings[i]}
            if not det.errors[i]:
                try:
                    image = read_image(inputs.paths[i])
                except ManifestError as err:  # changed since it was read: still not fatal
                    det.errors[i] = str(err).split(": ", 1)[-1]
                    rec["status"], rec["error"] = "unreadable", det.errors[i]
                else:
                    outs = clinic_outputs(image, det.findings[i], loaded.labels,
                                          score_threshold=min_score,
                                          model_name=loaded.cfg.model.name,
                                          patient_reference=patient_reference)
                    written = write_clinic_outputs({k: v for k, v in outs.items() if k in keep},
                                                   tmp / "images", f"{i + 1:04d}")
                    rec["files"] = [str(p.relative_to(tmp)) for p in written]
            records.append(rec)
        summary["failed"] = det.n_failed
        write_text_atomic(tmp / "predictions.csv",
                          detection_table(inputs.names, det).to_csv(index=False))
        write_json(tmp / "predictions.json", {**summary, "predictions": records})
    return summary


def run_export(model_path: str | Path, calibrate: str | Path | list[Path] | None = None,
               n_calibration: int = 64) -> dict[str, Path]:
    """`dentfed export`: ONNX exports beside the model file (dentfed/onnx_export.py); int8 too
    when `calibrate` (an image, folder or manifest of the clinic's own images, or a list of
    image paths) is given."""
    from dentfed.onnx_export import export_onnx

    loaded = load_model(model_path)
    batches = None
    if calibrate is not None:
        cal = calibrate if isinstance(calibrate, list) else collect_inputs(calibrate).paths
        ds = PredictDataset(cal[:n_calibration], loaded.cfg.data.image_size,
                            loaded.cfg.data.modality)
        items = [ds[i] for i in range(len(ds))]
        good = [it[0] for it in items if not it[2]]
        if not good:
            raise DentfedError(f"{calibrate}: no readable calibration image")
        batches = [torch.stack(good[s:s + 8]) for s in range(0, len(good), 8)]
    return export_onnx(loaded.model, loaded.cfg.data.image_size, loaded.checkpoint, batches)


def run_predict(model_path: str | Path, target: str | Path, out: str | Path, *,
                batch_size: int = 32, workers: int = 1, precision: str = "fp32",
                saliency: bool = False, saliency_limit: int = 20,
                expect_task: TaskConfig | None = None, min_score: float = 0.5,
                numbering: bool = True, fhir: bool = False,
                patient_reference: str | None = None) -> dict:
    """Predict every image of `target` and write predictions.csv / predictions.json (and the
    saliency folder) to `out`; returns the JSON's summary fields. A detector writes boxes
    instead (`run_detect`; boxes scoring below `min_score` are left out)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DentfedError(f"output folder {out} exists and is not empty; choose another --out")
    loaded = load_model(model_path)
    if expect_task is not None:
        check_task(loaded, expect_task)
    inputs = collect_inputs(target)
    check_modality(loaded, inputs)
    if loaded.task_type == "detection":
        if saliency or precision != "fp32":
            raise DentfedError("--saliency and --precision are for classification models; "
                               "this model is a detector")
        return run_detect(loaded, inputs, out, batch_size=batch_size, workers=workers,
                          min_score=min_score, numbering=numbering, fhir=fhir,
                          patient_reference=patient_reference)
    t0 = time.perf_counter()
    pred = predict_paths(loaded, inputs.paths, batch_size=batch_size, workers=workers,
                         precision=precision)
    seconds = time.perf_counter() - t0
    table = predictions_table(inputs.names, loaded.labels, pred)
    summary = {
        "model": {"checkpoint": loaded.checkpoint.name, "architecture": loaded.cfg.model.name,
                  "task": loaded.task_type, "labels": loaded.labels,
                  "thresholds": loaded.decision_thresholds()
                  if loaded.task_type == "multilabel" else None,
                  "threshold_source": "tuned on validation" if loaded.thresholds else
                  ("0.5 (the model has no tuned thresholds)"
                   if loaded.task_type == "multilabel" else "argmax")},
        "images": len(inputs.names),
        "failed": pred.n_failed,
        "precision": pred.precision,
        "backend": pred.backend,
        "auto_check": pred.auto_check,
        "seconds": seconds,
        "images_per_second": len(inputs.names) / seconds if seconds > 0 else None,
    }
    records = []
    for row in table.to_dict(orient="records"):
        ok = row["status"] == "ok"
        records.append({
            "image": row["image"], "status": row["status"], "error": row["error"] or None,
            "probabilities": {lab: row[f"p_{lab}"] for lab in loaded.labels} if ok else None,
            "decisions": {lab: bool(row[f"pred_{lab}"]) for lab in loaded.labels}
            if ok else None,
            "predicted": row["predicted"].split(";") if ok and row["predicted"] else []})
    # All or nothing: written to a hidden folder beside `out`, renamed when complete.
    with atomic_folder(out) as tmp:
        write_text_atomic(tmp / "predictions.csv", table.to_csv(index=False))
        write_json(tmp / "predictions.json", {**summary, "predictions": records})
        if saliency:
            sheet = write_saliency(loaded, inputs, pred, tmp, saliency_limit)
            summary["sheet"] = str(out / sheet.relative_to(tmp))
    return summary
