"""The hook endpoints end to end: discovery, answers per clinical case, prefetch semantics, the
fallback query and its allowlist, order-select, request validation, limits, CORS."""

from __future__ import annotations

import copy
import json
import threading

import pytest
import responses

from fhir_aibl.careplan import RECOMMENDATION_SYSTEM
from fhir_aibl.clinician_text import CATEGORY_WORDS, RISK_FACTOR_WORDS
from fhir_aibl.cds.fhirfetch import allowed
from fhir_aibl.cds.prefetch import KEY_TYPES
from fhir_aibl.cds.samples import draft_medication_request, order_select_request, patient_view_request

from .conftest import OS, PV, bundle

FHIR = "https://ehr.example.org/fhir"


def outcome(response) -> tuple[str, str]:
    issue = response.json()["issue"][0]
    return issue["details"]["coding"][0]["code"], issue["details"]["text"]


# --------------------------------------------------------------------------- discovery


def test_discovery_lists_both_services_with_prefetch(make_app):
    services = make_app().client.get("/cds-services").json()["services"]
    by_id = {s["id"]: s for s in services}
    assert by_id[PV]["hook"] == "patient-view" and by_id[OS]["hook"] == "order-select"
    for service in services:
        assert service["title"] and service["description"] and service["usageRequirements"]
        assert set(service["prefetch"]) == set(KEY_TYPES)
        assert all("{{context.patientId}}" in t for t in service["prefetch"].values())
    observations = by_id[PV]["prefetch"]["observations"]
    # The code list comes from the value sets: DXA (lumbar spine T-score), BMI, smoking status.
    assert "38267-1" in observations and "39156-5" in observations and "72166-2" in observations


def test_configured_service_ids_and_templates(make_app):
    harness = make_app(patient_view_id="bone", prefetch={"patient": "Patient/{{context.patientId}}"})
    services = harness.client.get("/cds-services").json()["services"]
    assert {s["id"] for s in services} == {"bone", OS}
    assert services[0]["prefetch"] == {"patient": "Patient/{{context.patientId}}"}


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "case, indicator, category",
    [("V06", "warning", "high"), ("V04", "warning", "moderate"), ("V01", "info", "low"), ("V20", "info", "indeterminate")],
)
def test_indicator_follows_the_category(make_app, case, indicator, category):
    cards = make_app().hook(PV, patient_view_request(bundle(case))).json()["cards"]
    main = cards[0]
    assert main["indicator"] == indicator
    assert CATEGORY_WORDS[category] in main["summary"]
    assert all(c["indicator"] != "critical" for c in cards)


@pytest.mark.parametrize("case", ["V31", "V32", "V33", "V34", "V35"])
def test_no_card_when_not_applicable(make_app, case):
    response = make_app().hook(PV, patient_view_request(bundle(case)))
    assert response.status_code == 200 and response.json() == {"cards": []}


def test_every_case_of_the_clinical_vectors_answers_about_its_patient(make_app, expected):
    harness = make_app()
    for case, exp in expected.items():
        cards = harness.hook(PV, patient_view_request(bundle(case))).json()["cards"]
        if exp["category"] == "not-applicable":
            assert cards == [], case
            continue
        assert CATEGORY_WORDS[exp["category"]] in cards[0]["summary"], case
        # Every recommendation is an activity of the proposed CarePlan, coded (the card's text names no code).
        plan = next(a["resource"] for s in cards[0]["suggestions"] for a in s["actions"] if a["resource"]["resourceType"] == "CarePlan")
        coded = {c["code"] for act in plan.get("activity", []) for c in act["detail"]["code"]["coding"] if c["system"] == RECOMMENDATION_SYSTEM}
        assert coded == set(exp["recommendations"]), case
        for rf in exp["risk_factors"]:
            assert RISK_FACTOR_WORDS[rf] in cards[0]["detail"], (case, rf)
        text = json.dumps(cards)
        assert f"Patient/{case.lower()}" in text
        assert not any(f"Patient/{other.lower()}" in text for other in expected if other != case)


# --------------------------------------------------------------------------- prefetch semantics


def test_null_prefetch_means_no_data(make_app):
    request = patient_view_request(bundle("V06"))
    request["prefetch"]["observations"] = None  # "no such data": no DXA, no smoking
    cards = make_app().hook(PV, request).json()["cards"]
    assert CATEGORY_WORDS["indeterminate"] in cards[0]["summary"]


