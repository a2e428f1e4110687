"""Conformance with CDS Hooks 2.0.1: the specification's example requests are accepted, and the
discovery document and cards have the fields of the HL7 logical models (checked element by
element against the StructureDefinitions in ../shared/data/cds-hooks)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
import responses

from fhir_aibl.cds.prefetch import KEY_TYPES
from fhir_aibl.cds.protocol import parse_feedback
from fhir_aibl.cds.samples import draft_medication_request, order_select_request, patient_view_request

from .conftest import OS, PV, RXNORM, bundle, cds_data

MODELS = "hl7-cds-hooks-ig-logical-models"


def _elements(name: str) -> dict[str, dict]:
    sd = json.loads(cds_data(f"{MODELS}/structuredefinition-{name}.json").read_text())
    return {e["path"]: e for e in sd["differential"]["element"]}


def check(obj: Any, elements: dict[str, dict], path: str, problems: list[str]) -> None:
    """`obj` against the logical model's elements below `path`: names, cardinality, primitive types."""
    children = {p[len(path) + 1 :]: e for p, e in elements.items() if p.startswith(path + ".") and "." not in p[len(path) + 1 :]}
    if not isinstance(obj, dict):
        problems.append(f"{path} is not an object")
        return
    for name, element in children.items():
        if element.get("min", 0) >= 1 and name not in obj:
            problems.append(f"{path}.{name} is required")
    for name, value in obj.items():
        if name == "extension":
            continue
        element = children.get(name)
        if element is None:
            problems.append(f"{path}.{name} is not an element of the model")
            continue
        many = element.get("max") == "*"
        if many != isinstance(value, list):
            problems.append(f"{path}.{name}: cardinality {element.get('min')}..{element.get('max')}")
            continue
        types = [t.get("code") for t in element.get("type", [])]
        for item in value if many else [value]:
            if types in (["string"], ["markdown"], ["code"], ["url"], ["uuid"], ["id"], ["uri"]):
                if not isinstance(item, str):
                    problems.append(f"{path}.{name} is not a string")
                elif types == ["uuid"]:
                    uuid.UUID(item)
                elif types == ["url"] and not re.match(r"^https?://|^[A-Za-z]+/", item):
                    problems.append(f"{path}.{name} is not a URL")
            elif types == ["boolean"]:
                if not isinstance(item, bool):
                    problems.append(f"{path}.{name} is not a boolean")
            elif types == ["Coding"]:
                if not (isinstance(item, dict) and item.get("code") and item.get("system")):
                    problems.append(f"{path}.{name} is not a Coding")
            elif types == ["Resource"]:
                if not (isinstance(item, dict) and item.get("resourceType")):
                    problems.append(f"{path}.{name} is not a FHIR resource")
            elif any(p.startswith(f"{path}.{name}.") for p in elements):
                check(item, elements, f"{path}.{name}", problems)


# --------------------------------------------------------------------------- requests


def _mock_empty_server(mock: responses.RequestsMock, base: str) -> None:
    empty = {"resourceType": "Bundle", "type": "searchset", "total": 0}
    for rtype in sorted(set(KEY_TYPES.values())):
        mock.get(re.compile(re.escape(f"{base}/{rtype}") + r"(\?.*|/.*)?$"), json=empty)


@pytest.mark.parametrize("example", ["spec-2.0.1/spec-request-patient-view.json", f"{MODELS}/binary-CDSHooksRequestPV.json"])
def test_the_specification_patient_view_request_is_accepted(make_app, example):
    request = json.loads(cds_data(example).read_text())
    harness = make_app(fhir={"allowlist": [request["fhirServer"]]})
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        _mock_empty_server(mock, request["fhirServer"])
        response = harness.hook(PV, request)
        # Its prefetch (patientToGreet) lacks our keys: they are queried with its access token.
        assert mock.calls and all(c.request.headers["Authorization"] == "Bearer some-opaque-fhir-access-token" for c in mock.calls)
    assert response.status_code == 200, response.text
    assert response.json() == {"cards": []}  # a man of 1925 with no aromatase inhibitor


def test_the_specification_request_without_an_allowlisted_server_is_412_not_400(make_app):
    request = json.loads(cds_data("spec-2.0.1/spec-request-patient-view.json").read_text())
    response = make_app().hook(PV, request)
    assert response.status_code == 412


def test_the_extension_example_without_a_patient_is_refused_with_the_reason(make_app):
    request = json.loads(cds_data("spec-2.0.1/spec-extensions-1.json").read_text())
    response = make_app().hook(PV, request)
    assert response.status_code == 400
    assert "patientId" in response.json()["issue"][0]["details"]["text"]


