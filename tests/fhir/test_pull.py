"""Pulling one patient: round trips per strategy, fallbacks when the server lacks batch or
`_revinclude`, vendor profiles, and the patient-safety checks (never another patient's data)."""

from __future__ import annotations

import dataclasses

import pytest

from fhir_aibl.fhir import PROFILES, FhirClient, Puller
from fhir_aibl.fhir.errors import ConfigError, CrossPatient, IgnoredParameter, NotSupported
from fhir_aibl.fhir.pull import PULL_TYPES, patient_elsewhere, patient_of

from .fakes import ALIAS, BASE, FakeFhir, fmh, ids, mock, observation, patient, record, statement

OURS = {"system": "urn:fhir-aibl:careplan", "value": "abc"}


def careplan(cid: str, pid: str, identifier: dict | None = None) -> dict:
    return {
        "resourceType": "CarePlan",
        "id": cid,
        "meta": {"versionId": "1"},
        "status": "draft",
        "intent": "proposal",
        "subject": {"reference": f"Patient/{pid}"},
        "identifier": [identifier] if identifier else [],
    }


def pull(fake: FakeFhir, pid: str = "p1", profile: str = "generic", careplans: bool = False, **changes):
    prof = dataclasses.replace(PROFILES[profile], **changes)
    client = FhirClient(BASE, profile=prof)
    client.http.sleep = lambda s: None
    puller = Puller(client, careplans=careplans)
    with mock() as rsps:
        fake.install(rsps)
        client.capabilities()
        fake.requests.clear()
        result = puller.pull(pid)
    return result, puller, client


def test_a_server_with_batch_gives_a_patient_in_one_round_trip():
    fake = FakeFhir(resources=record("p1") + record("p2"))
    result, _, _ = pull(fake)
    assert result.requests == 1 and result.strategy == "batch"
    assert [m for m, _ in fake.requests] == ["POST"]
    assert ids(result.resources) == ids(record("p1"))  # the Patient first, then PULL_TYPES order
    assert result.patient_ref == "Patient/p1" and result.warnings == []


def test_the_pull_reads_every_type_the_rules_read():
    fake = FakeFhir(resources=record("p1"))
    result, puller, _ = pull(fake)
    searches, unsearchable = puller.searches("p1")
    assert [s.resource_type for _, s in searches] == list(PULL_TYPES) and unsearchable == []
    assert all(s.params[0] == ("patient", "p1") and s.params[-1] == ("_count", "200") for _, s in searches)


def test_write_back_also_pulls_the_patients_fhir_aibl_careplans_in_the_same_round_trip():
    theirs = careplan("synthea-plan", "p1", {"system": "urn:other", "value": "x"})
    fake = FakeFhir(resources=record("p1") + [careplan("cp1", "p1", OURS), theirs, careplan("cp2", "p2", OURS)])
    result, _, _ = pull(fake, careplans=True)
    assert result.requests == 1
    assert [c["id"] for c in result.careplans] == ["cp1"]
    assert "CarePlan" not in {r["resourceType"] for r in result.resources}  # not assessment input


def test_a_server_that_refuses_batch_is_searched_type_by_type_and_remembered():
    fake = FakeFhir(resources=record("p1") + record("p2"), batch=False, revinclude=False)
    fake.capability_statement = False  # nothing declared: batch is tried, refused at run time
    result, puller, client = pull(fake, revinclude=False)
    assert result.strategy == "searches"
    assert [m for m, _ in fake.requests] == ["POST"] + ["GET"] * (1 + len(PULL_TYPES))
    assert ids(result.resources) == ids(record("p1"))
    assert any("refused a batch" in w for w in puller.warnings_once)
    with mock() as rsps:
        fake.install(rsps)
        fake.requests.clear()
        again = puller.pull("p2")
    assert "POST" not in [m for m, _ in fake.requests]  # not tried again
    assert again.requests == 1 + len(PULL_TYPES) and ids(again.resources) == ids(record("p2"))