def test_missing_keys_without_fhir_server_is_412(make_app):
    request = patient_view_request(bundle("V06"))
    del request["prefetch"]["observations"]
    response = make_app().hook(PV, request)
    assert response.status_code == 412
    code, text = outcome(response)
    assert code == "cds-data-unavailable" and "observations" in text and "no fhirServer" in text


def test_an_operation_outcome_is_unavailable(make_app):
    request = patient_view_request(bundle("V06"))
    request["prefetch"]["conditions"] = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "timeout"}]}
    response = make_app().hook(PV, request)
    assert response.status_code == 412
    assert "prefetch failed for conditions" in outcome(response)[1]


def test_a_fhir_server_off_the_allowlist_is_never_queried(make_app):
    request = patient_view_request(bundle("V06"), fhir_server="http://10.0.0.5/fhir")
    del request["prefetch"]["observations"]
    harness = make_app(fhir={"allowlist": [FHIR]})
    with responses.RequestsMock() as mock:  # any call at all fails the test
        response = harness.hook(PV, request)
        assert not mock.calls
    assert response.status_code == 412
    assert "not on this service's allowlist" in outcome(response)[1]


@pytest.mark.parametrize(
    "url, ok",
    [
        (FHIR, True),
        (FHIR + "/", True),
        ("https://EHR.example.org/fhir", True),
        ("https://ehr.example.org:443/fhir", True),
        ("https://ehr.example.org/fhir/tenant1", True),
        ("https://ehr.example.org/fhir-other", False),
        ("https://ehr.example.org", False),
        ("http://ehr.example.org/fhir", False),
        ("https://ehr.example.org:8443/fhir", False),
        ("https://ehr.example.org.evil.com/fhir", False),
        ("https://user:pw@ehr.example.org/fhir", False),
        ("https://evil.com/?x=https://ehr.example.org/fhir", False),
        ("file:///etc/passwd", False),
        ("not a url", False),
    ],
)
def test_allowlist_matching(url, ok):
    assert allowed(url, [FHIR]) is ok


def _searchset(resources, next_url=None):
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": r} for r in resources]}
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def test_missing_keys_are_fetched_from_an_allowlisted_server_with_the_token(make_app):
    full = patient_view_request(bundle("V06"), fhir_server=FHIR)
    request = copy.deepcopy(full)
    request["fhirAuthorization"] = {"access_token": "secret-token", "token_type": "Bearer", "expires_in": 300, "scope": "user/*.read", "subject": "aibl"}
    observations = [e["resource"] for e in full["prefetch"]["observations"]["entry"]]
    del request["prefetch"]["observations"]
    harness = make_app(fhir={"allowlist": [FHIR]})
    with responses.RequestsMock() as mock:
        # Two pages: the second through the `next` link.
        mock.get(f"{FHIR}/Observation", json=_searchset(observations[:3], f"{FHIR}/Observation?page=2"), match=[responses.matchers.query_param_matcher({"patient": "v06"}, strict_match=False)])
        mock.get(f"{FHIR}/Observation", json=_searchset(observations[3:]), match=[responses.matchers.query_param_matcher({"page": "2"})])
        response = harness.hook(PV, request)
        assert response.status_code == 200, response.text
        assert len(mock.calls) == 2
        assert all(c.request.headers["Authorization"] == "Bearer secret-token" for c in mock.calls)
        assert "code=" in mock.calls[0].request.url
    assert CATEGORY_WORDS["high"] in response.json()["cards"][0]["summary"]
    assert response.json()["cards"][0]["summary"] == harness.hook(PV, full).json()["cards"][0]["summary"]


def test_an_incomplete_prefetch_search_is_completed(make_app):
    full = patient_view_request(bundle("V06"), fhir_server=FHIR)
    request = copy.deepcopy(full)
    entries = request["prefetch"]["observations"]["entry"]
    rest = [e["resource"] for e in entries[2:]]
    request["prefetch"]["observations"]["entry"] = entries[:2]
    request["prefetch"]["observations"]["link"] = [{"relation": "next", "url": f"{FHIR}/Observation?page=2"}]
    harness = make_app(fhir={"allowlist": [FHIR]})
    with responses.RequestsMock() as mock:
        mock.get(f"{FHIR}/Observation", json=_searchset(rest))
        response = harness.hook(PV, request)
        assert len(mock.calls) == 1 and "page=2" in mock.calls[0].request.url
    assert CATEGORY_WORDS["high"] in response.json()["cards"][0]["summary"]


