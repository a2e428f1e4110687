"""The client's contract with `responses`: paging, foreign links, page caps, ignored search
parameters, batch and transaction, conditional create and update, CapabilityStatement."""

from __future__ import annotations

import json

import pytest
import requests
import responses

from fhir_aibl.fhir import Capabilities, ClientSettings, FhirClient, SearchSpec
from fhir_aibl.fhir.client import entry_status, escape_token
from fhir_aibl.fhir.errors import (
    AuthError,
    Conflict,
    FhirError,
    ForeignLink,
    IgnoredParameter,
    PageLimit,
    TransportError,
)

from .fakes import BASE, FakeFhir, mock, observation, outcome, patient


def _page(resources, next_url=None):
    bundle = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r, "search": {"mode": "match"}} for r in resources],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def test_search_specs_render_stable_urls_and_describe_without_values():
    spec = SearchSpec("Observation", (("patient", "p 1"), ("category", "laboratory"), ("_count", "100")))
    assert spec.url() == "Observation?patient=p%201&category=laboratory&_count=100"
    assert spec.describe() == "Observation search (patient,category,_count)"
    assert (
        SearchSpec("CarePlan", (("identifier", "urn:fhir-aibl:careplan|"),)).url()
        == "CarePlan?identifier=urn:fhir-aibl:careplan|"
    )
    assert escape_token("a,b|c$d\\e") == "a\\,b\\|c\\$d\\\\e"


def test_paging_follows_next_links_to_the_end():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{BASE}/Observation",
            json=_page([observation("o1", "p1")], f"{BASE}/Observation?page=2"),
            match=[responses.matchers.query_param_matcher({"patient": "p1"})],
        )
        rsps.get(
            f"{BASE}/Observation",
            json=_page([observation("o2", "p1")], f"{BASE}/Observation?page=3"),
            match=[responses.matchers.query_param_matcher({"page": "2"})],
        )
        rsps.get(
            f"{BASE}/Observation",
            json=_page([observation("o3", "p1")]),
            match=[responses.matchers.query_param_matcher({"page": "3"})],
        )
        found = client.search(SearchSpec("Observation", (("patient", "p1"),)))
        assert [r["id"] for r in found] == ["o1", "o2", "o3"]
        assert all(c.request.headers["Prefer"] == "handling=strict" for c in rsps.calls)
    assert client.stats.requests == 3


def test_a_next_link_to_a_foreign_host_is_refused_before_any_request():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.get(
            f"{BASE}/Observation", json=_page([observation("o1", "p1")], "https://attacker.test/r4/Observation?page=2")
        )
        with pytest.raises(ForeignLink, match="another origin"):
            client.search(SearchSpec("Observation", (("patient", "p1"),)))
        assert len(rsps.calls) == 1


def test_the_page_cap_stops_endless_links():
    client = FhirClient(BASE, settings=ClientSettings(max_pages=3))
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Observation", json=_page([observation("o", "p1")], f"{BASE}/Observation?page=again"))
        with pytest.raises(PageLimit, match="more than 3 pages"):
            client.search(SearchSpec("Observation", (("patient", "p1"),)))
        assert len(rsps.calls) == 3


def test_a_search_the_server_reports_as_not_applied_is_refused():
    client = FhirClient(BASE)
    page = _page([observation("o1", "p1"), observation("o2", "someone-else")])
    page["entry"].append(
        {
            "resource": outcome("Unknown search parameter 'patient'; parameter ignored", "not-supported", "warning"),
            "search": {"mode": "outcome"},
        }
    )
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/FamilyMemberHistory", json=page)
        with pytest.raises(IgnoredParameter, match="parameter ignored"):
            client.search(SearchSpec("FamilyMemberHistory", (("patient", "p1"),)))


def test_informational_outcomes_do_not_stop_a_search():
    client = FhirClient(BASE)
    page = _page([observation("o1", "p1")])
    page["entry"].append(
        {"resource": outcome("served from cache", "informational", "information"), "search": {"mode": "outcome"}}
    )
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Observation", json=page)
        assert [r["id"] for r in client.search(SearchSpec("Observation", (("patient", "p1"),)))] == ["o1"]


def test_a_non_bundle_answer_to_a_search_is_an_error():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Observation", json={"resourceType": "Patient", "id": "x"})
        with pytest.raises(FhirError, match="did not answer a Bundle"):
            client.search(SearchSpec("Observation"))


def test_capabilities_are_read_once_and_parsed():
    fake = FakeFhir(unsearchable=frozenset({"FamilyMemberHistory"}), revinclude=False)
    client = FhirClient(BASE)
    with mock() as rsps:
        fake.install(rsps)
        caps = client.capabilities()
        client.capabilities()
        assert len(rsps.calls) == 1
    assert caps.known and caps.software == "fake 1" and caps.fhir_version == "4.0.1"
    assert caps.supports_batch() and caps.supports_transaction()
    assert caps.search_param("Observation", "patient") is True
    assert caps.search_param("Observation", "date") is False
    assert caps.search_param("FamilyMemberHistory", "patient") is False  # not listed at all
    assert caps.rev_include("Patient", "Observation:patient") is None  # listed without any: not said
    assert caps.conditional_create("CarePlan") is True and caps.update_create("RiskAssessment") is True


