"""The file source: real FHIR R4 data from ../shared/data, and broken input built in tmp_path."""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_aibl.errors import (
    InputError,
    InvalidResourceError,
    NoUsableDataError,
    NotFhirError,
    NotJsonError,
)
from fhir_aibl.sources import RELEVANT_TYPES, PatientRecord, ReadResult, iter_records, read_paths

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SPEC = DATA / "fhir-r4-spec-examples"
SYNTHEA = DATA / "synthea-r4-osteoporosis"
BULK = DATA / "synthea-r4-bulk-10-patients"
MCODE = DATA / "mcode-stu4-examples"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (expected ../shared/data beside the repository)")
    return path


def by_ref(result: ReadResult) -> dict[str, PatientRecord]:
    return {rec.patient_ref: rec for rec in result.patients}


def ids(record: PatientRecord, rtype: str) -> list[str]:
    return [r["id"] for r in record.resources if r["resourceType"] == rtype]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def patient(pid: str, **extra) -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "female", **extra}


def obs(oid: str, subject: str | None, **extra) -> dict:
    res = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "38265-5"}]},
        "valueQuantity": {"value": -2.6, "system": "http://unitsofmeasure.org", "code": "{T-score}"},
        **extra,
    }
    if subject is not None:
        res["subject"] = {"reference": subject}
    return res


# --------------------------------------------------------------------------- real data


def test_synthea_transaction_bundles_group_one_record_per_patient():
    bundles = need(SYNTHEA / "bundles")
    with open(SYNTHEA / "manifest.csv", newline="") as fh:
        manifest = list(csv.DictReader(fh))
    result = read_paths([bundles])

    assert result.problems == []
    assert [r.patient_ref for r in result.patients] == sorted(f"Patient/{row['patient_id']}" for row in manifest)
    records = by_ref(result)
    for row in manifest:
        rec = records[f"Patient/{row['patient_id']}"]
        assert rec.resources[0]["resourceType"] == "Patient" and rec.resources[0]["id"] == row["patient_id"]
        assert ids(rec, "Observation"), row["file"]
        assert rec.sources == [str(bundles / row["file"])]
        assert {r["resourceType"] for r in rec.resources} <= RELEVANT_TYPES
        # urn:uuid subjects were rewritten to the one form later stages read
        for res in rec.resources[1:]:
            assert res["subject"]["reference"] == rec.patient_ref
        if row["dxa_tscore_38265_5"]:
            codes = {c["code"] for r in rec.resources if r["resourceType"] == "Observation" for c in r["code"]["coding"]}
            assert "38265-5" in codes
        if "904419" in row["bone_meds"]:
            meds = [r for r in rec.resources if r["resourceType"] == "MedicationRequest"]
            assert any(c["code"] == "904419" for m in meds for c in m["medicationCodeableConcept"]["coding"])


def test_bulk_ndjson_directory():
    bulk = need(BULK)
    result = read_paths([bulk])
    assert result.problems == []
    lines = {name: sum(1 for line in open(bulk / name) if line.strip()) for name in
             ("Patient.000.ndjson", "Condition.000.ndjson", "MedicationRequest.000.ndjson")}
    assert len(result.patients) == lines["Patient.000.ndjson"]
    assert sum(len(r.resources) for r in result.patients) == sum(lines.values())
    records = by_ref(result)
    rec = records["Patient/129c6ac7-8d06-89de-ad63-0204a93e76c3"]
    assert rec.resources[0]["resourceType"] == "Patient"
    assert rec.sources[0] == str(bulk / "Condition.000.ndjson")  # directory order: sorted file names
    assert str(bulk / "Patient.000.ndjson") in rec.sources
    conditions = [r for r in rec.resources if r["resourceType"] == "Condition"]
    assert any(c["code"] == "254837009" for r in conditions for c in r["code"]["coding"])


def test_iter_records_on_bulk_yields_sorted_records():
    bulk = need(BULK)
    out = list(iter_records(str(bulk / "Patient.000.ndjson")))  # one path as a plain string
    assert all(isinstance(x, PatientRecord) for x in out)
    assert [r.patient_ref for r in out] == sorted(r.patient_ref for r in out)
    assert all(len(r.resources) == 1 for r in out)  # a Patient with nothing else is still a record


