"""A resource that fails validation never hides a patient on an aromatase inhibitor, nor lowers a category.

Before: a resource the rules read that failed FHIR R4 validation was left out whole. One malformed
element the rules never look at (a dosage text given as a number) made a patient on anastrozole
"not on an aromatase inhibitor" (not applicable: no card, no worklist row, no CarePlan), and a hip
fracture with a malformed onset date lost the fracture, turning HIGH into LOW. Now the invalid
elements are removed where losing them can only make the resource say less
(fhir_aibl/validation.py, `salvage`), the problem is still reported (exit 1), and data that can
reassure (a DXA result) is never read without its status, code or date.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path

import pytest

from fhir_aibl.assess import Assessor, assess_record
from fhir_aibl.cli import main
from fhir_aibl.sources import read_paths
from fhir_aibl.validation import full_problem, salvage

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "fixtures" / "bundles"
EXPECTED = json.loads((ROOT / "fixtures" / "expected.json").read_text())
AS_OF = dt.date(2026, 6, 1)
ORDER = {"not-applicable": 0, "low": 1, "indeterminate": 2, "moderate": 3, "high": 4}


@pytest.fixture(scope="module")
def assessor() -> Assessor:
    return Assessor()


def _bundle(name: str) -> dict:
    return json.loads((BUNDLES / f"{name}.json").read_text())


def _resource(bundle: dict, rid: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"]["id"] == rid)


def _assess(tmp_path: Path, assessor: Assessor, bundle: dict):
    path = tmp_path / "record.json"
    path.write_text(json.dumps(bundle))
    read = read_paths([path], terminology=assessor.terminology)
    (record,) = read.patients
    return assess_record(assessor, record, AS_OF).assessment, read.problems


def test_a_malformed_dosage_text_no_longer_hides_the_aromatase_inhibitor(tmp_path, assessor):
    bundle = _bundle("V01")
    statement = _resource(bundle, "v01-anastrozole")
    statement["dosage"] = [{"text": 1}]  # a number where FHIR wants a string
    assessment, problems = _assess(tmp_path, assessor, bundle)
    expected = EXPECTED["V01"]
    assert assessment.ai_status == expected["ai_status"] and assessment.category == expected["category"]
    (problem,) = problems
    assert problem.resource == "MedicationStatement/v01-anastrozole"
    assert "fails FHIR R4 validation" in problem.message and "read without dosage[0].text" in problem.message


def test_the_command_still_reports_it_and_exits_1(tmp_path, capsys):
    bundle = _bundle("V01")
    _resource(bundle, "v01-anastrozole")["dosage"] = [{"text": 1}]
    path = tmp_path / "V01.json"
    path.write_text(json.dumps(bundle))
    assert main(["assess", str(path), "--format", "json", "--as-of", AS_OF.isoformat()]) == 1
    out, err = capsys.readouterr()
    (contract,) = json.loads(out)
    assert contract["ai_status"] == EXPECTED["V01"]["ai_status"]
    assert "MedicationStatement/v01-anastrozole: fails FHIR R4 validation" in err


@pytest.mark.parametrize("example, fracture", [("V13", "v13-fx-hip"), ("V12", "v12-fx-vertebral"), ("V38", "v38-fx-hip")])
def test_a_fracture_with_a_malformed_onset_still_counts(tmp_path, assessor, example, fracture):
    bundle = _bundle(example)
    _resource(bundle, fracture)["onsetDateTime"] = "2024-02-30"  # no such day
    assessment, problems = _assess(tmp_path, assessor, bundle)
    assert ORDER[assessment.category] >= ORDER[EXPECTED[example]["category"]] == ORDER["high"]
    assert problems and "read without onsetDateTime" in problems[0].message


def test_a_dxa_result_with_a_malformed_date_is_left_out_not_read_as_current(tmp_path, assessor):
    """Data that can reassure is never read without its date: a normal T-score of unknown age reassures no one."""
    bundle = _bundle("V13")
    fracture = _resource(bundle, "v13-fx-hip")
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"] is not fracture]
    dxa = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"
           and "valueQuantity" in e["resource"]]
    assert dxa
    for obs in dxa:
        obs["effectiveDateTime"] = "yesterday"
    assessment, problems = _assess(tmp_path, assessor, bundle)
    assert assessment.category in ("indeterminate", "moderate", "high")  # never low on undated results
    assert all("read without" not in p.message for p in problems if "Observation" in (p.resource or ""))


@pytest.mark.parametrize(
    "resource, lost",
    [
        ({"resourceType": "Observation", "id": "o", "status": True, "code": {"text": "x"}}, "status"),
        ({"resourceType": "Observation", "id": "o", "status": "final", "code": 1}, "code"),
        ({"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}, "bodySite": 3}, "bodySite"),
        ({"resourceType": "MedicationStatement", "id": "m", "status": "active", "subject": 7,
          "medicationCodeableConcept": {"text": "anastrozole"}}, "subject"),
        ({"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"},
          "modifierExtension": [{"url": 5}]}, "modifierExtension"),
        ({"resourceType": "Patient", "id": "p", "gender": 1, "birthDate": "1950-01-01"}, "gender"),
    ],
)
def test_what_would_change_what_a_resource_says_is_never_removed(resource, lost):
    problem = full_problem(resource)
    assert problem is not None and salvage(resource, problem) is None, lost


def test_what_is_kept_is_valid_and_the_original_untouched():
    resource = {"resourceType": "MedicationStatement", "id": "m", "status": "active", "subject": {"reference": "Patient/p"},
                "medicationCodeableConcept": {"text": "anastrozole"}, "dosage": [{"text": 1}, {"text": "ok"}],
                "effectivePeriod": {"start": "2024-13-01"}}
    before = copy.deepcopy(resource)
    kept = salvage(resource, full_problem(resource))
    assert kept is not None and full_problem(kept.resource) is None
    assert kept.resource["dosage"] == [{"text": "ok"}] and "effectivePeriod" not in kept.resource
    assert resource == before


def test_a_value_is_lost_whole_in_data_that_can_reassure():
    obs = {"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "t-score"},
           "valueQuantity": {"value": -2.6, "comparator": 5}}
    kept = salvage(obs, full_problem(obs))
    assert kept is not None and "valueQuantity" not in kept.resource and kept.removed == ("valueQuantity",)


def test_a_patient_with_a_malformed_birth_date_is_assessed_with_age_unknown(tmp_path, assessor):
    bundle = _bundle("V01")
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["birthDate"] = "1950-02-30"
    assessment, problems = _assess(tmp_path, assessor, bundle)
    assert "age-unknown" in assessment.flags and assessment.category != "low"
    assert "read without birthDate" in problems[0].message
