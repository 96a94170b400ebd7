"""Everything the clinic gets for one image's detections, in memory: the image with its boxes,
a dental chart (when the model numbers teeth), and the FHIR Bundle. `predict` writes these
files per image; `serve` shows them without storing anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image

from dentfed.dental_chart import chart_state, dental_chart, draw_findings, png_bytes
from dentfed.fhir_export import bundle_json, findings_bundle
from shared import fdi
from shared.atomic_files import write_bytes_atomic


def numbers_teeth(labels: Sequence[str]) -> bool:
    """True when the model's classes are permanent FDI tooth numbers (a chart makes sense)."""
    return bool(labels) and all(str(lab) in fdi.PERMANENT for lab in labels)


def clinic_outputs(image: Image.Image, findings: Sequence[Mapping], labels: Sequence[str], *,
                   score_threshold: float = 0.5, model_name: str = "dentfed model",
                   patient_reference: str | None = None) -> dict[str, bytes]:
    """{"boxes.png", "chart.png" (tooth-numbering models, or findings that name a tooth),
    "fhir.json"} for one image. `findings` are `shared.fdi.finding` dicts (already numbered
    consistently, if wanted); those below `score_threshold` are left out of all three. The
    chart marks teeth absent from the findings as missing, and for a tooth-numbering model the
    FHIR report lists them as missing too."""
    kept = [f for f in findings if float(f.get("score", 1.0)) >= score_threshold]
    out = {"boxes.png": png_bytes(draw_findings(image, kept, classes=labels))}
    state = chart_state(kept, score_threshold)
    teeth = numbers_teeth(labels)
    if teeth or state:
        out["chart.png"] = png_bytes(dental_chart(
            state, title="Dental chart (automated, preliminary: not reviewed)"))
    missing = [n for n in fdi.PERMANENT if n not in state] if teeth else []
    bundle = findings_bundle(kept, patient_reference=patient_reference, missing_teeth=missing,
                             model_name=model_name)
    out["fhir.json"] = bundle_json(bundle).encode("utf-8")
    return out


def write_clinic_outputs(outputs: Mapping[str, bytes], folder: str | Path, stem: str
                         ) -> list[Path]:
    """Write each output as <folder>/<stem>.<name> (e.g. 3.boxes.png), all-or-nothing per
    file."""
    paths = []
    for name, data in outputs.items():
        p = Path(folder) / f"{stem}.{name}"
        write_bytes_atomic(p, data)
        paths.append(p)
    return paths