@pytest.mark.parametrize(
    "answer, why",
    [
        ({"status": 500}, "HTTP 500"),
        ({"status": 401}, "HTTP 401"),
        ({"status": 302, "headers": {"Location": "http://169.254.169.254/"}}, "HTTP 302"),
        ({"json": {"resourceType": "OperationOutcome", "issue": []}}, "OperationOutcome"),
        ({"body": "<html>"}, "did not answer with JSON"),
        ({"json": _searchset([], "https://evil.example.org/fhir/Observation?page=2")}, "next link leaves the fhirServer base"),
    ],
)
def test_fallback_failures_are_412_with_the_reason(make_app, answer, why):
    request = patient_view_request(bundle("V06"), fhir_server=FHIR)
    del request["prefetch"]["observations"]
    harness = make_app(fhir={"allowlist": [FHIR]})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(f"{FHIR}/Observation", **answer)
        response = harness.hook(PV, request)
        assert all("169.254" not in c.request.url and "evil" not in c.request.url for c in mock.calls)
    assert response.status_code == 412
    assert why in outcome(response)[1]
    assert "v06" not in response.text  # the reason carries no patient identifier


@pytest.mark.parametrize("how", ["null", "invalid"])
def test_a_missing_or_invalid_patient_is_assessed_with_age_unknown(make_app, how):
    """Issue 10 item 2: prefetch `patient` null (the EHR has none) or failing validation: the
    patient is assessed with age unknown, never lower than with the Patient (V06 is high), and the
    card says age is unknown. (A Patient that cannot be had because a fetch failed stays 412.)"""
    request = patient_view_request(bundle("V06"))
    if how == "null":
        request["prefetch"]["patient"] = None
    else:
        request["prefetch"]["patient"] = {**request["prefetch"]["patient"], "gender": 123}
    response = make_app().hook(PV, request)
    assert response.status_code == 200, response.text
    cards = response.json()["cards"]
    assert cards[0]["summary"].startswith("High risk of bone loss")
    assert "Complete the birth date in the record" in cards[0]["detail"]


# --------------------------------------------------------------------------- patient isolation