def test_mcode_collection_bundle_jenny_m():
    path = need(MCODE / "Bundle-mcode-patient-bundle-jenny-m.json")
    result = read_paths([path])
    assert result.problems == []
    assert [r.patient_ref for r in result.patients] == ["Patient/cancer-patient-jenny-m"]
    rec = result.patients[0]
    assert rec.resources[0]["id"] == "cancer-patient-jenny-m"
    anastrozole = [
        r for r in rec.resources
        if r["resourceType"] == "MedicationRequest"
        and any(c.get("code") == "84857" for c in r["medicationCodeableConcept"]["coding"])
    ]
    assert len(anastrozole) == 1
    assert ids(rec, "FamilyMemberHistory")  # grouped through `patient`, not `subject`


def test_patient_in_two_files_merges_into_one_record():
    bundle = need(MCODE / "Bundle-mcode-patient-bundle-jenny-m.json")
    single = MCODE / "Patient-cancer-patient-jenny-m.json"
    result = read_paths([bundle, single])
    assert len(result.patients) == 1
    rec = result.patients[0]
    assert ids(rec, "Patient") == ["cancer-patient-jenny-m"]
    assert rec.sources == [str(bundle)]  # the duplicate Patient (no versions) was not kept: the first wins


def test_mcode_directory_reports_non_fhir_json_and_reads_the_rest():
    mcode = need(MCODE)
    result = read_paths([mcode])
    assert [(type(p), p.source) for p in result.problems] == [(NotFhirError, str(mcode / "package.json"))]
    assert "Patient/cancer-patient-jenny-m" in by_ref(result)


def test_spec_bmd_observation_validates():
    path = need(SPEC / "Observation-bmd.json")
    result = read_paths([path], validate=True)
    assert result.problems == []
    (rec,) = result.patients
    assert rec.patient_ref == "Patient/pat2"
    assert rec.resources[0]["valueQuantity"]["code"] == "g/cm-2"
    # a group without a Patient resource is still a record; with it, the Patient comes first
    both = read_paths([path, SPEC / "Patient-pat2.json"])
    assert [r["resourceType"] for r in both.patients[0].resources] == ["Patient", "Observation"]


def test_spec_transaction_bundle_ids_from_urn_uuid():
    path = need(SPEC / "Bundle-bundle-transaction.json")
    result = read_paths([path])
    assert result.problems == []  # DELETE/GET entries without a resource and Parameters are skipped
    assert [r.patient_ref for r in result.patients] == sorted(
        [
            "Patient/61ebe359-bfdc-4613-8bf2-c5e300945f0a",
            "Patient/88f151c0-a954-468a-88bd-5ae15c08e059",
            "Patient/74891afc-ed52-42a2-bcd7-f13d9b60f096",
            "Patient/123",
            "Patient/123a",
        ]
    )
    for rec in result.patients:
        assert rec.resources[0]["id"] == rec.patient_ref.split("/", 1)[1]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("Bundle-bundle-response.json", ["Patient/12423"]),
        ("Bundle-bundle-response-medsallergies.json", ["Patient/example"]),
        ("Bundle-bundle-response-simplesummary.json", ["Patient/example"]),
    ],
)
def test_spec_response_bundles(name, expected):
    result = read_paths([need(SPEC / name)])
    assert result.problems == []
    assert [r.patient_ref for r in result.patients] == expected
    assert result.patients[0].resources[0]["meta"]["versionId"] == "1"


def test_spec_reference_forms():
    path = need(SPEC / "Bundle-bundle-references.json")
    result = read_paths([path])
    records = by_ref(result)
    uuid = "04121321-4af5-424c-a0e1-ed3aab1c349d"
    # relative and absolute references to the same patient
    assert ids(records["Patient/23"], "Observation") == ["123", "124"]
    # urn:uuid resolved inside the Bundle; the id-less Patient takes the uuid as its id
    assert ids(records[f"Patient/{uuid}"], "Patient") == [uuid]
    assert records[f"Patient/{uuid}"].resources[1]["subject"] == {"reference": f"Patient/{uuid}"}
    # versioned reference: history dropped; duplicate Patient/45: versionId 2 wins
    rec45 = records["Patient/45"]
    assert ids(rec45, "Observation") == ["47"]
    assert [r["meta"]["versionId"] for r in rec45.resources if r["resourceType"] == "Patient"] == ["2"]
    assert rec45.resources[1]["subject"]["reference"] == "Patient/45/_history/2"  # not rewritten
    # an identifier-only subject names no patient
    (problem,) = result.problems
    assert isinstance(problem, NoUsableDataError)
    assert problem.resource == "Observation/48" and problem.source == str(path)
    assert "no patient reference" in problem.message


def test_spec_examples_directory_never_raises():
    spec = need(SPEC)
    result = read_paths([spec])
    assert result.patients
    assert all(isinstance(p, InputError) for p in result.problems)
    assert not any(isinstance(p, InvalidResourceError) for p in result.problems)
    assert "Patient/pat2" in by_ref(result)


