"""`outcome.assess_patient`, the public per-patient function (what Spark's workers call), is `assess` for one patient."""

from __future__ import annotations

import json

import pytest

from fhir_aibl.cli import FIXTURES_DIR, fhir_bundle_json, iter_records, with_careplans
from fhir_aibl.errors import InvalidResourceError, NotJsonError
from fhir_aibl.outcome import assess_patient
from fhir_aibl.sources import decide_duplicates, DROP, key_line, medication_index, patient_records

from .conftest import AS_OF


def _local(assessor, path):
    problems = []
    made = list(with_careplans(assessor, iter_records([path], terminology=assessor.terminology), AS_OF, problems))
    bundle = json.loads(fhir_bundle_json([pair for _r, pair in made]))
    return made[0][0].assessment.contract(), [e["resource"] for e in bundle["entry"]], problems


@pytest.mark.parametrize("name", ["V01.json", "V07.json", "V20.json"])
def test_a_worked_example_is_what_assess_gives(assessor, name):
    path = FIXTURES_DIR / name
    contract, resources, _problems = _local(assessor, path)
    bundle = json.loads(path.read_text())
    outcome = assess_patient([bundle], as_of=AS_OF, assessor=assessor)  # urn: references resolve inside their Bundle
    assert outcome.assessment == contract
    local = {r["resourceType"]: {k: v for k, v in r.items() if k != "created"} for r in resources}
    assert {k: v for k, v in outcome.care_plan.items() if k != "created"} == local["CarePlan"]
    assert outcome.risk_assessment == local["RiskAssessment"]
    assert outcome.patient == contract["patient"]


def test_lines_and_problems_are_named_as_the_reader_names_them(assessor):
    lines = [
        (
            "export/Observation.ndjson", 3,
            b'{"resourceType":"Observation","id":"o1","status":"final","subject":{"reference":"Patient/p1"},'
            b'"code":{"coding":[{"system":"http://loinc.org","code":"39156-5"}]},"valueQuantity":{"value":"heavy"}}',
        ),
        ("export/Observation.ndjson", 4, b"{not json"),
        ("export/Patient.ndjson", 1, b'{"resourceType":"Patient","id":"p1","gender":"female","birthDate":"1960-01-01"}'),
    ]
    outcome = assess_patient(lines, as_of=AS_OF, assessor=assessor)
    assert outcome.patient == "Patient/p1" and outcome.assessment is not None
    kinds = {type(p): str(p) for p in outcome.problems}
    assert "export/Observation.ndjson:4" in kinds[NotJsonError]
    assert "export/Observation.ndjson:3: Observation/o1" in kinds[InvalidResourceError]


def test_two_patients_are_never_assessed_as_one(assessor):
    with pytest.raises(ValueError, match="2 patients"):
        assess_patient([{"resourceType": "Patient", "id": "a"}, {"resourceType": "Patient", "id": "b"}], as_of=AS_OF,
                       assessor=assessor)
    only = assess_patient([{"resourceType": "Patient", "id": "a"}, {"resourceType": "Patient", "id": "b"}], as_of=AS_OF,
                          assessor=assessor, patient="b")
    assert only.patient == "Patient/b"


def test_a_medication_by_reference_is_resolved_from_the_index_without_changing_it(assessor):
    bundle = json.loads((FIXTURES_DIR / "V01.json").read_text())
    resources = [e["resource"] for e in bundle["entry"]]
    medications = []
    for n, r in enumerate(resources):
        if r["resourceType"].startswith("Medication") and "medicationCodeableConcept" in r:
            medications.append({"resourceType": "Medication", "id": f"m{n}", "code": r.pop("medicationCodeableConcept")})
            r["medicationReference"] = {"reference": f"Medication/m{n}"}
    assert medications
    index = medication_index(medications, assessor.terminology)
    held = len(index)
    with_index = assess_patient(resources, index, as_of=AS_OF, assessor=assessor)
    without = assess_patient(resources, as_of=AS_OF, assessor=assessor)
    assert with_index.assessment["ai_status"] == "active"
    assert "medication-unresolved" in without.assessment["flags"]
    extra = {"resourceType": "Medication", "id": "other", "code": {"text": "x"}}
    assess_patient([*resources, extra], index, as_of=AS_OF, assessor=assessor)
    assert len(index) == held  # the caller's index is only read


def test_key_line_is_the_readers_first_pass():
    assert key_line(b'{"resourceType":"Observation","id":"o","subject":{"reference":"Patient/p"}}', "f:1").patient == "p"
    assert key_line(b'{"resourceType":"Medication","id":"m"}', "f:2").kind == "medication"
    assert key_line(b'{"resourceType":"Encounter","id":"e"}', "f:3").kind == "skipped"
    unkeyed = key_line(b'{"resourceType":"Observation","id":"o"}', "f:4")
    assert unkeyed.kind == "problem" and "no patient reference" in str(unkeyed.problems[0])
    bundle = key_line(json.dumps(json.loads((FIXTURES_DIR / "V01.json").read_text())), "f:5")
    assert bundle.kind == "bundle" and bundle.patients == ("v01",)


def test_decide_duplicates_keeps_the_newest_where_it_is():
    old = {"meta": {"versionId": "1"}}
    new = {"meta": {"versionId": "2"}}
    assert decide_duplicates([(5, "b", new), (1, "a", old)]) == {1: DROP, 5: 5}
    assert decide_duplicates([(1, "a", old), (3, "a", new), (5, "b", old)]) == {1: DROP, 3: 1, 5: DROP}


def test_patient_records_groups_as_the_reader(assessor):
    items = [{"resourceType": "Patient", "id": "a"}, {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/b"}}]
    records = list(patient_records(items, terminology=assessor.terminology))
    assert [r.patient_ref for r in records] == ["Patient/a", "Patient/b"]
