"""What the reader validates: the resources the facts stage reads, and nothing else.

DESIGN.md: "parse what you use". The choice is `facts.reads_resource`, the same functions
the extractor calls before it reads a resource; these tests hold the reader and the
extractor to that one decision, on built resources and on every fixture and real record.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fhir_aibl import cli
from fhir_aibl.errors import InvalidResourceError
from fhir_aibl.facts import extract_facts, reads_resource
from fhir_aibl.sources import iter_records, read_paths

from .conftest import AS_OF, FIXTURES, SHARED_DATA

LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"


def write_bundle(path: Path, *resources: dict) -> Path:
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                "entry": [{"resource": r} for r in resources]}))
    return path


def patient(pid: str = "p1") -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1958-04-02"}


def observation(oid: str, code: str, pid: str = "p1", **extra) -> dict:
    return {
        "resourceType": "Observation", "id": oid, "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2026-01-10",
        "valueQuantity": {"value": -2.7, "system": "http://unitsofmeasure.org", "code": "{T-score}"},
        **extra,
    }


def heart_rate(oid: str, pid: str = "p1", **extra) -> dict:
    hr = observation(oid, "8867-4", pid, **extra)
    hr["valueQuantity"] = {"value": 72, "unit": "/min"}
    return hr


def ids(record) -> list[str]:
    return [r["id"] for r in record.resources]


# --------------------------------------------------------------------------- read -> validated


@pytest.mark.parametrize("bad", [{"status": 12}, {"valueQuantity": {"value": "abc"}}, {"effectiveDateTime": "01/10/2026"}])
def test_invalid_dxa_is_still_rejected_while_an_invalid_vital_sign_is_not_validated(tmp_path, bad):
    path = write_bundle(tmp_path / "b.json", patient(), observation("dxa-bad", "38267-1", **bad),
                        heart_rate("hr-bad", **bad), observation("dxa-good", "38267-1"))
    result = read_paths([path])
    (problem,) = result.problems
    assert isinstance(problem, InvalidResourceError) and problem.code == "resource-invalid"
    assert problem.resource == "Observation/dxa-bad" and problem.source == str(path)
    assert problem.message.startswith("fails FHIR R4 validation: ")
    # the heart rate is passed on as read: the facts stage never looks past its code; the DXA
    # result is left out, or, when only its value is malformed, read without it (validation.salvage)
    (record,) = result.patients
    if "valueQuantity" in bad:
        assert ids(record) == ["p1", "dxa-bad", "hr-bad", "dxa-good"]
        assert "valueQuantity" not in record.resources[1] and "read without valueQuantity" in problem.message
    else:
        assert ids(record) == ["p1", "hr-bad", "dxa-good"]


def test_rejection_message_is_the_one_full_validation_gives(tmp_path):
    """Selection decides whether to validate, never how: the message is unchanged."""
    from fhir_aibl.sources import _Item, _validate

    bad = observation("dxa-bad", "38267-1", status=12)
    path = write_bundle(tmp_path / "b.json", patient(), bad)
    (problem,) = read_paths([path]).problems
    assert str(problem) == str(_validate(_Item(bad, str(path), str(path), None)))


def test_each_read_kind_is_validated(tmp_path):
    """Patient, FamilyMemberHistory, recognised Condition and medications: invalid ones are rejected."""
    broken = {"meta": {"lastUpdated": "yesterday"}}
    resources = [
        {**patient(), **broken},
        {"resourceType": "FamilyMemberHistory", "id": "fmh", "status": "completed", "patient": {"reference": "Patient/p1"},
         "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]},
         **broken},
        {"resourceType": "Condition", "id": "c-read", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "M81.0"}]}, **broken},
        {"resourceType": "Condition", "id": "c-unread", "subject": {"reference": "Patient/p1"},
         "code": {"coding": [{"system": SNOMED, "code": "444814009"}]}, **broken},  # viral sinusitis
        {"resourceType": "MedicationStatement", "id": "ms-read", "status": "active", "subject": {"reference": "Patient/p1"},
         "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "199224"}]}, **broken},
        {"resourceType": "MedicationStatement", "id": "ms-unread", "status": "active", "subject": {"reference": "Patient/p1"},
         "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "197361"}]}, **broken},  # amlodipine
        {"resourceType": "MedicationRequest", "id": "mr-contained", "status": "active", "intent": "order",
         "subject": {"reference": "Patient/p1"}, "medicationReference": {"reference": "#m"},
         "contained": [{"resourceType": "Medication", "id": "m", "code": {"coding": [{"system": RXNORM, "code": "199224"}]}}],
         **broken},
    ]
    path = write_bundle(tmp_path / "b.json", *resources)
    result = read_paths([path])
    assert sorted(p.resource for p in result.problems) == sorted(
        ["Patient/p1", "FamilyMemberHistory/fmh", "Condition/c-read", "MedicationStatement/ms-read",
         "MedicationRequest/mr-contained"])
    assert all(isinstance(p, InvalidResourceError) and "lastUpdated" in p.message for p in result.problems)
    # each read without its malformed meta.lastUpdated (validation.salvage): reported, and used
    assert all("read without meta.lastUpdated" in p.message for p in result.problems)
    (record,) = result.patients
    assert sorted(ids(record)) == sorted(["p1", "fmh", "c-read", "c-unread", "ms-read", "ms-unread", "mr-contained"])
    assert all("lastUpdated" not in (r.get("meta") or {}) for r in record.resources if r["id"] not in ("c-unread", "ms-unread"))


def test_a_resource_the_test_cannot_read_is_validated(tmp_path):
    """A shape the recognition test trips over is validated (and rejected), never passed on unseen."""
    weird = heart_rate("hr-weird", component=7)
    assert reads_resource(patient(), _terminology()) is True
    with pytest.raises(TypeError):
        reads_resource(weird, _terminology())
    path = write_bundle(tmp_path / "b.json", patient(), weird)
    result = read_paths([path])
    assert [p.resource for p in result.problems] == ["Observation/hr-weird"]
    assert ids(result.patients[0]) == ["p1"]


def test_no_cross_talk_between_patients(tmp_path):
    path = tmp_path / "Observation.ndjson"
    lines = [observation("a-dxa", "38267-1", "pa", status=12), heart_rate("a-hr", "pa"),
             observation("b-dxa", "38267-1", "pb"), heart_rate("b-hr", "pb", status=12)]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    items = list(iter_records([path], spool_limit=1))
    problems = [i for i in items if isinstance(i, InvalidResourceError)]
    records = {i.patient_ref: i for i in items if not isinstance(i, InvalidResourceError)}
    assert [(p.resource, p.source) for p in problems] == [("Observation/a-dxa", f"{path}:1")]
    assert ids(records["Patient/pa"]) == ["a-hr"]
    assert ids(records["Patient/pb"]) == ["b-dxa", "b-hr"]


def test_terminology_decides_what_is_read(tmp_path, assessor):
    """The reader uses the value sets it is given: the assessor's, as the CLI passes them."""
    path = write_bundle(tmp_path / "b.json", patient(), heart_rate("hr-bad", status=12))
    assert read_paths([path], terminology=assessor.terminology).problems == []
    assert read_paths([path], validate=False).problems == []


