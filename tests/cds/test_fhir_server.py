"""The fallback query against a real FHIR server (SEKMET, started by tests/fhir_server.py on 127.0.0.1).

Fixture records are loaded with a transaction (PUT, so their ids and references stay as they
are); then the hooks are called with no prefetch at all and `fhirServer` set to the server:
everything comes from the fallback queries built from the prefetch templates.
"""

from __future__ import annotations

import copy
import json
import uuid

import pytest
import requests

from fhir_aibl.cds.samples import draft_medication_request
from fhir_aibl.clinician_text import CATEGORY_WORDS

from ..fhir_server import SekmetUnavailable, sekmet_server, unavailable
from .conftest import OS, PV, bundle

CASES = ("V06", "V11", "V20", "V29", "V05")  # V05 is a transaction with urn:uuid references


def as_put_transaction(record: dict) -> dict:
    """A fixture Bundle as a transaction of PUTs by id, urn:uuid references turned into Type/id."""
    record = copy.deepcopy(record)
    urns = {e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in record["entry"] if str(e.get("fullUrl", "")).startswith("urn:")}
    text = json.dumps(record)
    for urn, ref in urns.items():
        text = text.replace(f'"{urn}"', f'"{ref}"')
    record = json.loads(text)
    entries = []
    for entry in record["entry"]:
        resource = entry["resource"]
        resource.pop("meta", None)
        entries.append({"resource": resource, "request": {"method": "PUT", "url": f"{resource['resourceType']}/{resource['id']}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


@pytest.fixture(scope="module")
def fhir_base(tmp_path_factory):
    try:
        with sekmet_server(tmp_path_factory.mktemp("cds-sekmet")) as base:
            for case in CASES:
                response = requests.post(base, json=as_put_transaction(bundle(case)), headers={"Content-Type": "application/fhir+json"}, timeout=60)
                assert response.status_code in (200, 201), (case, response.status_code, response.text[:500])
            yield base
    except SekmetUnavailable as exc:
        unavailable(str(exc))


def no_prefetch(patient_id: str, base: str, hook: str = "patient-view") -> dict:
    return {
        "hook": hook,
        "hookInstance": str(uuid.uuid4()),
        "fhirServer": base,
        "fhirAuthorization": {"access_token": "opaque-token", "token_type": "Bearer", "expires_in": 300, "scope": "user/*.read", "subject": "aibl"},
        "context": {"userId": "Practitioner/example", "patientId": patient_id},
    }


@pytest.mark.parametrize("case, category", [("V06", "high"), ("V11", "high"), ("V20", "indeterminate"), ("V29", "high"), ("V05", "moderate")])
def test_hook_without_prefetch_queries_the_allowlisted_server(make_app, fhir_base, case, category):
    harness = make_app(fhir={"allowlist": [fhir_base], "budget_seconds": 4.0}, request_deadline_seconds=10)
    response = harness.hook(PV, no_prefetch(case.lower(), fhir_base))
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert CATEGORY_WORDS[category] in cards[0]["summary"]
    text = json.dumps(cards)
    assert f"Patient/{case.lower()}" in text
    assert not any(f"Patient/{other.lower()}" in text for other in CASES if other != case)


def test_the_same_server_off_the_allowlist_is_412(make_app, fhir_base):
    harness = make_app(fhir={"allowlist": ["https://ehr.example.org/fhir"]})
    response = harness.hook(PV, no_prefetch("v06", fhir_base))
    assert response.status_code == 412


def test_order_select_without_prefetch(make_app, fhir_base):
    harness = make_app(fhir={"allowlist": [fhir_base], "budget_seconds": 4.0}, request_deadline_seconds=10)
    request = no_prefetch("v06", fhir_base, hook="order-select")
    draft = draft_medication_request("v06", "199224", "anastrozole 1 MG Oral Tablet")
    request["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": draft}]}
    cards = harness.hook(OS, request).json()["cards"]
    assert CATEGORY_WORDS["high"] in cards[0]["summary"]


def test_an_unknown_patient_is_412(make_app, fhir_base):
    harness = make_app(fhir={"allowlist": [fhir_base], "budget_seconds": 4.0}, request_deadline_seconds=10)
    response = harness.hook(PV, no_prefetch("nobody-here", fhir_base))
    assert response.status_code == 412
