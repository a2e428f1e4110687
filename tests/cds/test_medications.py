"""Medications by reference through the CDS Hooks service: in the prefetch (an `_include`), fetched
from fhirServer when the prefetch lacks them, and flagged, never silent, when they cannot be had."""

from __future__ import annotations

import copy

import responses

from fhir_aibl.cds.samples import patient_view_request

from .conftest import PV, bundle

FHIR = "https://ehr.example.org/fhir"


def _by_reference(request: dict, *, include: bool) -> tuple[dict, dict]:
    """The V06 request with its anastrozole statement pointing to a Medication; (request, Medication)."""
    request = copy.deepcopy(request)
    searchset = request["prefetch"]["medication-statements"]
    [entry] = [e for e in searchset["entry"] if e["resource"]["resourceType"] == "MedicationStatement"]
    medication = {"resourceType": "Medication", "id": "ana-1mg", "code": entry["resource"].pop("medicationCodeableConcept")}
    entry["resource"]["medicationReference"] = {"reference": "Medication/ana-1mg"}
    if include:  # as a server answers `_include=MedicationStatement:medication`
        searchset["entry"].append({"resource": medication, "search": {"mode": "include"}})
    return request, medication


def test_an_included_medication_is_read(make_app):
    full = patient_view_request(bundle("V06"))
    request, _ = _by_reference(full, include=True)
    harness = make_app()
    cards = harness.hook(PV, request).json()["cards"]
    assert cards[0]["summary"] == harness.hook(PV, full).json()["cards"][0]["summary"]


def test_a_missing_medication_is_fetched_from_fhir_server(make_app):
    full = patient_view_request(bundle("V06"), fhir_server=FHIR)
    request, medication = _by_reference(full, include=False)
    harness = make_app(fhir={"allowlist": [FHIR]})
    with responses.RequestsMock() as mock:
        mock.get(
            f"{FHIR}/Medication",
            json={"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": medication}]},
            match=[responses.matchers.query_param_matcher({"_id": "ana-1mg"})],
        )
        response = harness.hook(PV, request)
        assert len(mock.calls) == 1
    assert response.json()["cards"][0]["summary"] == harness.hook(PV, full).json()["cards"][0]["summary"]


def test_a_medication_that_cannot_be_had_is_a_warning_card_not_silence(make_app):
    full = patient_view_request(bundle("V06"))
    request, _ = _by_reference(full, include=False)
    harness = make_app()
    response = harness.hook(PV, request)
    assert response.status_code == 200
    [card] = response.json()["cards"]
    assert card["indicator"] == "warning"
    assert "could not be read" in card["summary"]
    assert "Check the medication list for an aromatase inhibitor" in card["detail"]
    assert "MED-FLAG-UNRESOLVED" not in card["detail"]  # rule ids are reviewer material


def test_a_failed_medication_fetch_still_answers_with_the_flag(make_app):
    full = patient_view_request(bundle("V06"), fhir_server=FHIR)
    request, _ = _by_reference(full, include=False)
    harness = make_app(fhir={"allowlist": [FHIR]})
    with responses.RequestsMock() as mock:
        mock.get(f"{FHIR}/Medication", status=500)
        response = harness.hook(PV, request)
    assert response.status_code == 200
    assert "could not be read" in response.json()["cards"][0]["summary"]


def test_order_select_draft_referencing_a_medication_entry_of_the_draft_bundle(make_app):
    """An order being written as Epic shapes it: the draft names `Medication/<id>`, the Medication
    travels in the same draftOrders Bundle."""
    from fhir_aibl.cds.samples import draft_medication_request, order_select_request

    from .conftest import OS

    record = bundle("V20")
    record["entry"] = [e for e in record["entry"] if e["resource"]["resourceType"] != "MedicationStatement"]
    draft = draft_medication_request("v20", "199224", "anastrozole 1 MG Oral Tablet")
    medication = {"resourceType": "Medication", "id": "ana", "code": draft.pop("medicationCodeableConcept")}
    draft["medicationReference"] = {"reference": "Medication/ana"}
    request = order_select_request(record, [draft])
    request["context"]["draftOrders"]["entry"].append({"resource": medication})
    cards = make_app().hook(OS, request).json()["cards"]
    assert cards and "aromatase inhibitor planned" in cards[0]["summary"]


def _all_by_reference(request: dict) -> dict:
    """Every medication of every medication searchset moved into an included Medication entry."""
    request = copy.deepcopy(request)
    for key in ("medication-statements", "medication-requests", "medication-administrations"):
        searchset = request["prefetch"].get(key)
        if not searchset:
            continue
        included = []
        for entry in searchset["entry"]:
            res = entry["resource"]
            if "medicationCodeableConcept" in res:
                mid = f"{res['id']}-med"
                included.append({"resource": {"resourceType": "Medication", "id": mid, "code": res.pop("medicationCodeableConcept")}, "search": {"mode": "include"}})
                res["medicationReference"] = {"reference": f"Medication/{mid}"}
        searchset["entry"] += included
    return request


def test_every_worked_example_answers_the_same_with_medications_by_reference(make_app, expected):
    harness = make_app()
    for vector in sorted(expected):
        full = patient_view_request(bundle(vector))
        want = harness.hook(PV, full).json()["cards"]
        got = harness.hook(PV, _all_by_reference(full)).json()["cards"]
        assert [(c["summary"], c["indicator"]) for c in got] == [(c["summary"], c["indicator"]) for c in want], vector
