"""What `fhir-aibl write-back` reads: shapes detected, anything else refused by file and line, the rest read."""

from __future__ import annotations

import json

import pytest

from fhir_aibl.writeback.inputs import read_inputs

from .outputs import SHAPES, make_outputs, on_ai


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    return folder, make_outputs(folder)


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_gives_the_same_patients_and_identifiers(shape, outputs):
    folder, shapes = outputs
    reading = read_inputs(shapes[shape])
    assert not reading.refused
    reference = read_inputs(shapes["explained-array"])
    assert sorted((i.patient, i.identifier, i.on_ai) for i in reading.items) == sorted(
        (i.patient, i.identifier, i.on_ai) for i in reference.items
    )
    assert sorted(i.patient for i in reading.items if i.on_ai) == on_ai(folder)


def test_anything_else_is_refused_by_file_and_line_and_the_rest_is_read(outputs, tmp_path):
    folder, shapes = outputs
    explained = json.loads((folder / "explained.json").read_text())
    bundle = json.loads((folder / "bundle.json").read_text())
    careplans = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "CarePlan"]
    bare = {k: explained[1][k] for k in ("patient", "ai_status", "category", "risk_factors", "recommendations",
                                         "flags", "rules", "evidence")}
    lines = [
        json.dumps(explained[0]),
        "{not json",
        json.dumps(bare),
        json.dumps({"resourceType": "Patient", "id": "x"}),
        json.dumps(careplans[5]),  # its RiskAssessment is nowhere in the input
        json.dumps({**explained[2], "category": "very-high"}),
        json.dumps([1, 2]),
    ]
    mixed = tmp_path / "mixed.ndjson"
    mixed.write_text("\n".join(lines) + "\n")
    (tmp_path / "empty.json").write_text("")
    reading = read_inputs([mixed, tmp_path / "empty.json", tmp_path / "missing.json"])
    assert [i.patient for i in reading.items] == [explained[0]["patient"]]
    refused = {r.where: r.reason for r in reading.refused}
    assert refused[f"{mixed}:2"].startswith("not JSON")
    assert "without its ruleset and findings: write it with `--explain`" in refused[f"{mixed}:3"]
    assert "only CarePlans and RiskAssessments" in refused[f"{mixed}:4"]
    assert "whose RiskAssessment" in refused[f"{mixed}:5"] and "is not in the input" in refused[f"{mixed}:5"]
    assert refused[f"{mixed}:6"].startswith("not a valid assessment: category")
    assert refused[f"{mixed}:7"] == "neither an assessment nor a FHIR resource"
    assert refused[str(tmp_path / "empty.json")] == "empty"
    assert refused[str(tmp_path / "missing.json")] == "no such file or folder"


def test_a_careplan_and_a_risk_assessment_about_two_patients_are_refused(outputs, tmp_path):
    folder, _shapes = outputs
    bundle = json.loads((folder / "bundle.json").read_text())
    risk, plan = bundle["entry"][0]["resource"], bundle["entry"][1]["resource"]
    assert risk["resourceType"] == "RiskAssessment" and plan["resourceType"] == "CarePlan"
    plan = {**plan, "subject": {"reference": "Patient/someone-else"}}
    path = tmp_path / "pair.ndjson"
    path.write_text(json.dumps(risk) + "\n" + json.dumps(plan) + "\n")
    reading = read_inputs([path])
    assert not reading.items
    assert "are not about one Patient" in reading.refused[0].reason


def test_a_careplan_of_an_unforeseen_shape_fails_its_patient_only(outputs, tmp_path):
    from ..fhir.fakes import FakeFhir, mock
    from .outputs import write_back

    folder, _shapes = outputs
    bundle = json.loads((folder / "bundle.json").read_text())
    entries = [e["resource"] for e in bundle["entry"]]
    broken = next(r for r in entries if r["resourceType"] == "CarePlan" and r.get("activity"))
    broken["activity"] = "not a list"
    path = tmp_path / "resources.ndjson"
    path.write_text("".join(json.dumps(r) + "\n" for r in entries))
    server = FakeFhir()
    with mock() as rsps:
        server.install(rsps)
        run = write_back("--fhir-base", server.base, path, "--state", tmp_path / "state")
    assert run.code == 1, run.stderr
    assert f"failed: {broken['subject']['reference']}: write-back: " in run.stderr
    assert f"written {len(on_ai(folder)) - 1}, unchanged 0, failed 1" in run.stderr


def test_json_lines_whose_first_line_is_damaged_are_read_past_it(outputs, tmp_path):
    folder, _shapes = outputs
    explained = json.loads((folder / "explained.json").read_text())
    path = tmp_path / "part-00000.json"
    path.write_text('{"patient": "Patient/cut-sh\n' + "".join(json.dumps(a) + "\n" for a in explained[:3]))
    reading = read_inputs([path])
    assert [i.patient for i in reading.items] == [a["patient"] for a in explained[:3]]
    assert [r.where for r in reading.refused] == [f"{path}:1"]
    (tmp_path / "bad.json").write_text("{\n  \"resourceType\": \"Bundle\",\n")
    reading = read_inputs([tmp_path / "bad.json"])
    assert not reading.items and reading.refused[0].reason.startswith("not JSON, nor JSON lines")
