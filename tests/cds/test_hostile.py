"""The hostile corpus (tests/hostile/generate.py) through the CDS service: never a 500.

A case spliced into a prefetch as one of the patient's resources: JSON that is not JSON or
that FHIR JSON forbids (a duplicate key, nesting too deep) makes the request body invalid,
400 with an OperationOutcome; a parsed but invalid resource is left out with a note on the
card (or, if that leaves too little, 412). A case sent as the whole body: 400.
"""

from __future__ import annotations

import json

import pytest

from fhir_aibl.cds.samples import patient_view_request

from ..fhir.fakes import record
from ..hostile.generate import cases
from .conftest import PV

RECORD = record("p2")
TARGET = next(r for r in RECORD if r["id"] == "p2-ls")
CASES = cases(TARGET, other_patient="Patient/p1")
HEADERS = {"Content-Type": "application/json"}


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.fixture(scope="module")
def request_bytes() -> bytes:
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in RECORD]}
    body = compact(patient_view_request(bundle))
    assert body.count(compact(TARGET)) == 1
    return body


def check_answer(response, allowed: tuple[int, ...]) -> dict:
    assert response.status_code in allowed, response.text[:300]
    body = response.json()
    if response.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0]["details"]["text"]
    return body


@pytest.mark.parametrize("case", [c for c in CASES if c.spliceable], ids=lambda c: c.name)
def test_one_hostile_prefetched_resource(case, make_app, request_bytes):
    app = make_app()
    body = request_bytes.replace(compact(TARGET), case.data)
    response = app.client.post(f"/cds-services/{PV}", content=body, headers=HEADERS)
    if case.expect in ("not-json", "refused"):
        answer = check_answer(response, (400,))
        assert answer["issue"][0]["details"]["coding"][0]["code"] == "cds-bad-request"
        return
    answer = check_answer(response, (200, 412))
    if response.status_code == 200:
        text = json.dumps(answer)
        assert answer["cards"]
        if case.name not in ("subject-null",):  # a resource naming no patient is dropped unread
            # the clinician hears that a result could not be read, or only in part (the details go to the log)
            assert ("on record could not be read and" in text and "not used" in text) or (
                "on record could be read only in part" in text) or (
                "Check the chart for entries that could not be read" in text), case.name


@pytest.mark.parametrize("case", [c for c in CASES if not c.spliceable], ids=lambda c: c.name)
def test_a_hostile_body(case, make_app):
    response = make_app().client.post(f"/cds-services/{PV}", content=case.data, headers=HEADERS)
    check_answer(response, (400,))


def test_a_duplicate_t_score_value_is_refused_not_read_as_the_last_one(make_app, request_bytes):
    """Issue 10, item 5: `-3.0` then `1.0` under one `value` was read as 1.0."""
    quantity = compact(TARGET["valueQuantity"])
    body = request_bytes.replace(quantity, quantity[:-1] + b',"value":1.0}')
    response = make_app().client.post(f"/cds-services/{PV}", content=body, headers=HEADERS)
    assert response.status_code == 400
    assert "duplicate key 'value'" in response.json()["issue"][0]["details"]["text"]


def test_deep_nesting_is_400_not_500(make_app, request_bytes):
    """Issue 10, item 3: ~125 levels of nested extension answered 500 (RecursionError)."""
    deep = next(c for c in CASES if c.name == "deep-extension")
    response = make_app().client.post(f"/cds-services/{PV}", content=request_bytes.replace(compact(TARGET), deep.data),
                                      headers=HEADERS)
    assert response.status_code == 400
    assert "nested deeper than 64 levels" in response.json()["issue"][0]["details"]["text"]