def test_a_server_declaring_no_batch_is_not_sent_one():
    fake = FakeFhir(resources=record("p1"), batch=False, transaction=False)
    result, _, _ = pull(fake, revinclude=False)
    assert "POST" not in [m for m, _ in fake.requests] and result.strategy == "searches"


def test_without_batch_revinclude_pulls_in_one_round_trip():
    fake = FakeFhir(resources=record("p1") + record("p2"), batch=False)
    result, _, _ = pull(fake, batch=False)
    assert result.strategy == "revinclude" and result.requests == 1
    assert ids(result.resources) == ids(record("p1"))
    url = fake.requests[0][1]
    assert "_revinclude=Observation:patient" in url and "_revinclude=FamilyMemberHistory:patient" in url


def test_a_server_without_revinclude_is_searched_type_by_type():
    fake = FakeFhir(resources=record("p1"), batch=False, revinclude=False)
    fake.capability_statement = False
    result, puller, _ = pull(fake, batch=False)
    assert result.strategy == "searches"
    assert ids(result.resources) == ids(record("p1"))
    assert any("refused _revinclude" in w for w in puller.warnings_once)


def test_a_profile_can_turn_revinclude_off():
    fake = FakeFhir(resources=record("p1"), batch=False)
    result, _, _ = pull(fake, batch=False, revinclude=False)
    assert result.strategy == "searches" and result.requests == 1 + len(PULL_TYPES)
    assert not any("_revinclude" in u for _, u in fake.requests)


def test_epic_gets_a_category_on_every_observation_search():
    dexa = observation("o-img", "p1", category="imaging")
    lab = observation("o-lab", "p1", "62292-8", 30, category="laboratory")
    fake = FakeFhir(resources=[patient("p1"), dexa, lab, statement("s1", "p1")], batch=False, category_required=True)
    result, _, _ = pull(fake, profile="epic")
    searches = fake.searches_of("Observation")
    assert len(searches) == len(PROFILES["epic"].observation_categories)
    assert all("category=" in u for u in searches)
    assert {"Observation/o-img", "Observation/o-lab"} <= set(ids(result.resources))
    assert result.strategy == "searches"  # the epic profile uses neither batch nor _revinclude
    assert result.requests == 1 + len(PROFILES["epic"].observation_categories) + len(PULL_TYPES) - 1 == 16


def test_another_patients_resource_in_a_patient_search_fails_the_patient():
    stranger = {
        "resourceType": "Condition",
        "id": "c-p2",
        "subject": {"reference": "Patient/p2"},
        "code": {"text": "x"},
    }
    fake = FakeFhir(resources=record("p1") + [stranger], ignores_patient=frozenset({"Condition"}))
    with pytest.raises(CrossPatient, match="Condition/c-p2 of another patient"):
        pull(fake)


def test_a_search_the_server_says_it_ignored_fails_the_patient():
    fake = FakeFhir(
        resources=record("p1") + record("p2"), ignores_patient=frozenset({"Condition"}), reports_ignored=True
    )
    with pytest.raises(IgnoredParameter, match="parameter ignored"):
        pull(fake)


def test_a_type_the_server_cannot_search_by_patient_is_read_once_and_split_by_patient():
    fake = FakeFhir(
        resources=record("p1") + record("p2") + [fmh("orphan", "p3")], unsearchable=frozenset({"FamilyMemberHistory"})
    )
    result, puller, client = pull(fake)
    assert "FamilyMemberHistory/p1-fmh" in ids(result.resources)
    assert "FamilyMemberHistory/p2-fmh" not in ids(result.resources)
    assert result.requests == 2  # the batch, and the one scan of the type
    with mock() as rsps:
        fake.install(rsps)
        second = puller.pull("p2")
    assert second.requests == 1 and "FamilyMemberHistory/p2-fmh" in ids(second.resources)
    assert "FamilyMemberHistory/p1-fmh" not in ids(second.resources)


