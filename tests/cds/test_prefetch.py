"""Prefetch: templates from the value sets, sorting what the EHR sent, and keeping one patient's data only."""

from __future__ import annotations

import pytest

from fhir_aibl.cds.errors import BadRequestError
from fhir_aibl.cds.prefetch import KEY_TYPES, collect, default_templates, for_patient, patient_of, render, template_type
from fhir_aibl.cds.samples import patient_view_request, prefetch_for

from .conftest import bundle


@pytest.fixture(scope="module")
def templates(assessor):
    return default_templates(assessor.terminology)


def test_one_template_per_resource_type_the_rules_read(templates):
    assert {template_type(t) for t in templates.values()} == set(KEY_TYPES.values())
    assert templates["patient"] == "Patient/{{context.patientId}}"
    assert "_include" not in " ".join(templates.values())  # servers truncate them without a next link


def test_render_checks_the_patient_id(templates):
    assert render(templates["conditions"], "abc-1.2") == "Condition?patient=abc-1.2"
    for bad in ("a/b", "a&code=x", "", "x" * 65, "a b"):
        with pytest.raises(BadRequestError):
            render(templates["conditions"], bad)


def test_collect_sorts_present_null_missing_failed_and_incomplete(templates):
    prefetch = {
        "patient": {"resourceType": "Patient", "id": "p1"},
        "observations": None,
        "conditions": {"resourceType": "OperationOutcome", "issue": []},
        "medication-statements": {"resourceType": "Bundle", "type": "searchset", "link": [{"relation": "next", "url": "https://x/fhir/MedicationStatement?page=2"}], "entry": []},
        "their-own-key": {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"}}}]},
        "user": "123",
    }
    out = collect(prefetch, templates)
    assert sorted(out.missing) == sorted(
        ["conditions", "medication-requests", "medication-administrations", "family-history", "dxa-reports", "dxa-procedures", "dxa-orders"]
    )
    assert out.failed == ["conditions"]
    assert out.incomplete == {"medication-statements": "https://x/fhir/MedicationStatement?page=2"}
    assert {r["id"] for r, _ in out.resources} == {"p1", "c1"}


def test_no_prefetch_at_all_is_everything_missing(templates):
    assert collect(None, templates).missing == list(templates)


@pytest.mark.parametrize(
    "reference, expected",
    [
        ("Patient/p1", "p1"),
        ("https://ehr.example.org/fhir/Patient/p1", "p1"),
        ("Patient/p1/_history/3", "p1"),
        ("Group/g1", None),
        ("Patient?identifier=x|1", None),
        ("urn:uuid:unknown", None),
        ("", None),
    ],
)
def test_patient_of_reference_forms(reference, expected):
    assert patient_of({"resourceType": "Observation", "subject": {"reference": reference}}) == expected


def test_patient_of_urn_inside_its_bundle():
    urns = {"urn:uuid:1": ("Patient", "p1"), "urn:uuid:2": ("Practitioner", "d1")}
    assert patient_of({"resourceType": "Condition", "subject": {"reference": "urn:uuid:1"}}, urns) == "p1"
    assert patient_of({"resourceType": "Condition", "subject": {"reference": "urn:uuid:2"}}, urns) is None
    assert patient_of({"resourceType": "FamilyMemberHistory", "patient": {"reference": "Patient/p1"}}) == "p1"


def test_for_patient_keeps_only_the_patient_and_never_mutates_the_request():
    items = [
        ({"resourceType": "Patient", "id": "p2"}, {}),
        ({"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/p2"}}, {}),
        ({"resourceType": "Observation", "id": "o1", "subject": {"reference": "urn:uuid:9"}}, {"urn:uuid:9": ("Patient", "p1")}),
        ({"resourceType": "Observation", "id": "orphan"}, {}),
        ({"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"}}, {}),
        ({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "1"}}, {}),
        ({"resourceType": "Patient", "id": "p1", "meta": {"versionId": "2"}, "gender": "female"}, {}),
    ]
    out = for_patient(items, "p1")
    assert [(r["resourceType"], r["id"]) for r in out.resources] == [("Patient", "p1"), ("Observation", "o1")]
    assert out.resources[0]["gender"] == "female"  # the newer version
    assert out.resources[1]["subject"] == {"reference": "Patient/p1"}
    assert items[2][0]["subject"] == {"reference": "urn:uuid:9"}  # the request is untouched
    assert out.other_patient == 2 and out.unowned == 1


def test_sample_builder_fills_every_key_from_a_transaction_bundle():
    request = patient_view_request(bundle("V05"))  # a transaction with urn:uuid references
    assert request["context"]["patientId"] == "v05"
    assert set(request["prefetch"]) == set(KEY_TYPES)
    assert request["prefetch"]["patient"]["id"] == "v05"
    observations = request["prefetch"]["observations"]["entry"]
    assert observations and all(e["resource"]["subject"]["reference"] == "Patient/v05" for e in observations)


def test_sample_builder_needs_a_patient_when_the_bundle_has_several():
    merged = bundle("V01")
    merged["entry"] += bundle("V02")["entry"]
    with pytest.raises(ValueError, match="2 Patients"):
        patient_view_request(merged)
    assert prefetch_for(merged, "v02")["patient"]["id"] == "v02"