# --------------------------------------------------------------------------- one decision, two users


def _terminology():
    from fhir_aibl.terminology import default_terminology

    return default_terminology()


def _records():
    paths = [FIXTURES / "bundles"]
    for rel in ("synthea-r4-osteoporosis/bundles", "fhir-r4-spec-examples", "mcode-stu4-examples"):
        if (SHARED_DATA / rel).exists():
            paths.append(SHARED_DATA / rel)
    return read_paths(paths, validate=False).patients


def test_what_is_not_read_changes_no_fact(assessor):
    """Every resource `reads_resource` rejects can be removed without changing any fact or problem."""
    term = assessor.terminology
    checked = 0
    for record in _records():
        unread = [r for r in record.resources if not reads_resource(r, term)]
        if not unread:
            continue
        kept = [r for r in record.resources if reads_resource(r, term)]
        full = extract_facts(record.patient_ref, copy.deepcopy(record.resources), AS_OF, term)
        only_read = extract_facts(record.patient_ref, kept, AS_OF, term)
        assert (full.facts, full.problems) == (only_read.facts, only_read.problems), record.patient_ref
        checked += 1
    assert checked > 0


def test_synthetic_population_unread_changes_no_fact(assessor):
    from fhir_aibl import synth

    term = assessor.terminology
    for i in range(40):
        resources = synth.patient_record(3, i, AS_OF)
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        kept = [r for r in resources if reads_resource(r, term)]
        assert len(kept) < len(resources)
        full = extract_facts(f"Patient/{pid}", resources, AS_OF, term)
        only_read = extract_facts(f"Patient/{pid}", kept, AS_OF, term)
        assert (full.facts, full.problems) == (only_read.facts, only_read.problems)


def test_cli_reports_an_invalid_dxa_and_not_an_invalid_heart_rate(capsys, tmp_path):
    path = write_bundle(tmp_path / "b.json", patient(), heart_rate("hr-bad", status=12),
                        observation("dxa-bad", "38267-1", valueQuantity={"value": "abc"}))
    code = cli.main(["assess", str(path), "--format", "json", "--as-of", AS_OF.isoformat()])
    out, err = capsys.readouterr()
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Observation/dxa-bad" in errors[0] and "valueQuantity" in errors[0]
    (item,) = json.loads(out)
    assert item["patient"] == "Patient/p1"
    # read without its malformed value: a scan whose result cannot be read, never a number
    assert "read without valueQuantity" in errors[0] and item["category"] != "low"