# --------------------------------------------------------------------------- unhappy paths


def test_not_json_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"resourceType": "Patient", "id": ', encoding="utf-8")
    result = read_paths([bad])
    assert result.patients == []
    (problem,) = result.problems
    assert isinstance(problem, NotJsonError) and problem.code == "not-json"
    assert problem.source == str(bad) and str(bad) in str(problem)


def test_missing_path_and_non_regular_file(tmp_path):
    result = read_paths([tmp_path / "nope.json"])
    (problem,) = result.problems
    assert type(problem) is InputError and "no such file" in problem.message
    assert problem.source == str(tmp_path / "nope.json")
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    (problem,) = read_paths([fifo]).problems
    assert type(problem) is InputError and "not a regular file" in problem.message


def test_ndjson_bad_line_names_its_number_and_other_lines_survive(tmp_path):
    path = tmp_path / "Observation.000.ndjson"
    lines = [
        json.dumps(patient("p1")),
        json.dumps(obs("o1", "Patient/p1")),
        "{this is not json",
        json.dumps(obs("o2", "Patient/p1")),
        "",
        json.dumps({"id": "x"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_paths([path])
    assert [(type(p), p.source) for p in result.problems] == [
        (NotJsonError, f"{path}:3"),
        (NotFhirError, f"{path}:6"),
    ]
    assert "line 3" in result.problems[0].message
    (rec,) = result.patients
    assert [r["id"] for r in rec.resources] == ["p1", "o1", "o2"]
    assert rec.sources == [str(path)]


@pytest.mark.parametrize("content", [{"id": "1", "status": "final"}, [1, 2], "text", {"resourceType": 5}])
def test_json_without_resource_type_is_not_fhir(tmp_path, content):
    path = write_json(tmp_path / "thing.json", content)
    result = read_paths([path])
    (problem,) = result.problems
    assert isinstance(problem, NotFhirError) and problem.source == str(path)
    assert "resourceType" in problem.message


def test_bundle_entry_without_resource_type(tmp_path):
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": patient("p1")}, {"resource": {"id": "x"}}, "junk", {"resource": obs("o1", "Patient/p1")}],
    }
    path = write_json(tmp_path / "b.json", bundle)
    result = read_paths([path])
    assert [(type(p), p.resource) for p in result.problems] == [(NotFhirError, "entry[1]"), (NotFhirError, "entry[2]")]
    assert ids(result.patients[0], "Observation") == ["o1"]


@pytest.mark.parametrize(
    "bad_field, where, kept",
    [
        ({"status": 12}, "status", ["p1", "good"]),  # its status unreadable: it might be refuted; left out
        ({"valueQuantity": {"value": "abc"}}, "valueQuantity.value", ["p1", "good", "bad"]),  # read without its value
    ],
)
def test_invalid_observation_is_dropped_and_the_rest_survive(tmp_path, bad_field, where, kept):
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in (patient("p1"), obs("good", "Patient/p1"), obs("bad", "Patient/p1", **bad_field))],
    }
    path = write_json(tmp_path / "b.json", bundle)
    result = read_paths([path])
    (problem,) = result.problems
    assert isinstance(problem, InvalidResourceError) and problem.code == "resource-invalid"
    assert problem.resource == "Observation/bad" and problem.source == str(path)
    assert where in problem.message and len(problem.message) < 400
    assert [r["id"] for r in result.patients[0].resources] == kept
    if "bad" in kept:  # read without its invalid value: a value-less Observation, which can reassure no one
        assert "valueQuantity" not in result.patients[0].resources[-1] and "read without valueQuantity" in problem.message
    # without validation the resource goes through untouched
    unchecked = read_paths([path], validate=False)
    assert unchecked.problems == []
    assert [r["id"] for r in unchecked.patients[0].resources] == ["p1", "good", "bad"]


def test_invalid_resource_in_ndjson_names_the_line(tmp_path):
    path = tmp_path / "Observation.ndjson"
    path.write_text("\n".join(json.dumps(r) for r in (obs("a", "Patient/p"), obs("b", "Patient/p", status=12))))
    result = read_paths([path])
    (problem,) = result.problems
    assert problem.source == f"{path}:2" and problem.resource == "Observation/b"
    assert ids(result.patients[0], "Observation") == ["a"]