def test_a_server_without_a_capability_statement_leaves_every_answer_open():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/metadata", status=404, json=outcome("no metadata", "not-found"))
        caps = client.capabilities()
    assert not caps.known and "HTTP 404" in caps.problem
    assert caps.supports_batch() is None and caps.search_param("Observation", "patient") is None
    unknown = Capabilities.unknown()
    assert unknown.rev_include("Patient", "Observation:patient") is None and unknown.lists("Observation") is None


def test_unreachable_servers_and_refused_credentials_are_not_hidden_by_discovery():
    client = FhirClient(BASE, settings=ClientSettings())
    client.http.sleep = lambda s: None
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/metadata", body=requests.exceptions.ConnectionError("refused"))
        with pytest.raises(TransportError):
            client.capabilities()
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/metadata", status=401, json=outcome("who are you", "login"))
        with pytest.raises(AuthError):
            client.capabilities(refresh=True)


def test_conditional_create_sends_if_none_exist_and_reports_a_match():
    client = FhirClient(BASE)
    plan = {"resourceType": "CarePlan", "status": "draft", "intent": "proposal", "subject": {"reference": "Patient/p1"}}
    with responses.RequestsMock() as rsps:
        rsps.post(f"{BASE}/CarePlan", status=200, json={**plan, "id": "existing"}, headers={"ETag": 'W/"1"'})
        rsps.post(
            f"{BASE}/CarePlan",
            status=201,
            json={**plan, "id": "new"},
            headers={"Location": f"{BASE}/CarePlan/new/_history/1"},
        )
        matched = client.create(plan, if_none_exist="identifier=urn:fhir-aibl:careplan|abc")
        created = client.create(plan)
        assert rsps.calls[0].request.headers["If-None-Exist"] == "identifier=urn:fhir-aibl:careplan|abc"
        assert "If-None-Exist" not in rsps.calls[1].request.headers
        assert json.loads(rsps.calls[0].request.body) == plan
    assert not matched.created and matched.resource["id"] == "existing" and matched.etag == 'W/"1"'
    assert created.created and created.location.endswith("CarePlan/new/_history/1")


def test_several_matches_for_a_conditional_create_are_a_conflict():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.post(f"{BASE}/CarePlan", status=412, json=outcome("criteria matched 2 resources", "multiple-matches"))
        with pytest.raises(Conflict, match="matched 2"):
            client.create({"resourceType": "CarePlan"}, if_none_exist="identifier=x|y")


def test_versioned_update_sends_if_match_and_a_stale_version_is_a_conflict():
    client = FhirClient(BASE)
    plan = {"resourceType": "CarePlan", "id": "cp1", "status": "revoked"}
    with responses.RequestsMock() as rsps:
        rsps.put(f"{BASE}/CarePlan/cp1", status=200, json={**plan, "meta": {"versionId": "3"}})
        rsps.put(f"{BASE}/CarePlan/cp1", status=412, json=outcome('Version conflict: If-Match W/"2" but current is 3'))
        assert client.update(plan, if_match='W/"2"').resource["meta"]["versionId"] == "3"
        with pytest.raises(Conflict, match="Version conflict"):
            client.update(plan, if_match='W/"2"')
        assert [c.request.headers["If-Match"] for c in rsps.calls] == ['W/"2"', 'W/"2"']
    with pytest.raises(FhirError, match="without an id"):
        client.update({"resourceType": "CarePlan"})


def test_conditional_update_puts_to_the_query():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.put(
            f"{BASE}/RiskAssessment?identifier=urn:fhir-aibl:careplan|abc",
            status=201,
            json={"resourceType": "RiskAssessment", "id": "r1"},
        )
        assert client.conditional_update(
            {"resourceType": "RiskAssessment"}, "identifier=urn:fhir-aibl:careplan|abc"
        ).created


def test_batch_and_transaction_answers_are_checked():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.post(
            BASE,
            json={"resourceType": "Bundle", "type": "batch-response", "entry": [{"response": {"status": "200 OK"}}]},
        )
        with pytest.raises(FhirError, match="2 entries sent, 1 answered"):
            client.batch(
                [{"request": {"method": "GET", "url": "Patient/a"}}, {"request": {"method": "GET", "url": "Patient/b"}}]
            )
        rsps.post(BASE, json={"resourceType": "OperationOutcome"})
        with pytest.raises(FhirError, match="did not answer a Bundle"):
            client.transaction({"resourceType": "Bundle", "type": "transaction", "entry": []})
    with pytest.raises(FhirError, match="type transaction"):
        client.transaction({"resourceType": "Bundle", "type": "batch"})
    assert entry_status({"response": {"status": "201 Created"}}) == 201
    assert entry_status({"response": {"status": "weird"}}) == 0 and entry_status({}) == 0


def test_reads_escape_ids():
    client = FhirClient(BASE)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Patient/a%2Fb", json=patient("a/b"))
        assert client.read("Patient", "a/b")["id"] == "a/b"
