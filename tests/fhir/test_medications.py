"""The connector and medications by reference: `_include`, reads by id, vendor shapes, and the
ways real servers allow a population to be found (`--all` by code and through the Medication,
`--group`, `--patients-file`).

The Epic- and Oracle-shaped answers are built here, from the vendors' public documentation
(nothing is copied from a vendor's or another project's files):

- Epic on FHIR, MedicationRequest.Search (Orders) R4 (fhir.epic.com, Specifications): the
  request names the drug with `medicationReference` to `Medication/<id>`, and the search Bundle
  carries the referenced Medication beside the requests with `search.mode` "include"; the
  Medication is coded RxNorm (product level, SCD). Epic searches are patient-scoped: no
  MedicationRequest search without a patient (the `epic` profile's population_search is off).
- Oracle Health (Cerner Millennium) FHIR R4, MedicationRequest (docs.oracle.com, Millennium
  R4 API): a medicationReference to a Medication on the same base, read by id
  (`GET Medication/<id>`); searches patient-scoped as well.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest
from urllib.parse import urlsplit

import requests

from fhir_aibl.fhir import PROFILES, FhirClient, Puller
from fhir_aibl.fhir.errors import ConfigError, NotSupported
from fhir_aibl.fhir.population import group_members, read_patients_file, select_population

from ..fhir_server import SekmetUnavailable, sekmet_server, unavailable
from .conftest import run_command, shared_assessor
from .fakes import BASE, FakeFhir, mock, observation, patient

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
AS_OF = "2026-06-01"


def medication(mid: str, code: str = "199224", system: str = RXNORM, display: str = "anastrozole 1 MG Oral Tablet") -> dict:
    return {"resourceType": "Medication", "id": mid, "code": {"coding": [{"system": system, "code": code, "display": display}]}}


def order(rid: str, pid: str, reference: str, status: str = "active", display: str | None = None) -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "meta": {"versionId": "1"},
        "status": status,
        "intent": "order",
        "medicationReference": {"reference": reference, **({"display": display} if display else {})},
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": "2025-01-01",
        "dosageInstruction": [{"timing": {"repeat": {"boundsPeriod": {"start": "2025-01-01"}}}}],
    }


class EpicShaped(FakeFhir):
    """Answers a MedicationRequest search with the referenced Medications as search.mode include, unasked."""

    def search(self, rtype, params):
        status, bundle = super().search(rtype, params)
        if rtype == "MedicationRequest" and status == 200:
            wanted = {
                e["resource"]["medicationReference"]["reference"].split("/")[-1]
                for e in bundle["entry"]
                if "medicationReference" in e["resource"]
            }
            bundle["entry"] += [
                {"fullUrl": f"{self.base}/Medication/{m['id']}", "resource": m, "search": {"mode": "include"}}
                for m in self.resources
                if m["resourceType"] == "Medication" and m["id"] in wanted
            ]
        return status, bundle


def _medication_calls(fake: FakeFhir) -> list[str]:
    """Requests to the Medication type: reads, searches (batches are POSTs to the base)."""
    return [u for _m, u in fake.requests if "Medication" in urlsplit(u).path.split("/")[-2:]]


def _record(pid: str, reference: str) -> list[dict]:
    return [patient(pid), observation(f"{pid}-ls", pid, "38267-1", -2.2), order(f"{pid}-ai", pid, reference)]


def _pull(fake: FakeFhir, pids: list[str], profile: str):
    client = FhirClient(BASE, profile=PROFILES[profile])
    client.http.sleep = lambda s: None
    puller = Puller(client)
    with mock() as rsps:
        fake.install(rsps)
        client.capabilities()
        fake.requests.clear()
        pulls = [puller.pull(pid) for pid in pids]
    return pulls, puller


def _assess(pull):
    return shared_assessor().assess(pull.patient_ref, pull.resources, dt.date(2026, 6, 1)).assessment


def test_epic_shaped_included_medication_is_read_without_another_request():
    fake = EpicShaped(resources=_record("e1", "Medication/eAnaXYZ") + [medication("eAnaXYZ")], batch=False, revinclude=False, category_required=True)
    [pulled], _ = _pull(fake, ["e1"], "epic")
    assert not _medication_calls(fake)
    [req] = [r for r in pulled.resources if r["resourceType"] == "MedicationRequest"]
    assert req["medicationReference"]["reference"] == "#eAnaXYZ" and req["contained"][0]["code"]["coding"][0]["code"] == "199224"
    assessment = _assess(pulled)
    assert assessment.ai_status == "active" and "medication-unresolved" not in assessment.flags


def test_oracle_shaped_medication_is_read_by_id_once_per_run():
    absolute = f"{BASE}/Medication/m-ana"
    fake = FakeFhir(resources=_record("o1", absolute) + _record("o2", "Medication/m-ana") + [medication("m-ana")], batch=False, revinclude=False)
    pulls, _ = _pull(fake, ["o1", "o2"], "oracle")
    assert len(_medication_calls(fake)) == 1  # the second patient's reference is answered from the run's Medications
    assert all(_assess(p).ai_status == "active" for p in pulls)


def test_a_medication_the_server_does_not_have_is_flagged_not_dropped():
    fake = FakeFhir(resources=_record("o1", "Medication/gone"), batch=False, revinclude=False)
    [pulled], puller = _pull(fake, ["o1"], "oracle")
    assessment = _assess(pulled)
    assert assessment.ai_status == "none" and "medication-unresolved" in assessment.flags
    assert any("Medication/gone" in w for w in puller.warnings_once)


def test_an_unreadable_medication_whose_display_names_the_drug_is_assessed_by_text():
    resources = [patient("o1"), order("o1-ai", "o1", "Medication/gone", display="Arimidex 1 mg tablet")]
    [pulled], _ = _pull(FakeFhir(resources=resources, batch=False, revinclude=False), ["o1"], "oracle")
    assessment = _assess(pulled)
    assert assessment.ai_status == "active" and "medication-by-text" in assessment.flags


def test_a_medication_on_another_server_is_never_fetched_from_this_one():
    fake = FakeFhir(resources=_record("o1", "https://elsewhere.example/fhir/Medication/m-ana") + [medication("m-ana")])
    [pulled], _ = _pull(fake, ["o1"], "generic")
    assert not _medication_calls(fake)
    assert "medication-unresolved" in _assess(pulled).flags


def test_with_batch_the_missing_medications_come_in_one_batch():
    fake = FakeFhir(resources=_record("g1", "Medication/m-ana") + [medication("m-ana")])
    [pulled], _ = _pull(fake, ["g1"], "generic")
    assert [m for m, _ in fake.requests] == ["POST", "POST"]  # the patient's batch, then the Medication reads
    assert _assess(pulled).ai_status == "active"


def test_all_on_a_profile_without_population_search_names_the_alternatives():
    for profile in ("epic", "oracle"):
        client = FhirClient(BASE, profile=PROFILES[profile])
        with pytest.raises(NotSupported) as info:
            select_population(client, shared_assessor().terminology)
        assert "--group ID" in str(info.value) and "--patients-file FILE" in str(info.value) and "--patient" in str(info.value)


def test_all_on_epic_exits_2_with_the_message(tmp_path):
    with mock() as rsps:
        FakeFhir(resources=[]).install(rsps)
        result = run_command("--fhir-base", BASE, "--all", "--profile", "epic", "--as-of", AS_OF)
    assert result.code == 2
    assert "--group ID" in result.stderr and "--patients-file FILE" in result.stderr


def test_group_members_are_the_population():
    group = {
        "resourceType": "Group",
        "id": "onc-registry",
        "type": "person",
        "actual": True,
        "member": [
            {"entity": {"reference": "Patient/o1"}},
            {"entity": {"reference": f"{BASE}/Patient/o2"}},
            {"entity": {"reference": "Patient/o3"}, "inactive": True},
            {"entity": {"reference": "https://elsewhere.example/fhir/Patient/x"}},
            {"entity": {"reference": "Practitioner/d1"}},
        ],
    }
    fake = FakeFhir(resources=[group])
    client = FhirClient(BASE, profile=PROFILES["epic"])
    with mock() as rsps:
        fake.install(rsps)
        population = group_members(client, "onc-registry")
    assert population.patient_ids == ["o1", "o2"]
    assert len(population.rejected) == 3


def test_run_group_and_patients_file_on_an_epic_shaped_server(tmp_path):
    resources = _record("e1", "Medication/eAna") + _record("e2", "Medication/eAna") + [medication("eAna")]
    resources.append({"resourceType": "Group", "id": "g", "type": "person", "actual": True, "member": [{"entity": {"reference": "Patient/e1"}}]})
    fake = EpicShaped(resources=resources, batch=False, revinclude=False, category_required=True)
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# oncology clinic list\ne1\n\nPatient/e2  # second\n")
    with mock() as rsps:
        fake.install(rsps)
        by_group = run_command("--fhir-base", BASE, "--group", "g", "--profile", "epic", "--as-of", AS_OF, "--format", "json")
        by_file = run_command("--fhir-base", BASE, "--patients-file", str(ids_file), "--profile", "epic", "--as-of", AS_OF, "--format", "json")
    assert by_group.code == 0, by_group.stderr
    assert [r["patient"] for r in by_group.json()] == ["Patient/e1"]
    assert by_file.code == 0, by_file.stderr
    assert [(r["patient"], r["ai_status"]) for r in by_file.json()] == [("Patient/e1", "active"), ("Patient/e2", "active")]


@pytest.mark.parametrize("content, why", [("p1\nnot an id!\n", ":2: not a patient id"), ("# nothing\n\n", "no patient id")])
def test_a_bad_patients_file_stops_the_run(tmp_path, content, why):
    path = tmp_path / "ids.txt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=why):
        read_patients_file(path)
    result = run_command("--fhir-base", BASE, "--patients-file", str(path))
    assert result.code == 2 and why in result.stderr


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def sekmet(tmp_path_factory):
    try:
        with sekmet_server(tmp_path_factory.mktemp("sekmet-med")) as base:
            yield base
    except SekmetUnavailable as exc:
        unavailable(str(exc))


def _put(base: str, resource: dict) -> None:
    response = requests.put(
        f"{base}/{resource['resourceType']}/{resource['id']}", json=resource, headers={"Content-Type": "application/fhir+json"}, timeout=30
    )
    assert response.status_code in (200, 201), response.text


def test_on_a_real_server_all_finds_a_drug_given_only_by_reference(sekmet):
    """SEKMET declares `medication` and `_include=MedicationRequest:medication`: the chained search
    finds the patient the code search cannot, and the pull brings the Medication by _include."""
    for resource in (
        medication("sk-ana"),
        medication("sk-met", code="6809", display="metformin"),
        *_record("sk1", "Medication/sk-ana"),
        *_record("sk2", "Medication/sk-met"),
        {"resourceType": "Group", "id": "sk-registry", "type": "person", "actual": True, "member": [{"entity": {"reference": "Patient/sk1"}}]},
    ):
        _put(sekmet, resource)
    client = FhirClient(sekmet, profile=PROFILES["generic"])
    population = select_population(client, shared_assessor().terminology)
    assert population.patient_ids == ["sk1"]
    # without the chained search (a server or profile that does not allow it) she is not found by code
    plain = FhirClient(sekmet, profile=dataclasses.replace(PROFILES["generic"], chained_medication_search=False))
    assert select_population(plain, shared_assessor().terminology).patient_ids == []

    result = run_command("--fhir-base", sekmet, "--all", "--as-of", AS_OF, "--format", "json")
    assert result.code == 0, result.stderr
    [found] = result.json()
    assert found["patient"] == "Patient/sk1" and found["ai_status"] == "active" and "medication-unresolved" not in found["flags"]

    puller = Puller(FhirClient(sekmet, profile=PROFILES["generic"]))
    puller.pull("sk2")  # the run's first pull reads the CapabilityStatement and scans FamilyMemberHistory once
    pulled = puller.pull("sk1")
    assert pulled.requests == 1  # the Medication came with the batch's _include, no second request
    assert pulled.resources[-1]["contained"][0]["id"] == "sk-ana"

    by_group = run_command("--fhir-base", sekmet, "--group", "sk-registry", "--as-of", AS_OF, "--format", "json")
    assert by_group.code == 0 and [r["patient"] for r in by_group.json()] == ["Patient/sk1"]


def test_on_a_real_server_a_hapi_profile_reads_the_medication_by_id(sekmet):
    for resource in (medication("sk-let", code="72965", display="letrozole"), *_record("sk3", "Medication/sk-let")):
        _put(sekmet, resource)
    puller = Puller(FhirClient(sekmet, profile=PROFILES["hapi"]))  # no _include (truncation seen on HAPI)
    puller.pull("sk2")  # CapabilityStatement and the FamilyMemberHistory scan, once per run
    pulled = puller.pull("sk3")
    assert pulled.requests == 2  # the batch, then one batch of Medication reads
    assessment = _assess(pulled)
    assert assessment.ai_status == "active"


def test_json_of_examples_is_not_written(tmp_path):
    """Nothing fetched from another repository is kept: the shapes above are built in code."""
    assert not list(Path(__file__).parent.glob("*.ndjson"))
    assert json.dumps(medication("x"))


def test_the_run_summary_counts_unread_and_by_name_medications(tmp_path):
    resources = [patient("o1"), order("o1-ai", "o1", "Medication/gone"), patient("o2"), order("o2-ai", "o2", "Medication/gone2", display="Femara")]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("o1\no2\n")
    with mock() as rsps:
        FakeFhir(resources=resources, batch=False, revinclude=False).install(rsps)
        result = run_command("--fhir-base", BASE, "--patients-file", str(ids_file), "--profile", "oracle", "--as-of", AS_OF)
    assert result.code == 0, result.stderr
    assert "medications: 1 patient(s) with a medication that could not be read (medication-unresolved), 1 with an aromatase inhibitor recognised by name only" in result.stderr
    assert "warning: Patient/o1: MedicationRequest/o1-ai/_history/1: its medication (Medication/gone) could not be found" in result.stderr


def test_on_a_real_server_every_worked_example_by_reference_gives_the_expected_result(sekmet, tmp_path):
    """The worked examples with every medication moved to a Medication resource of its own, loaded
    into SEKMET: `run` gives each its expected result, with `_include` (generic) and with the
    Medications read by id (hapi)."""
    from tests.test_medications import EXPECTED, VECTORS, _got, _want, referenced_variant

    from .loading import load_files

    files = []
    for vector in VECTORS:
        path = tmp_path / f"{vector}.json"
        path.write_text(json.dumps(referenced_variant(json.loads((Path(__file__).parents[2] / "fixtures" / "bundles" / f"{vector}.json").read_text()), "relative", medications_first=False)))
        files.append(path)
    load_files(sekmet, files)
    ids = [v.lower() for v in VECTORS]
    for profile in ("generic", "hapi"):
        result = run_command("--fhir-base", sekmet, "--patient", *ids, "--profile", profile, "--as-of", AS_OF, "--format", "json")
        assert result.code == 0, result.stderr
        got = {r["patient"]: r for r in result.json()}
        for vector in VECTORS:
            assert _got(got[f"Patient/{vector.lower()}"]) == _want(vector), (profile, vector, EXPECTED[vector]["note"])
        assert "medication-unresolved" not in result.stderr


def test_an_aromatase_inhibitor_the_server_holds_malformed_is_flagged_through_the_run(tmp_path):
    """The connector leaves out a statement that fails validation (its status a number) and the
    run reports it; the patient is still flagged, never "not on an aromatase inhibitor" in silence
    (tests/test_unreadable_entries.py has the reader's side)."""
    broken = order("o1-ai", "o1", "Medication/m1")
    broken["status"] = 5
    resources = [patient("o1"), observation("o1-ls", "o1", "38267-1", -2.2), broken, medication("m1")]
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("o1\n")
    with mock() as rsps:
        FakeFhir(resources=resources, batch=False, revinclude=False).install(rsps)
        result = run_command("--fhir-base", BASE, "--patients-file", str(ids_file), "--profile", "oracle",
                             "--as-of", AS_OF, "--format", "json", "--explain")
    assert result.code == 1, result.stderr  # an invalid resource is an error of the run
    assert "MedicationRequest/o1-ai: fails FHIR R4 validation, left out" in result.stderr
    [assessment] = json.loads(result.stdout)
    assert assessment["flags"] == ["medication-unresolved", "record-unreadable"]
    assert "MED-FLAG-UNREADABLE" in assessment["rules"]
