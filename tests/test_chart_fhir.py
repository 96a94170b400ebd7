"""Clinic outputs: boxes drawn on the image, the dental chart picture, and the FHIR export
(validated with fhir.resources; no patient identifier or path unless supplied)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from PIL import Image

from dentfed.dental_chart import (
    MISSING,
    PRESENT,
    QUADRANT_COLOURS,
    chart_cell,
    chart_state,
    dental_chart,
    draw_findings,
    label_colour,
    save_png,
)
from dentfed.fhir_export import findings_bundle, validate_bundle
from shared.fdi import finding


def test_draw_findings_draws_each_box_in_its_colour() -> None:
    img = Image.new("L", (200, 100), 0)
    fs = [finding("16", [20, 40, 60, 90], 0.9), finding("36", [120, 40, 160, 90], 0.8),
          finding("implant_a", [80, 10, 100, 30], 0.7)]
    out = draw_findings(img, fs, classes=["implant_a"])
    assert out.size == (200, 100) and out.mode == "RGB" and img.getpixel((20, 60)) == 0
    assert out.getpixel((20, 70)) == QUADRANT_COLOURS[1]   # left edge of 16's box
    assert out.getpixel((160, 70)) == QUADRANT_COLOURS[3]
    assert out.getpixel((100, 25)) == label_colour("implant_a", ["implant_a"])
    assert out.getpixel((40, 70)) == (0, 0, 0)             # inside stays the image


def test_chart_state_and_picture(tmp_path) -> None:
    fs = [finding("11", [0, 0, 1, 1], 0.9), finding("21", [0, 0, 1, 1], 0.3),   # below 0.5
          finding("36", [0, 0, 1, 1], 0.8, condition="caries"),
          finding("implant_a", [0, 0, 1, 1], 0.9, tooth="46")]
    state = chart_state(fs)
    assert state == {"11": None, "36": "caries", "46": "implant_a"}
    img = dental_chart(state, title="chart")
    path = save_png(img, tmp_path / "chart.png")
    assert Image.open(path).size == img.size

    def corner(tooth: str) -> tuple[int, int, int]:
        x1, y1, x2, y2 = chart_cell(tooth, img.width, titled=True)
        return img.getpixel((int(x1) + 6, int((y1 + y2) / 2)))

    assert corner("11") == PRESENT and corner("21") == MISSING
    assert corner("36") not in (PRESENT, MISSING) and corner("46") not in (PRESENT, MISSING)
    assert corner("36") != corner("46")  # two conditions, two colours


def test_fhir_bundle_validates_and_carries_teeth() -> None:
    fs = [finding("16", [10, 20, 30, 40], 0.91), finding("46", [10, 50, 30, 80], 0.62),
          finding("implant_a", [50, 50, 60, 90], 0.8, tooth="36")]
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    b = findings_bundle(fs, missing_teeth=["18", "28"], model_name="dentfed test",
                        issued=when)
    again = validate_bundle(b)  # what we wrote reads back through the FHIR models
    assert again == b and b["resourceType"] == "Bundle" and b["type"] == "collection"
    report, *obs = [e["resource"] for e in b["entry"]]
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    assert len(obs) == 5 and len(report["result"]) == 5
    assert {r["reference"] for r in report["result"]} == {e["fullUrl"] for e in b["entry"][1:]}
    sites = [o["bodySite"]["coding"][0] for o in obs]
    assert {s["system"] for s in sites} == {"http://terminology.hl7.org/CodeSystem/ex-tooth"}
    assert [s["code"] for s in sites] == ["16", "46", "36", "18", "28"]
    codes = [o["code"]["coding"][0]["code"] for o in obs]
    assert codes == ["tooth-present", "tooth-present", "implant_a", "tooth-missing",
                     "tooth-missing"]
    score = obs[0]["component"][0]["valueQuantity"]["value"]
    assert score == 0.91 and obs[0]["issued"].startswith("2026-01-02T03:04:05")
    assert "missing: 18, 28" in report["conclusion"]


def test_fhir_has_no_identifiers_unless_given() -> None:
    fs = [{**finding("16", [10, 20, 30, 40], 0.9), "path": "/clinic/Jane_Doe_1984.png",
           "patient_id": "P-123"}]
    text = json.dumps(findings_bundle(fs))
    assert "subject" not in text and "Jane" not in text and "P-123" not in text
    b = findings_bundle(fs, patient_reference="Patient/abc")
    assert all(e["resource"]["subject"] == {"reference": "Patient/abc"} for e in b["entry"])
    assert "Jane" not in json.dumps(b)


def test_fhir_rejects_what_is_not_valid() -> None:
    with pytest.raises(ValueError, match="not an FDI tooth number"):
        findings_bundle([finding("caries", [0, 0, 1, 1], 0.5, tooth="19")])
    # the models check structure and types (not value-set bindings such as status codes)
    for path, value in (("code", None), ("bodysite", {}), ("issued", "yesterday")):
        b = findings_bundle([finding("16", [0, 0, 1, 1], 0.9)])
        obs = b["entry"][1]["resource"]
        if value is None:
            del obs[path]                        # a required element missing
        else:
            obs[path] = value                    # a misspelt element, a malformed instant
        with pytest.raises(ValueError, match=f"(?s)FHIR validation failed.*{path}"):
            validate_bundle(b)


def test_clinic_outputs_for_a_tooth_model_and_an_implant_model(tmp_path) -> None:
    import io

    from dentfed.clinic_outputs import clinic_outputs, numbers_teeth, write_clinic_outputs
    from shared import fdi

    img = Image.new("L", (120, 80), 30)
    teeth = [finding("16", [10, 10, 30, 40], 0.9), finding("26", [80, 10, 100, 40], 0.3)]
    assert numbers_teeth(fdi.PERMANENT) and not numbers_teeth(["system_a"])
    out = clinic_outputs(img, teeth, list(fdi.PERMANENT), model_name="m")
    assert set(out) == {"boxes.png", "chart.png", "fhir.json"}
    assert Image.open(io.BytesIO(out["boxes.png"])).size == (120, 80)
    bundle = validate_bundle(json.loads(out["fhir.json"]))
    codes = [e["resource"]["code"]["coding"][0]["code"] for e in bundle["entry"][1:]]
    assert codes.count("tooth-present") == 1 and codes.count("tooth-missing") == 31  # 26 < 0.5
    implants = [finding("system_b", [40, 20, 60, 70], 0.8)]
    out = clinic_outputs(img, implants, ["system_a", "system_b", "system_c"])
    assert set(out) == {"boxes.png", "fhir.json"}  # no tooth numbers: no chart
    paths = write_clinic_outputs(out, tmp_path, "img1")
    assert sorted(p.name for p in paths) == ["img1.boxes.png", "img1.fhir.json"]