def test_resources_without_a_patient(tmp_path):
    files = [
        write_json(tmp_path / "a.json", obs("nosubj", None)),
        write_json(tmp_path / "b.json", obs("group", "Group/g1")),
        write_json(tmp_path / "c.json", obs("urn", "urn:uuid:5b6e7b2d-8f7e-4d6a-9a57-07b4c2d1c3a1")),  # no Bundle to resolve in
        write_json(tmp_path / "d.json", obs("cond", "Patient?identifier=x|1")),
        write_json(tmp_path / "e.json", {"resourceType": "Patient", "gender": "male"}),
        write_json(tmp_path / "f.json", {"resourceType": "Organization", "id": "org"}),  # irrelevant: skipped silently
    ]
    result = read_paths(files)
    assert result.patients == []
    assert [p.resource for p in result.problems] == [
        "Observation/nosubj", "Observation/group", "Observation/urn", "Observation/cond", "Patient"
    ]
    assert all(isinstance(p, NoUsableDataError) for p in result.problems)
    assert "Group" in result.problems[1].message and "does not resolve" in result.problems[2].message


def test_absolute_and_versioned_references(tmp_path):
    files = [
        write_json(tmp_path / "a.json", obs("o1", "https://ehr.example.org/fhir/R4/Patient/abc")),
        write_json(tmp_path / "b.json", obs("o2", "Patient/abc/_history/7")),
        write_json(tmp_path / "c.json", {"resourceType": "FamilyMemberHistory", "id": "f1", "status": "completed",
                                         "patient": {"reference": "Patient/abc"},
                                         "relationship": {"coding": [{"code": "MTH"}]}}),
    ]
    result = read_paths(files)
    assert result.problems == []
    (rec,) = result.patients
    assert rec.patient_ref == "Patient/abc"
    assert [r["id"] for r in rec.resources] == ["o1", "o2", "f1"]
    assert rec.sources == [str(f) for f in files]
    assert rec.resources[0]["subject"]["reference"] == "https://ehr.example.org/fhir/R4/Patient/abc"  # untouched


def test_transaction_entry_without_id_gets_uuid_and_nothing_else_changes(tmp_path):
    p_uuid, o_uuid = "0f0e9a55-1e51-4e0c-9d0a-6bb1b2c7b6e1", "5d3e2f4a-3b7c-4b9e-8f1a-2c6d7e8f9a0b"
    observation = obs("x", f"urn:uuid:{p_uuid}", meta={"versionId": "3"})
    del observation["id"]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            # the Observation comes first: urn references may point forward
            {"fullUrl": f"urn:uuid:{o_uuid}", "resource": observation, "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": f"urn:uuid:{p_uuid}", "resource": {"resourceType": "Patient", "gender": "female"},
             "request": {"method": "POST", "url": "Patient"}},
        ],
    }
    before = copy.deepcopy(bundle)
    path = write_json(tmp_path / "tx.json", bundle)
    (rec,) = read_paths([path]).patients
    assert rec.patient_ref == f"Patient/{p_uuid}"
    pat, ob = rec.resources
    assert pat == {**before["entry"][1]["resource"], "id": p_uuid}
    expected = copy.deepcopy(before["entry"][0]["resource"])
    expected["id"] = o_uuid
    expected["subject"]["reference"] = f"Patient/{p_uuid}"
    assert ob == expected and ob["meta"]["versionId"] == "3"


def test_nested_bundle_resolves_urns_inside_itself(tmp_path):
    p_uuid = "9a1c1a51-7a55-4c38-b2a4-39a0f0b3a7d2"
    inner = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": f"urn:uuid:{p_uuid}", "resource": patient("inner-p")},
            {"fullUrl": "urn:uuid:11111111-2222-3333-4444-555555555555", "resource": obs("o1", f"urn:uuid:{p_uuid}")},
        ],
    }
    outer = {"resourceType": "Bundle", "type": "batch-response",
             "entry": [{"resource": patient("outer-p")}, {"resource": inner, "response": {"status": "200"}}]}
    result = read_paths([write_json(tmp_path / "b.json", outer)])
    assert result.problems == []
    records = by_ref(result)
    assert ids(records["Patient/inner-p"], "Observation") == ["o1"]  # the resource id wins over the fullUrl uuid
    assert records["Patient/inner-p"].resources[1]["subject"]["reference"] == "Patient/inner-p"
    assert "Patient/outer-p" in records


def test_nested_bundle_problem_names_its_entry_path(tmp_path):
    inner = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"nope": 1}}]}
    outer = {"resourceType": "Bundle", "type": "batch-response", "entry": [{"resource": patient("p")}, {"resource": inner}]}
    (problem,) = read_paths([write_json(tmp_path / "b.json", outer)]).problems
    assert problem.resource == "entry[1].entry[0]"


