"""The store of `run --bulk --incremental` (fhir_aibl/bulk/store.py): newest wins, who changed, one transaction."""

from __future__ import annotations

from fhir_aibl.bulk.store import CarePlans, Store
from fhir_aibl.careplan import IDENTIFIER_SYSTEM


def obs(oid: str, patient: str, version: str | None = None, status: str = "final", **extra) -> dict:
    resource = {"resourceType": "Observation", "id": oid, "status": status, "subject": {"reference": f"Patient/{patient}"}}
    if version is not None:
        resource["meta"] = {"versionId": version}
    return {**resource, **extra}


def fresh(tmp_path) -> Store:
    store = Store(tmp_path)
    store.begin()
    return store


def test_newest_wins_and_an_update_to_entered_in_error_takes_effect(tmp_path):
    store = fresh(tmp_path)
    store.merge(obs("o1", "p1", "2"))
    store.merge(obs("o1", "p1", "1", status="amended"))  # an older copy: the stored one is newer
    assert [r["status"] for r in store.resources_of("p1")] == ["final"]
    store.merge(obs("o1", "p1", "3", status="entered-in-error"))
    assert [r["status"] for r in store.resources_of("p1")] == ["entered-in-error"]
    store.merge(obs("o1", "p1", status="cancelled"))  # no version to compare: the later export wins
    assert [r["status"] for r in store.resources_of("p1")] == ["cancelled"]


def test_who_changed_a_patient_a_moved_resource_and_a_medication_they_reference(tmp_path):
    store = fresh(tmp_path)
    for resource in (
        {"resourceType": "Patient", "id": "p1"}, {"resourceType": "Patient", "id": "p2"},
        {"resourceType": "Patient", "id": "p3"},
        obs("o1", "p1"),
        {"resourceType": "MedicationStatement", "id": "ms1", "status": "active",
         "subject": {"reference": "Patient/p2"}, "medicationReference": {"reference": "Medication/m1"}},
        {"resourceType": "Medication", "id": "m1", "ingredient": [{"itemReference": {"reference": "Substance/s1"}}]},
        {"resourceType": "Substance", "id": "s1"},
    ):
        store.merge(resource)
    store.commit("t1", {})
    store.begin()
    assert store.changed() == set()
    store.merge({"resourceType": "Substance", "id": "s1", "code": {"text": "anastrozole"}})
    assert store.changed() == {"p2"}  # through the Medication that names the Substance
    store.merge(obs("o1", "p3"))  # the Observation now names another patient: both records change
    assert store.changed() == {"p1", "p2", "p3"}
    assert list(store.resources_of("p1")) == [{"resourceType": "Patient", "id": "p1"}]
    assert list(store.patients()) == ["p1", "p2", "p3"]


def test_a_careplan_is_kept_for_the_write_back_and_changes_no_assessment(tmp_path):
    store = fresh(tmp_path)
    plan = {"resourceType": "CarePlan", "id": "cp1", "status": "active", "intent": "plan",
            "subject": {"reference": "Patient/p1"}, "identifier": [{"system": IDENTIFIER_SYSTEM, "value": "x"}]}
    other = {**plan, "id": "cp0", "identifier": [{"system": "urn:other", "value": "y"}]}
    store.merge(plan)
    store.merge(other)
    assert store.changed() == set() and list(store.patients()) == []
    assert [p["id"] for p in CarePlans(store, "https://ehr.example/fhir").get("p1")] == ["cp1"]
    assert CarePlans(store, "https://ehr.example/fhir").get("p2", []) == []


def test_nothing_is_kept_without_a_commit(tmp_path):
    store = fresh(tmp_path)
    store.merge(obs("o1", "p1"))
    store.keep_assessment("p1", "2026-06-01", "rules", "{}")
    store.commit("t1", {"level": "system"})
    store.close()
    again = Store(tmp_path)
    again.begin()
    again.merge(obs("o2", "p1"))
    again.forget_assessment("p1")
    again.close()  # interrupted: rolled back
    last = Store(tmp_path)
    assert last.transaction_time == "t1" and last.export_settings() == {"level": "system"}
    assert [r["id"] for r in last.resources_of("p1")] == ["o1"] and last.assessment("p1")[0] == "2026-06-01"
    last.close()


def test_what_the_store_cannot_place_is_refused(tmp_path):
    store = fresh(tmp_path)
    assert not store.merge({"resourceType": "Observation", "id": "x", "status": "final"})  # names no patient
    assert not store.merge({"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/p1"}})
    assert not store.merge({"id": "no-type"})
    assert list(store.patients()) == []


def test_what_the_store_cannot_place_is_read_by_the_reader_and_reported(tmp_path):
    import json

    from fhir_aibl.bulk.incremental import Incremental
    from fhir_aibl.errors import InputError
    from fhir_aibl.sources import iter_records

    export = tmp_path / "export"
    export.mkdir()
    (export / "Patient.000.ndjson").write_text(json.dumps({"resourceType": "Patient", "id": "p1", "gender": "female"}) + "\n")
    (export / "Observation.000.ndjson").write_text(
        "{not json\n" + json.dumps({"resourceType": "Observation", "id": "o9", "status": "final", "code": {"text": "x"}}) + "\n"
        + json.dumps(obs("o1", "p1")) + "\n"
    )
    run = Incremental(tmp_path / "out", full=False, settings={})
    try:
        run.merge(sorted(export.iterdir()))
        paths = run.prepare("2026-06-01", "rules")
        outcomes = list(iter_records(paths, validate=False))
    finally:
        run.close()
    problems = [o for o in outcomes if isinstance(o, InputError)]
    records = [o for o in outcomes if not isinstance(o, InputError)]
    assert len(problems) == 2 and any("no patient reference" in str(p) for p in problems)  # not lost silently
    assert [r.patient_ref for r in records] == ["Patient/p1"]
    assert sorted(r["id"] for r in records[0].resources) == ["o1", "p1"]