def test_unsearchable_types_can_be_skipped_or_fail_instead():
    fake = FakeFhir(resources=record("p1"), unsearchable=frozenset({"FamilyMemberHistory"}))
    skipped, _, _ = pull(fake, unsearchable="skip")
    assert "FamilyMemberHistory" not in {r["resourceType"] for r in skipped.resources}
    assert any("FamilyMemberHistory left out" in w for w in skipped.warnings)
    with pytest.raises(NotSupported, match="cannot search FamilyMemberHistory"):
        pull(fake, unsearchable="fail")


def test_resources_naming_no_patient_or_failing_validation_are_left_out_with_a_warning():
    loose = observation("loose", "p1")
    loose["subject"] = {"identifier": {"value": "MRN1"}}
    broken = observation("broken", "p1", "38267-1")  # a lumbar-spine T-score: the rules read it
    broken["status"] = 42  # not a code
    # a server matching `loose` to p1 by its identifier: here, one that answers every Observation
    fake = FakeFhir(resources=record("p1") + [broken, loose], ignores_patient=frozenset({"Observation"}))
    result, _, _ = pull(fake)
    assert "Observation/broken" not in ids(result.resources) and "Observation/loose" not in ids(result.resources)
    # an error of the patient (the run exits 1, as `assess` does for the same resource), not a warning
    assert any(w.startswith("Observation/broken: fails FHIR R4 validation, left out") for w in result.invalid)
    assert "Observation/loose: dropped, it names no patient this server holds" in result.warnings
    assert "Observation/p1-ls" in ids(result.resources)
    # both count as entries of p1's record that could not be read: never low, a drug flagged
    assert sorted(result.unreadable) == ["Observation/broken", "Observation/loose"]


@pytest.mark.parametrize("bad", ["1&patient=2", "../Group/x", "a b", "", "x" * 65])
def test_a_patient_id_that_is_not_a_fhir_id_is_refused_before_any_request(bad):
    fake = FakeFhir(resources=record("p1"))
    with pytest.raises(ConfigError, match="not a FHIR resource id"):
        pull(fake, pid=bad)
    assert fake.requests == []


def test_a_missing_patient_is_not_found():
    """No such Patient (404): the pull is not an error of its own; it returns what exists (nothing
    here, so the assessment says "nothing to assess"), and says the Patient is missing (issue 10)."""
    fake = FakeFhir(resources=record("p2"))
    result, _, _ = pull(fake, pid="nobody")
    assert result.resources == []
    assert result.warnings == ["Patient/nobody: the server has no such Patient resource"]


@pytest.mark.parametrize(
    "changes",
    [{}, {"revinclude": True}, {"revinclude": False}],
    ids=["batch", "revinclude-or-searches", "searches"],
)
def test_a_record_whose_patient_is_missing_still_pulls_its_resources(changes):
    """Resources that name a Patient the server does not have are still pulled, by every strategy
    (batch, _revinclude, type by type), so that they can be assessed with age unknown."""
    fake = FakeFhir(resources=[r for r in record("p1") if r["resourceType"] != "Patient"], batch=not changes)
    result, _, _ = pull(fake, **changes)
    assert ids(result.resources) == ids(record("p1")[1:])
    assert "Patient/p1: the server has no such Patient resource" in result.warnings


def test_newest_version_of_a_resource_seen_twice_is_kept():
    old = observation("o1", "p1", value=-1.0)
    new = dict(observation("o1", "p1", value=-2.0), meta={"versionId": "2"})
    lab = dict(new, category=[{"coding": [{"code": "laboratory"}]}])
    fake = FakeFhir(resources=[patient("p1"), old, lab], batch=False, category_required=True)
    result, _, _ = pull(fake, profile="epic", observation_categories=("imaging", "laboratory"))
    obs = [r for r in result.resources if r["resourceType"] == "Observation"]
    assert len(obs) == 1 and obs[0]["meta"]["versionId"] == "2"


