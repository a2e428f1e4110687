"""Entries of a record that could not be read never hide a patient on an aromatase inhibitor and
never yield `low`.

Before: a resource that fails FHIR R4 validation where reading it in part is not safe was left
out, and the assessment went on as if it had never been there. An anastrozole statement whose
status was a number, or missing, or with a malformed modifier extension, made the patient "not on
an aromatase inhibitor" (not applicable: no card, no worklist row, no CarePlan); one whose
`coding` was an object instead of a list was not even reported (exit 0: the resource was judged
irrelevant without being validated). A hip fracture whose code was malformed was read without
its code, as an unknown condition: V13 HIGH became LOW in silence.

Now (facts.extract_facts, rules MED-FLAG-UNREADABLE and CAT-FINAL-RECORD-UNREAD): a medication
entry left out is flagged `medication-unresolved` whatever the AI status; any entry left out
makes a `low` category `indeterminate`, flag `record-unreadable`, with a DXA in 12 months; a
resource is never read without what says what it is (its code, its drug); and a resource whose
codes are not shaped as FHIR says is validated, so it is reported.
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
from fhir_aibl.validation import full_problem, needs_validation, salvage

from .conftest import FIXTURES
from .test_salvage import _bundle, _resource

AS_OF = dt.date(2026, 6, 1)
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


@pytest.fixture(scope="module")
def assessor() -> Assessor:
    return Assessor()


def _assess(tmp_path: Path, assessor: Assessor, bundle: dict):
    """(assessment, problems, the reader's record) of one patient's Bundle, read from a file."""
    (tmp_path / "record.json").write_text(json.dumps(bundle))
    read = read_paths([tmp_path / "record.json"], terminology=assessor.terminology)
    (record,) = read.patients
    return assess_record(assessor, record, AS_OF).assessment, read.problems, record


def _coding_object(r: dict) -> None:
    r["medicationCodeableConcept"]["coding"] = r["medicationCodeableConcept"]["coding"][0]


SPOILED_STATEMENTS = {
    "status a number": lambda r: r.__setitem__("status", 5),
    "status missing": lambda r: r.pop("status"),
    "modifier extension malformed": lambda r: r.__setitem__("modifierExtension", [{"url": "http://x.org/e", "valueString": 3}]),
    "coding an object": _coding_object,
    "drug code a number, no text": lambda r: r["medicationCodeableConcept"]["coding"][0].update(code=199224, display=None),
}


@pytest.mark.parametrize("spoil", SPOILED_STATEMENTS.values(), ids=SPOILED_STATEMENTS.keys())
def test_an_aromatase_inhibitor_that_cannot_be_read_is_flagged_never_silent(tmp_path, assessor, spoil):
    bundle = _bundle("V01")
    spoil(_resource(bundle, "v01-anastrozole"))
    assessment, problems, record = _assess(tmp_path, assessor, bundle)
    assert record.unreadable == ["MedicationStatement/v01-anastrozole"]
    assert [p.resource for p in problems] == ["MedicationStatement/v01-anastrozole"]  # reported, always
    assert "medication-unresolved" in assessment.flags
    assert "MED-FLAG-UNREADABLE" in assessment.rules
    assert "MedicationStatement/v01-anastrozole" in assessment.evidence
    assert assessment.finding("flag", "medication-unresolved").evidence == ("MedicationStatement/v01-anastrozole",)


def test_the_command_reports_it_lists_it_in_the_worklist_and_exits_1(tmp_path, capsys):
    bundle = _bundle("V01")
    _coding_object(_resource(bundle, "v01-anastrozole"))
    path = tmp_path / "v01.json"
    path.write_text(json.dumps(bundle))
    worklist = tmp_path / "worklist.csv"
    code = main(["assess", "--as-of", AS_OF.isoformat(), "--format", "json", "--worklist", str(worklist), str(path)])
    captured = capsys.readouterr()
    assert code == 1  # before: exit 0, nothing said, the patient not applicable
    assert "MedicationStatement/v01-anastrozole: fails FHIR R4 validation: medicationCodeableConcept.coding" in captured.err
    [assessment] = json.loads(captured.out)
    assert assessment["flags"] == ["medication-unresolved", "record-unreadable"]
    [row] = worklist.read_text().splitlines()[1:]  # the nurse navigator's list has the patient
    assert row.startswith("2,v01,not-applicable,none,A medication could not be read")


SPOILED_FRACTURES = {
    "code coding an object": lambda r: r["code"].__setitem__("coding", r["code"]["coding"][0]),
    "code a number": lambda r: r["code"]["coding"][0].__setitem__("code", 12345),
    "modifier extension malformed": lambda r: r.__setitem__("modifierExtension", [{"url": 5}]),
}


@pytest.mark.parametrize("spoil", SPOILED_FRACTURES.values(), ids=SPOILED_FRACTURES.keys())
def test_a_fracture_that_cannot_be_read_never_leaves_the_category_low(tmp_path, assessor, spoil):
    assert EXPECTED["V13"]["category"] == "high"
    bundle = _bundle("V13")
    spoil(_resource(bundle, "v13-fx-hip"))
    assessment, problems, record = _assess(tmp_path, assessor, bundle)
    assert record.unreadable == ["Condition/v13-fx-hip"]
    assert problems and problems[0].resource == "Condition/v13-fx-hip"
    # before: LOW (read without its code, or left out, the fracture was gone)
    assert assessment.category == "indeterminate"
    assert "record-unreadable" in assessment.flags and "dxa-12m" in assessment.recommendations
    flag = assessment.finding("flag", "record-unreadable")
    assert "Condition/v13-fx-hip" in flag.evidence and flag.value == 1
    assert "FLAG-RECORD-UNREAD" in flag.rules and "CAT-FINAL-RECORD-UNREAD" in assessment.rules


def test_an_unreadable_entry_of_a_high_record_keeps_the_category_and_says_so(tmp_path, assessor):
    bundle = _bundle("V13")
    bundle["entry"].append({"resource": {"resourceType": "Observation", "id": "v13-bmi-bad", "status": 7,
                                         "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5"}]},
                                         "subject": {"reference": "Patient/v13"}}})
    assessment, problems, record = _assess(tmp_path, assessor, bundle)
    assert record.unreadable == ["Observation/v13-bmi-bad"]
    assert assessment.category == EXPECTED["V13"]["category"]  # high stays high
    assert sorted(assessment.recommendations) == sorted(EXPECTED["V13"]["recommendations"])
    assert "record-unreadable" in assessment.flags  # the clinician is still told to check the chart


def test_a_whole_record_read_gives_the_expected_result_and_no_flag(tmp_path, assessor):
    for name in ("V01", "V13"):
        assessment, problems, record = _assess(tmp_path, assessor, _bundle(name))
        assert record.unreadable == [] and problems == []
        assert assessment.category == EXPECTED[name]["category"]
        assert "record-unreadable" not in assessment.flags


def test_a_condition_is_never_read_without_its_code_nor_a_medication_without_its_drug():
    for resource in (
        {"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/p"}, "code": {"coding": {"code": "x"}}},
        {"resourceType": "MedicationStatement", "id": "m", "status": "active", "subject": {"reference": "Patient/p"},
         "medicationCodeableConcept": {"coding": [{"code": 1}]}},
        {"resourceType": "FamilyMemberHistory", "id": "f", "status": "completed", "patient": {"reference": "Patient/p"},
         "relationship": {"coding": "MTH"}},
    ):
        problem = full_problem(resource)
        assert problem is not None and salvage(resource, problem) is None, resource["resourceType"]


def test_codes_not_shaped_as_fhir_says_are_always_validated(assessor):
    statement = {"resourceType": "MedicationStatement", "id": "m", "status": "active", "subject": {"reference": "Patient/p"},
                 "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "10324"}]}}
    assert not needs_validation(statement, assessor.terminology)  # tamoxifen, well formed: not read, not validated
    for spoil in (
        lambda r: r["medicationCodeableConcept"].__setitem__("coding", r["medicationCodeableConcept"]["coding"][0]),
        lambda r: r["medicationCodeableConcept"]["coding"][0].__setitem__("code", 10324),
        lambda r: r.__setitem__("medicationCodeableConcept", "tamoxifen"),
        lambda r: r["medicationCodeableConcept"].__setitem__("coding", ["10324"]),
    ):
        spoiled = copy.deepcopy(statement)
        spoil(spoiled)
        assert needs_validation(spoiled, assessor.terminology)


def test_several_workers_give_the_same(tmp_path, capsys):
    bundle = _bundle("V13")
    SPOILED_FRACTURES["code coding an object"](_resource(bundle, "v13-fx-hip"))
    other = _bundle("V01")
    SPOILED_STATEMENTS["status a number"](_resource(other, "v01-anastrozole"))
    for name, b in (("v13.json", bundle), ("v01.json", other)):
        (tmp_path / name).write_text(json.dumps(b))
    outputs = []
    for workers in ("1", "2"):
        code = main(["assess", "--as-of", AS_OF.isoformat(), "--format", "json", "--workers", workers, str(tmp_path)])
        outputs.append(json.loads(capsys.readouterr().out))
        assert code == 1
    assert outputs[0] == outputs[1]
    flags = {a["patient"]: a["flags"] for a in outputs[0]}
    assert flags == {"Patient/v01": ["medication-unresolved", "record-unreadable"], "Patient/v13": ["record-unreadable"]}


def test_a_family_history_keeps_its_condition_code_but_may_lose_a_malformed_onset():
    fmh = {"resourceType": "FamilyMemberHistory", "id": "f", "status": "completed", "patient": {"reference": "Patient/p"},
           "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]},
           "condition": [{"code": {"coding": [{"system": "http://snomed.info/sct", "code": "5913000"}]},
                          "onsetAge": {"value": "70"}}]}
    kept = salvage(fmh, full_problem(fmh))
    assert kept is not None and kept.removed == ("condition[0].onsetAge.value",)
    assert kept.resource["condition"][0]["code"] == fmh["condition"][0]["code"]