def test_other_patients_in_a_prefetch_bundle_are_dropped(make_app, caplog):
    """V20 (indeterminate, no DXA) with V11's DXA and fracture data smuggled into the Bundles."""
    harness = make_app()
    request = patient_view_request(bundle("V20"))
    intruder = patient_view_request(bundle("V11"))
    for key, value in intruder["prefetch"].items():
        if value and value.get("resourceType") == "Bundle":
            request["prefetch"][key]["entry"] += value["entry"]
    request["prefetch"]["observations"]["entry"].append({"resource": intruder["prefetch"]["patient"]})
    # ... and a resource about V11 whose subject is a urn:uuid resolving to V11 inside its Bundle.
    request["prefetch"]["extra"] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:0a0a0a0a-0000-4000-8000-000000000001", "resource": {"resourceType": "Patient", "id": "v11"}},
            {"fullUrl": "urn:uuid:0a0a0a0a-0000-4000-8000-000000000002", "resource": copy.deepcopy(intruder["prefetch"]["observations"]["entry"][0]["resource"])},
        ],
    }
    request["prefetch"]["extra"]["entry"][1]["resource"]["subject"] = {"reference": "urn:uuid:0a0a0a0a-0000-4000-8000-000000000001"}
    cards = harness.hook(PV, request).json()["cards"]
    text = json.dumps(cards)
    assert CATEGORY_WORDS["indeterminate"] in cards[0]["summary"]  # V11's T -2.5 never reached V20
    assert "v11" not in text
    # An integration problem (the EHR's server), not the clinician's: the log says it, the card does not.
    assert "another patient" not in text
    assert any("about another patient were ignored" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------- order-select


def test_order_select_drafted_ai_makes_the_patient_planned(make_app):
    """V20 without its AI statement: not on an AI, so patient-view says nothing; an anastrozole
    draft order makes her planned, and the card asks for the baseline DXA."""
    record = bundle("V20")
    record["entry"] = [e for e in record["entry"] if e["resource"]["resourceType"] != "MedicationStatement"]
    harness = make_app()
    assert harness.hook(PV, patient_view_request(record)).json() == {"cards": []}
    draft = draft_medication_request("v20", "199224", "anastrozole 1 MG Oral Tablet")
    cards = harness.hook(OS, order_select_request(record, [draft])).json()["cards"]
    assert cards and "aromatase inhibitor planned" in cards[0]["summary"]
    assert "Order a DXA scan" in cards[0]["detail"] and "anastrozole planned" in cards[0]["detail"]
    risk = next(a["resource"] for s in cards[0]["suggestions"] for a in s["actions"] if a["resource"]["resourceType"] == "RiskAssessment")
    assert {"reference": "MedicationRequest/draft-1"} in risk["basis"]  # the draft is the evidence, in a structured field
    dxa = [s for s in cards[0]["suggestions"] if s["actions"][0]["resource"]["resourceType"] == "ServiceRequest"]
    assert dxa and dxa[0]["actions"][0]["resource"]["code"]["coding"][0]["code"] == "312681000"


def test_order_select_on_an_already_active_patient_stays_active(make_app):
    draft = draft_medication_request("v06", "199224", "anastrozole 1 MG Oral Tablet")
    cards = make_app().hook(OS, order_select_request(bundle("V06"), [draft])).json()["cards"]
    assert CATEGORY_WORDS["high"] in cards[0]["summary"] and "planned" not in cards[0]["summary"]


def test_order_select_ignores_other_orders(make_app):
    draft = draft_medication_request("v06", "617993", "Amoxicillin 120 MG/ML Oral Suspension")
    assert make_app().hook(OS, order_select_request(bundle("V06"), [draft])).json() == {"cards": []}


def test_order_select_ignores_a_draft_about_another_patient(make_app):
    record = bundle("V20")
    record["entry"] = [e for e in record["entry"] if e["resource"]["resourceType"] != "MedicationStatement"]
    draft = draft_medication_request("someone-else", "199224", "anastrozole 1 MG Oral Tablet")
    assert make_app().hook(OS, order_select_request(record, [draft])).json() == {"cards": []}


def test_order_select_needs_draft_orders(make_app):
    request = order_select_request(bundle("V06"), [])
    del request["context"]["draftOrders"]
    response = make_app().hook(OS, request)
    assert response.status_code == 400 and "draftOrders" in outcome(response)[1]


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize(
    "mutate, status, why",
    [
        (lambda r: r.update(hook="order-sign"), 400, "answers the patient-view hook"),
        (lambda r: r.pop("context"), 400, "context"),
        (lambda r: r["context"].pop("patientId"), 400, "context.patientId is required"),
        (lambda r: r["context"].update(patientId="../../etc"), 400, "not a FHIR id"),
        (lambda r: r.pop("hookInstance"), 400, "hookInstance"),
        (lambda r: r.update(fhirAuthorization={"access_token": "t", "token_type": "Bearer"}), 400, "fhirAuthorization needs fhirServer"),
        (lambda r: r.update(prefetch=["not", "an", "object"]), 400, "prefetch"),
        (lambda r: r["prefetch"].update(observations="Observation?x"), 400, "neither null nor a FHIR resource"),
    ],
)
def test_bad_requests_are_400_with_a_reason(make_app, mutate, status, why):
    request = patient_view_request(bundle("V06"))
    mutate(request)
    response = make_app().hook(PV, request)
    assert response.status_code == status
    assert why in outcome(response)[1]


def test_malformed_json_is_400(make_app):
    response = make_app().client.post(f"/cds-services/{PV}", content=b'{"hook": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and outcome(response)[0] == "cds-bad-request"
    assert "malformed JSON" in outcome(response)[1]


def test_empty_body_is_400(make_app):
    response = make_app().client.post(f"/cds-services/{PV}", content=b"", headers={"Content-Type": "application/json"})
    assert response.status_code == 400


@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml", "text/json"],
)
@pytest.mark.parametrize("path", [PV, OS, f"{PV}/feedback"])
def test_a_body_that_is_not_declared_json_is_415_with_a_reason(make_app, content_type, path):
    body = json.dumps(patient_view_request(bundle("V06"))).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    response = make_app().client.post(f"/cds-services/{path}", content=body, headers=headers)
    assert response.status_code == 415 and outcome(response)[0] == "cds-media-type"
    said = "no Content-Type" if content_type is None else repr(content_type.split(";")[0])
    assert "must be JSON" in outcome(response)[1] and said in outcome(response)[1]


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/fhir+json"])
def test_json_content_types_are_accepted(make_app, content_type):
    body = json.dumps(patient_view_request(bundle("V06"))).encode()
    response = make_app().client.post(f"/cds-services/{PV}", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text


def test_unknown_service_is_404(make_app):
    response = make_app().hook("no-such-service", patient_view_request(bundle("V06")))
    assert response.status_code == 404 and outcome(response)[0] == "cds-unknown-service"


def test_body_above_the_limit_is_413(make_app):
    harness = make_app(max_request_bytes=2_000)
    response = harness.hook(PV, patient_view_request(bundle("V06")))
    assert response.status_code == 413 and outcome(response)[0] == "cds-too-large"


def test_body_above_the_limit_without_content_length_is_413(make_app):
    harness = make_app(max_request_bytes=10_000)

    async def chunks():
        for _ in range(20):
            yield b" " * 1000

    response = harness.client.post(f"/cds-services/{PV}", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_spec_prefetch_data_with_a_non_resource_value_is_accepted(make_app):
    request = patient_view_request(bundle("V06"))
    request["prefetch"]["user"] = "123"  # the specification's own example carries this
    assert make_app().hook(PV, request).status_code == 200


# --------------------------------------------------------------------------- load and time limits


def test_deadline_is_503(make_app, monkeypatch):
    harness = make_app(request_deadline_seconds=0.5, fhir={"budget_seconds": 0.2})
    release = threading.Event()
    original = harness.cds._assess

    def slow(*args):
        release.wait(10)
        return original(*args)

    monkeypatch.setattr(harness.cds, "_assess", slow)
    try:
        response = harness.hook(PV, patient_view_request(bundle("V06")))
    finally:
        release.set()
    assert response.status_code == 503 and outcome(response)[0] == "cds-deadline"


def test_busy_is_503(make_app, monkeypatch):
    harness = make_app(assess_workers=1, max_queued=1)
    release = threading.Event()
    original = harness.cds._assess

    def slow(*args):
        release.wait(10)
        return original(*args)

    monkeypatch.setattr(harness.cds, "_assess", slow)
    request = patient_view_request(bundle("V06"))

    async def scenario():
        import asyncio

        first = asyncio.ensure_future(harness.client.http.post(f"/cds-services/{PV}", json=request))
        second = asyncio.ensure_future(harness.client.http.post(f"/cds-services/{PV}", json=request))
        while harness.cds.in_flight < 2:
            await asyncio.sleep(0.01)
        third = await harness.client.http.post(f"/cds-services/{PV}", json=request)
        release.set()
        return await first, await second, third

    first, second, third = harness.client.run(scenario())
    assert third.status_code == 503 and outcome(third)[0] == "cds-busy"
    assert first.status_code == 200 and second.status_code == 200


def test_a_saturated_service_sheds_a_call_before_spending_on_it(make_app, monkeypatch):
    """Busy is answered before the JWT is checked or the body read: shedding costs next to nothing."""
    harness = make_app(assess_workers=1, max_queued=1)
    harness.cds.in_flight = 2  # as if two calls were in progress
    spent = []
    monkeypatch.setattr(harness.cds, "authenticate", lambda *a: spent.append("jwt"))
    monkeypatch.setattr(harness.cds, "read_json", lambda *a: spent.append("body"))
    response = harness.hook(PV, patient_view_request(bundle("V06")))
    assert response.status_code == 503 and outcome(response)[0] == "cds-busy"
    assert spent == []
    assert harness.cds.in_flight == 2  # a shed call is not counted
    harness.cds.in_flight = 0
    monkeypatch.undo()
    assert harness.hook(PV, patient_view_request(bundle("V06"))).status_code == 200


# --------------------------------------------------------------------------- CORS


def test_cors_allows_configured_origins_only(make_app):
    harness = make_app(cors_origins=["https://ehr.example.org"])
    pre = {"Origin": "https://ehr.example.org", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
    ok = harness.client.options(f"/cds-services/{PV}", headers=pre)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://ehr.example.org"
    bad = harness.client.options(f"/cds-services/{PV}", headers={**pre, "Origin": "https://evil.example.org"})
    assert "access-control-allow-origin" not in bad.headers
    get = harness.client.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert get.headers["access-control-allow-origin"] == "https://ehr.example.org"


def test_no_cors_by_default(make_app):
    response = make_app().client.get("/cds-services", headers={"Origin": "https://ehr.example.org"})
    assert "access-control-allow-origin" not in response.headers


def test_an_unexpected_error_is_500_without_details_in_the_log(make_app, monkeypatch, caplog):
    harness = make_app()

    def boom(*args):
        raise RuntimeError("Patient/v06 has T -1.6")

    monkeypatch.setattr(harness.cds, "_assess", boom)
    response = harness.hook(PV, patient_view_request(bundle("V06")))
    assert response.status_code == 500
    assert "v06" not in response.text
    assert "v06" not in " ".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in " ".join(r.getMessage() for r in caplog.records)