def test_patient_references_are_read_strictly():
    base = "https://fhir.test/r4"
    assert patient_of({"resourceType": "Observation", "subject": {"reference": "Patient/a"}}, base) == "a"
    assert patient_of({"resourceType": "Observation", "subject": {"reference": "Patient/a/_history/3"}}, base) == "a"
    assert patient_of({"resourceType": "Observation", "subject": {"reference": f"{base}/Patient/a"}}, base) == "a"
    assert (
        patient_of({"resourceType": "Observation", "subject": {"reference": "https://other.test/Patient/a"}}, base)
        is None
    )
    assert patient_of({"resourceType": "Observation", "subject": {"reference": "Group/g"}}, base) is None
    assert patient_of({"resourceType": "FamilyMemberHistory", "patient": {"reference": "Patient/b"}}, base) == "b"
    assert patient_of({"resourceType": "Patient", "id": "c"}, base) == "c"


def test_a_resource_the_server_answers_for_this_patient_on_another_base_is_kept_with_a_warning():
    """A server behind a proxy, or known by two names, holds absolute references on a base other
    than the client's: its search by patient is what says whose they are. The aromatase inhibitor
    recorded that way must not make the patient look untreated (it was dropped before)."""
    resources = record("p1") + record("p2")
    for r in resources:
        if r["id"] in ("p1-ai", "p1-ls"):
            r["subject"]["reference"] = f"{ALIAS}/Patient/p1"
    stray = observation("p2-stray", "p2", "38267-1", -3.1)
    stray["subject"]["reference"] = f"{ALIAS}/Patient/p2"
    fake = FakeFhir(resources=resources + [stray])
    result, _, _ = pull(fake)
    assert {"MedicationStatement/p1-ai", "Observation/p1-ls"} <= set(ids(result.resources))
    assert f"MedicationStatement/p1-ai: names Patient/p1 on another base ({ALIAS}/Patient/p1); kept, as the server answered it for this patient" in result.warnings
    assert "Observation/p2-stray" not in ids(result.resources)  # p2's, whatever base: never p1's

    # a server that answers p2's Observation on the other base to a search for p1: never p1's
    fake = FakeFhir(resources=record("p1") + [stray], ignores_patient=frozenset({"Observation"}))
    result, _, _ = pull(fake)
    assert "Observation/p2-stray" not in ids(result.resources)
    assert "Observation/p2-stray: dropped, it names no patient this server holds" in result.warnings


def test_patient_elsewhere_names_only_absolute_references_on_another_base():
    base = "https://fhir.test/r4"
    def obs(ref):
        return {"resourceType": "Observation", "subject": {"reference": ref}}
    assert patient_elsewhere(obs("https://other.test/Patient/a"), base) == "a"
    assert patient_elsewhere(obs("https://other.test/Patient/a/_history/2"), base) == "a"
    assert patient_elsewhere(obs(f"{base}/Patient/a"), base) is None
    assert patient_elsewhere(obs("Patient/a"), base) is None
    assert patient_elsewhere(obs("https://other.test/Group/g"), base) is None


def test_only_what_the_rules_read_is_validated_with_one_memo_for_the_run(monkeypatch):
    """Issue 14: the pull validated every resource, with a new memo per patient."""
    from fhir_aibl.fhir import pull as pull_module

    unread = observation("heart-rate", "p1", "8867-4")  # a heart rate: no rule reads it
    unread["status"] = 42  # invalid, but never read: passed on unvalidated, as the file reader does
    fake = FakeFhir(resources=record("p1") + record("p2") + [unread])
    validated, memos = [], set()
    real = pull_module.validation_problem

    def spy(resource, memo=None):
        validated.append(f"{resource['resourceType']}/{resource['id']}")
        memos.add(id(memo))
        return real(resource, memo)

    monkeypatch.setattr(pull_module, "validation_problem", spy)
    with mock() as rsps:
        fake.install(rsps)
        client = FhirClient(BASE, profile=PROFILES["generic"])
        client.http.sleep = lambda s: None
        puller = Puller(client)
        first, second = puller.pull("p1"), puller.pull("p2")
    assert "Observation/heart-rate" in ids(first.resources) and "Observation/heart-rate" not in validated
    assert not any("heart-rate" in w for w in first.warnings)
    assert set(validated) == set(ids(first.resources + second.resources)) - {"Observation/heart-rate"}
    assert len(memos) == 1 and None not in memos