def test_the_order_select_example_context_is_accepted(make_app):
    context = json.loads(cds_data("hooks-2.0.1/order-select-example-r4-1.json").read_text())["context"]
    request = {
        "hook": "order-select",
        "hookInstance": str(uuid.uuid4()),
        "context": context,
        "prefetch": {"patient": {"resourceType": "Patient", "id": context["patientId"], "gender": "female", "birthDate": "1950-01-01"}},
    }
    harness = make_app()
    response = harness.hook(OS, request)
    assert response.status_code == 200 and response.json() == {"cards": []}  # amoxicillin and a diet: not ours
    # The same context with an anastrozole draft order is acted on.
    drafts = context["draftOrders"]["entry"]
    drafts[1]["resource"]["medicationCodeableConcept"] = {"coding": [{"system": RXNORM, "code": "199224"}]}
    for key in set(KEY_TYPES) - {"patient"}:
        request["prefetch"][key] = None
    cards = harness.hook(OS, request).json()["cards"]
    assert cards and "planned" in cards[0]["summary"]


@pytest.mark.parametrize(
    "example",
    [
        "spec-example-suggestion-accepted-1.json",
        "spec-example-overridden-guidance-with-overridereason-1.json",
        "spec-example-overridden-guidance-without-overridereason-1.json",
    ],
)
def test_the_specification_feedback_examples_parse(example):
    body = json.loads(cds_data(f"spec-2.0.1/{example}").read_text())
    assert parse_feedback(body).feedback


# --------------------------------------------------------------------------- discovery and cards


def test_discovery_matches_the_services_model(make_app):
    elements = _elements("CDSHooksServices")
    problems: list[str] = []
    document = make_app().client.get("/cds-services").json()
    # prefetch is a JSON object of key -> query in the wire format (the model draws it as key/value pairs)
    for service in document["services"]:
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in service["prefetch"].items())
    stripped = {"services": [{k: v for k, v in s.items() if k != "prefetch"} for s in document["services"]]}
    check(stripped, elements, "CDSHooksServices", problems)
    assert problems == []
    # ... and has every field the specification's own discovery example uses.
    example = json.loads(cds_data("spec-2.0.1/spec-discovery-example-1.json").read_text())
    used = {k for s in example["services"] for k in s}
    assert used <= set(document["services"][0])


TEST_SAFETY = """
blocks:
  - id: TEST-BLOCK-ZA
    when: [{kind: recommendation, code: ci-check}]
    blocks: {ingredients: [zoledronic-acid]}
    reason: Test block.
"""


def _all_cards(make_app, tmp_path) -> list[dict]:
    """Cards of every kind and indicator: high, moderate, low, indeterminate, on treatment,
    ovarian suppression, planned, and a blocked draft order (with a test safety table)."""
    table = tmp_path / "safety.yaml"
    table.write_text(TEST_SAFETY)
    harness = make_app(safety=str(table))
    cards = []
    for case in ("V06", "V04", "V01", "V20", "V22", "V29", "V41", "V49"):
        cards += harness.hook(PV, patient_view_request(bundle(case))).json()["cards"]
    draft = draft_medication_request("v06", "77655", "zoledronic acid", request_id="za-draft")
    cards += harness.hook(OS, order_select_request(bundle("V06"), [draft])).json()["cards"]
    return cards


def test_cards_match_the_response_model(make_app, tmp_path):
    elements = _elements("CDSHooksResponse")
    cards = _all_cards(make_app, tmp_path)
    assert {c["indicator"] for c in cards} == {"info", "warning", "critical"}
    problems: list[str] = []
    check({"cards": cards}, elements, "CDSHooksResponse", problems)
    assert problems == []
    for card in cards:
        assert len(card["summary"]) <= 140
        assert card["indicator"] in ("info", "warning", "critical")
        assert card["source"]["label"]
        assert card["source"]["topic"]["code"]
        if card.get("suggestions"):
            assert card["selectionBehavior"] in ("at-most-one", "any")
            for suggestion in card["suggestions"]:
                uuid.UUID(suggestion["uuid"])
                for action in suggestion["actions"]:
                    assert action["type"] in ("create", "update", "delete") and action["description"]
                    assert ("resource" in action) != (action["type"] == "delete")
            if card["selectionBehavior"] == "at-most-one":
                assert sum(bool(s.get("isRecommended")) for s in card["suggestions"]) <= 1
        for reason in card["overrideReasons"]:
            assert reason["system"] and reason["code"] and reason["display"]
        for link in card["links"]:
            # absolute: the guidelines; smart: the bone-health view, launched by the EHR
            assert link["type"] in ("absolute", "smart") and link["url"].startswith(("https://", "http://"))


def test_cards_have_every_field_of_the_specification_examples(make_app, tmp_path):
    cards = _all_cards(make_app, tmp_path)
    ours = {k for c in cards for k in c}
    for example in ("spec-response-cards-a.json", "spec-response-cards-b.json"):
        theirs = {k for c in json.loads(cds_data(f"spec-2.0.1/{example}").read_text())["cards"] for k in c}
        assert theirs <= ours, theirs - ours