@pytest.mark.parametrize(
    "metas, winner",
    [
        ([{"versionId": "1"}, {"versionId": "3"}, {"versionId": "2"}], 1),
        ([{"versionId": "10"}, {"versionId": "9"}], 0),  # numbers, not strings
        ([{"lastUpdated": "2020-01-01T00:00:00Z"}, {"lastUpdated": "2021-06-01T10:00:00+02:00"}], 1),
        ([{}, {}], 0),  # nothing to compare: the first read wins
        ([{"versionId": "2"}, {"versionId": "2"}], 0),
    ],
)
def test_duplicate_resource_keeps_newest_version(tmp_path, metas, winner):
    files = [
        write_json(tmp_path / f"{i}.json", obs("dup", "Patient/p", meta=meta, note=[{"text": f"copy {i}"}]))
        for i, meta in enumerate(metas)
    ]
    result = read_paths(files)
    assert result.problems == []
    (rec,) = result.patients
    (kept,) = rec.resources
    assert kept["note"][0]["text"] == f"copy {winner}"


def test_newer_duplicate_moving_to_another_patient(tmp_path):
    files = [
        write_json(tmp_path / "1.json", obs("o", "Patient/a", meta={"versionId": "1"})),
        write_json(tmp_path / "2.json", obs("o", "Patient/b", meta={"versionId": "2"})),
    ]
    assert [r.patient_ref for r in read_paths(files).patients] == ["Patient/b"]


def test_directory_mixing_everything(tmp_path):
    root = tmp_path / "export"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("ignored: not .json/.ndjson")
    (root / "a-broken.json").write_text("<html>not json</html>")
    write_json(root / "b-norestype.json", {"id": "1"})
    write_json(root / "c-patient.json", patient("p2"))
    write_json(root / ".hidden" / "x.json", {"junk": True})
    write_json(root / "sub" / "d-bad-obs.json", obs("bad", "Patient/p1", status=12))
    write_json(root / "sub" / "e-dup.json", obs("o1", "Patient/p1", meta={"versionId": "2"}))
    (root / "Observation.ndjson").write_text(
        "\n".join([json.dumps(obs("o1", "Patient/p1", meta={"versionId": "1"})), "nope", json.dumps(patient("p1"))])
    )
    if (SPEC / "Observation-bmd.json").exists():
        shutil.copy(SPEC / "Observation-bmd.json", root / "sub" / "f-bmd.json")

    out = list(iter_records([root]))
    records = [x for x in out if isinstance(x, PatientRecord)]
    problems = [x for x in out if isinstance(x, InputError)]
    # reading problems come first, in sorted file order; validation problems come with their record
    assert [(type(p).__name__, Path(p.source).name) for p in problems] == [
        ("NotJsonError", "Observation.ndjson:2"),
        ("NotJsonError", "a-broken.json"),
        ("NotFhirError", "b-norestype.json"),
        ("InvalidResourceError", "d-bad-obs.json"),
    ]
    refs = [r.patient_ref for r in records]
    assert refs == sorted(refs)
    by = {r.patient_ref: r for r in records}
    p1 = by["Patient/p1"]
    assert [r["id"] for r in p1.resources] == ["p1", "o1"]
    assert p1.resources[1]["meta"]["versionId"] == "2"
    assert by["Patient/p2"].resources == [patient("p2")]
    if (SPEC / "Observation-bmd.json").exists():
        assert ids(by["Patient/pat2"], "Observation") == ["bmd"]
    # read_paths gives the same answer
    again = read_paths([root])
    assert [r.patient_ref for r in again.patients] == refs
    assert [str(p) for p in again.problems] == [str(p) for p in problems]


def test_empty_input():
    assert read_paths([]) == ReadResult(patients=[], problems=[])


_ids = st.from_regex(r"[A-Za-z0-9\-.]{1,64}", fullmatch=True)
_bases = st.sampled_from(["", "https://ehr.example.org/fhir/", "http://localhost:8080/baseR4/", "Patient/../"])


@settings(max_examples=60, deadline=None)
@given(pid=_ids, base=_bases, version=st.none() | st.integers(min_value=1, max_value=10**6))
def test_reference_forms_all_name_the_same_patient(tmp_path_factory, pid, base, version):
    ref = f"{base}Patient/{pid}" + (f"/_history/{version}" if version else "")
    tmp = tmp_path_factory.mktemp("refs")
    result = read_paths([write_json(tmp / "o.json", obs("o", ref))], validate=False)
    assert result.problems == []
    assert [r.patient_ref for r in result.patients] == [f"Patient/{pid}"]
