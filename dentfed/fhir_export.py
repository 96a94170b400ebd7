"""Detection findings as HL7 FHIR resources for electronic dental records.

One Observation per finding (the FDI tooth as `bodySite`, coded in HL7's tooth code system,
which uses the ISO 3950 / FDI numbers), grouped by one DiagnosticReport, all in a Bundle of type
`collection` whose entries refer to each other by `urn:uuid:` full URLs. Everything is
`preliminary`: automated output that a clinician has not reviewed.

FHIR version: the resources are built and validated with the maintained `fhir.resources`
package's R4B module (FHIR 4.3.0; the package's own default is R5, and no maintained release
for pydantic 2 ships a 4.0.1 module). R4B changed nothing in Bundle, Observation or
DiagnosticReport, and only elements that exist unchanged in R4 (4.0.1) are used, so an R4
server accepts the output.

Privacy: nothing about the patient is written unless the caller passes a reference
(`patient_reference`, e.g. "Patient/123" from their own record system); no file name, path
or image is ever included.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from shared import fdi

TOOTH_SYSTEM = "http://terminology.hl7.org/CodeSystem/ex-tooth"  # ISO 3950 (FDI) numbers
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
REPORT_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0074"
# dentfed's own finding codes (no standard code is claimed for them): tooth-present,
# tooth-missing, or the model's class / condition name.
FINDING_SYSTEM = "urn:dentfed:finding"
FHIR_VERSION = "4.3.0 (R4B; R4-compatible elements only)"

_QUADRANT_TEXT = {1: "upper right", 2: "upper left", 3: "lower left", 4: "lower right",
                  5: "upper right (deciduous)", 6: "upper left (deciduous)",
                  7: "lower left (deciduous)", 8: "lower right (deciduous)"}


def _tooth_site(tooth: str) -> dict:
    return {"coding": [{"system": TOOTH_SYSTEM, "code": tooth}],
            "text": f"tooth {tooth} (FDI, {_QUADRANT_TEXT[fdi.quadrant(tooth)]})"}


def _code(code: str, text: str) -> dict:
    return {"coding": [{"system": FINDING_SYSTEM, "code": code, "display": text}],
            "text": text}


def _observation(f: Mapping, subject: dict | None, device: dict, issued: str) -> dict:
    label = str(f["label"])
    tooth = label if fdi.is_fdi(label) else (str(f["tooth"]) if f.get("tooth") else None)
    if f.get("condition"):
        what = str(f["condition"])
    elif fdi.is_fdi(label):
        what = "tooth-present"
    else:
        what = label
    obs: dict = {
        "resourceType": "Observation",
        "status": "preliminary",
        "category": [{"coding": [{"system": OBS_CATEGORY, "code": "imaging",
                                  "display": "Imaging"}]}],
        "code": _code(what, what.replace("_", " ").replace("-", " ")),
        "issued": issued,
        "device": device,
        "method": {"text": "automated detection on a dental radiograph (not reviewed)"},
    }
    if subject is not None:
        obs["subject"] = subject
    if tooth is not None:
        if not fdi.is_fdi(tooth):
            raise ValueError(f"'{tooth}' is not an FDI tooth number")
        obs["bodySite"] = _tooth_site(tooth)
    components = []
    if "score" in f:
        components.append({"code": _code("detection-score", "detection score"),
                           "valueQuantity": {"value": round(float(f["score"]), 4),
                                             "unit": "1",
                                             "system": "http://unitsofmeasure.org",
                                             "code": "1"}})
    if "box" in f:
        x1, y1, x2, y2 = (round(float(v), 1) for v in f["box"])
        components.append({"code": _code("bounding-box", "bounding box x1,y1,x2,y2 (pixels)"),
                           "valueString": f"{x1},{y1},{x2},{y2}"})
    if components:
        obs["component"] = components
    return obs


def findings_bundle(findings: Sequence[Mapping], *, patient_reference: str | None = None,
                    missing_teeth: Sequence[str] = (), model_name: str = "dentfed model",
                    issued: datetime | None = None, conclusion: str | None = None) -> dict:
    """A validated FHIR Bundle (as a JSON-ready dict) for one image's findings.

    `findings`: dicts of `shared.fdi.finding` ({"label", "score", "box"}, optional
    "condition", "tooth"); `missing_teeth`: FDI numbers charted as missing (an Observation
    each, code tooth-missing); `patient_reference`: a reference the caller's record system
    understands (e.g. "Patient/123"); without it no subject is written at all.
    Raises ValueError when FHIR validation fails."""
    stamp = (issued or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    subject = {"reference": patient_reference} if patient_reference else None
    device = {"display": model_name}
    obs = [_observation(f, subject, device, stamp) for f in findings]
    for tooth in missing_teeth:
        if not fdi.is_fdi(tooth):
            raise ValueError(f"'{tooth}' is not an FDI tooth number")
        o = _observation({"label": str(tooth), "condition": "tooth-missing"}, subject, device,
                         stamp)
        obs.append(o)
    urls = [f"urn:uuid:{uuid.uuid4()}" for _ in obs]
    if conclusion is None:
        teeth = sorted({o["bodySite"]["coding"][0]["code"] for o in obs
                        if "bodySite" in o and o["code"]["coding"][0]["code"] != "tooth-missing"})
        conclusion = (f"{len(findings)} automated finding(s)"
                      + (f" on teeth {', '.join(teeth)}" if teeth else "")
                      + (f"; missing: {', '.join(missing_teeth)}" if missing_teeth else "")
                      + ". Preliminary: not reviewed by a clinician.")
    report: dict = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "category": [{"coding": [{"system": REPORT_CATEGORY, "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": _code("dental-radiograph-findings", "dental radiograph findings (automated)"),
        "issued": stamp,
        "result": [{"reference": u} for u in urls],
        "conclusion": conclusion,
    }
    if subject is not None:
        report["subject"] = subject
    data = {
        "resourceType": "Bundle",
        "type": "collection",
        "timestamp": stamp,
        "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": report}]
        + [{"fullUrl": u, "resource": o} for u, o in zip(urls, obs, strict=True)],
    }
    return validate_bundle(data)


def validate_bundle(data: Mapping) -> dict:
    """Validate a Bundle dict against the FHIR resource models (fhir.resources R4B) and return
    it as the library serialises it; ValueError with the library's reasons when invalid."""
    from fhir.resources.R4B.bundle import Bundle

    try:
        bundle = Bundle.model_validate(dict(data))
    except Exception as err:  # pydantic's ValidationError, with FHIR paths in the message
        raise ValueError(f"FHIR validation failed: {err}") from None
    return json.loads(bundle.model_dump_json(exclude_none=True))


def bundle_json(bundle: Mapping) -> str:
    """The Bundle as FHIR JSON text."""
    return json.dumps(bundle, indent=1, ensure_ascii=False)
