"""The write-back decision and its Bundle: idempotent, replacing, atomic; and how it is sent."""

from __future__ import annotations

import datetime as dt
import functools
import json
import re

import pytest
import responses

from fhir_aibl.assess import RULES_DIR
from fhir_aibl.careplan import IDENTIFIER_SYSTEM, RULESET_SYSTEM, load_catalogue
from fhir_aibl.fhir import PROFILES, Capabilities, FhirClient
from fhir_aibl.fhir.errors import Unavailable
from fhir_aibl.fhir.writeback import WriteModes, apply_plan, deterministic_id, plan_write
from fhir_aibl.sources import read_paths

from ..conftest import AS_OF, FIXTURES
from .fakes import BASE, FakeFhir, mock

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
SEKMET_LIKE = Capabilities.parse(
    {
        "resourceType": "CapabilityStatement",
        "rest": [
            {
                "mode": "server",
                "interaction": [{"code": "transaction"}, {"code": "batch"}],
                "resource": [
                    {
                        "type": "CarePlan",
                        "conditionalCreate": True,
                        "updateCreate": True,
                        "searchParam": [{"name": "identifier"}, {"name": "patient"}],
                    },
                    {
                        "type": "Provenance",
                        "conditionalCreate": True,
                        "updateCreate": True,
                        "searchParam": [{"name": "target"}],
                    },
                ],
            }
        ],  # no RiskAssessment: it cannot be searched by identifier there
    }
)
GENERIC = WriteModes.discover(PROFILES["generic"], SEKMET_LIKE)


@functools.cache
def catalogue():
    return load_catalogue(RULES_DIR / "recommendations.yaml")


@pytest.fixture(scope="module")
def v06(assessor):
    (record,) = read_paths(FIXTURES / "bundles" / "V06.json").patients
    return assessor.assess(record.patient_ref, record.resources, AS_OF).assessment


@pytest.fixture(scope="module")
def v07(assessor):
    (record,) = read_paths(FIXTURES / "bundles" / "V07.json").patients
    return assessor.assess(
        "Patient/v06", [r for r in record.resources if r["resourceType"] != "Patient"], AS_OF
    ).assessment


def plan_for(assessment, existing=(), modes=GENERIC):
    return plan_write(assessment, list(existing), catalogue(), modes=modes, base_url=BASE, now=NOW)


def written(plan, version: str = "1", status: str = "draft", cid: str = "cp1") -> dict:
    """The CarePlan a server would hold after applying `plan`."""
    body = dict(next(e["resource"] for e in plan.bundle["entry"] if e["resource"]["resourceType"] == "CarePlan"))
    return {**body, "id": cid, "status": status, "meta": {"versionId": version}}


def test_a_first_write_is_one_transaction_of_careplan_riskassessment_and_provenance(v06):
    plan = plan_for(v06)
    assert plan.action == "create" and plan.revoked == []
    entries = plan.bundle["entry"]
    assert plan.bundle["type"] == "transaction"
    assert [(e["resource"]["resourceType"], e["request"]["method"]) for e in entries] == [
        ("RiskAssessment", "PUT"),
        ("CarePlan", "POST"),
        ("Provenance", "PUT"),
    ]
    risk, careplan, prov = (e["resource"] for e in entries)
    assert entries[1]["request"]["ifNoneExist"] == f"identifier={IDENTIFIER_SYSTEM}|{plan.identifier}"
    assert careplan["identifier"] == [{"system": IDENTIFIER_SYSTEM, "value": plan.identifier}] == risk["identifier"]
    assert risk["id"] == deterministic_id("RiskAssessment", plan.identifier)
    assert entries[0]["request"]["url"] == f"RiskAssessment/{risk['id']}"
    assert careplan["supportingInfo"][0]["reference"] == f"RiskAssessment/{risk['id']}"
    assert {t["reference"] for t in prov["target"]} == {entries[1]["fullUrl"], f"RiskAssessment/{risk['id']}"}
    assert prov["agent"][0]["who"]["display"].startswith("fhir-aibl ")
    assert prov["agent"][0]["who"]["identifier"]["value"] == "fhir-aibl"
    ruleset = [e for e in prov["entity"] if e["what"].get("identifier", {}).get("system") == RULESET_SYSTEM]
    assert ruleset[0]["what"]["identifier"]["value"] == v06.ruleset.name
    assert {e["what"].get("reference") for e in prov["entity"][1:]} == set(v06.evidence)
    assert prov["recorded"].startswith("2026-06-01T12:00:00")


def test_the_same_assessment_gives_the_same_writes(v06):
    a, b = plan_for(v06), plan_for(v06)
    assert json.dumps(a.bundle, sort_keys=True) == json.dumps(b.bundle, sort_keys=True)


def test_an_assessment_already_on_the_server_writes_nothing(v06):
    first = plan_for(v06)
    again = plan_for(v06, [written(first)])
    assert again.action == "unchanged" and again.bundle is None and again.careplan_id == "cp1"


def test_a_changed_assessment_replaces_and_revokes_the_previous_plan(v06, v07):
    old = written(plan_for(v06), version="4")
    plan = plan_for(v07, [old])
    assert plan.action == "create" and plan.revoked == ["cp1"] and plan.identifier != old["identifier"][0]["value"]
    entries = plan.bundle["entry"]
    assert [(e["resource"]["resourceType"], e["request"]["method"]) for e in entries] == [
        ("RiskAssessment", "PUT"),
        ("CarePlan", "POST"),
        ("CarePlan", "PUT"),
        ("Provenance", "PUT"),
    ]
    new, revoke, prov = entries[1]["resource"], entries[2], entries[3]["resource"]
    assert new["replaces"] == [{"reference": "CarePlan/cp1"}]
    assert revoke["request"] == {"method": "PUT", "url": "CarePlan/cp1", "ifMatch": 'W/"4"'}
    assert revoke["resource"]["status"] == "revoked" and "meta" not in revoke["resource"]
    assert revoke["resource"]["identifier"] == old["identifier"]  # everything else as it was
    assert {"role": "revision", "what": {"reference": "CarePlan/cp1/_history/4"}} in prov["entity"]
    assert "CarePlan/cp1" in {t["reference"] for t in prov["target"]}


def test_other_systems_careplans_and_closed_plans_are_left_alone(v06, v07):
    old = written(plan_for(v06), status="completed")
    plan = plan_for(v07, [old])
    assert plan.action == "create" and plan.revoked == []


def test_a_plan_a_clinician_closed_is_not_recreated(v06):
    for status in ("revoked", "entered-in-error", "completed"):
        closed = written(plan_for(v06), status=status)
        assert plan_for(v06, [closed]).action == "unchanged"


def test_a_plan_fhir_aibl_revoked_is_reinstated_when_its_assessment_returns(v06, v07):
    a = written(plan_for(v06), status="revoked", version="2", cid="cpA")
    b = {**written(plan_for(v07), cid="cpB"), "replaces": [{"reference": "CarePlan/cpA"}]}
    plan = plan_for(v06, [a, b])
    assert plan.action == "reinstate" and plan.careplan_id == "cpA" and plan.revoked == ["cpB"]
    (reinstated, revoked, prov) = plan.bundle["entry"]
    assert reinstated["request"] == {"method": "PUT", "url": "CarePlan/cpA", "ifMatch": 'W/"2"'}
    assert reinstated["resource"]["status"] == "draft"
    assert reinstated["resource"]["replaces"] == [{"reference": "CarePlan/cpB"}]
    assert revoked["resource"]["status"] == "revoked" and revoked["request"]["url"] == "CarePlan/cpB"
    assert prov["resource"]["activity"]["coding"][0]["code"] == "UPDATE"


def test_two_live_copies_of_one_assessment_are_reduced_to_one(v06):
    first = plan_for(v06)
    plan = plan_for(v06, [written(first, cid="cp1"), written(first, cid="cp2")])
    assert plan.action == "revoke" and plan.careplan_id == "cp1" and plan.revoked == ["cp2"]


def test_servers_without_client_ids_or_conditional_create_get_plain_creates(v06):
    epic = WriteModes.discover(PROFILES["epic"], Capabilities.unknown())
    assert not (epic.transaction or epic.careplan_conditional or epic.client_ids_risk or epic.client_ids_provenance)
    plan = plan_for(v06, modes=epic)
    assert [(e["request"]["method"], e["fullUrl"].startswith("urn:uuid:")) for e in plan.bundle["entry"]] == [
        ("POST", True),
        ("POST", True),
        ("POST", True),
    ]
    assert "ifNoneExist" not in plan.bundle["entry"][0]["request"]
    risk_urn = plan.bundle["entry"][0]["fullUrl"]
    assert plan.bundle["entry"][1]["resource"]["supportingInfo"][0]["reference"] == risk_urn


def test_a_server_that_searches_riskassessment_by_identifier_gets_a_conditional_create(v06):
    caps = Capabilities.parse(
        {
            "resourceType": "CapabilityStatement",
            "rest": [
                {
                    "resource": [
                        {
                            "type": "RiskAssessment",
                            "conditionalCreate": True,
                            "updateCreate": False,
                            "searchParam": [{"name": "identifier"}],
                        }
                    ]
                }
            ],
        }
    )
    modes = WriteModes.discover(PROFILES["generic"], caps)
    assert modes.risk_conditional and not modes.client_ids_risk
    entry = plan_for(v06, modes=modes).bundle["entry"][0]
    assert entry["request"] == {
        "method": "POST",
        "url": "RiskAssessment",
        "ifNoneExist": f"identifier={IDENTIFIER_SYSTEM}|{entry['resource']['identifier'][0]['value']}",
    }


def test_transaction_answers_give_the_careplan_id(v06):
    plan = plan_for(v06)
    client = FhirClient(BASE)
    fake = FakeFhir()
    with mock() as rsps:
        fake.install(rsps)
        outcome = apply_plan(client, plan, GENERIC)
    assert outcome.requests == 1 and outcome.careplan_id == "t1" and outcome.action == "create"
    assert fake.transactions == [plan.bundle]


def test_a_transaction_answer_with_a_failed_entry_is_an_error(v06):
    plan = plan_for(v06)
    client = FhirClient(BASE)
    answer = {
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": [
            {"response": {"status": "201 Created"}},
            {"response": {"status": "503 Unavailable"}},
            {"response": {"status": "201 Created"}},
        ],
    }
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, json=answer)
        with pytest.raises(Unavailable, match="write-back transaction entry POST CarePlan"):
            apply_plan(client, plan, GENERIC)


def test_without_transactions_the_writes_go_one_by_one_in_a_safe_order(v06, v07):
    modes = WriteModes.discover(PROFILES["oracle"], Capabilities.unknown())
    old = written(plan_for(v06, modes=modes), version="2", cid="old")
    plan = plan_for(v07, [old], modes=modes)
    client = FhirClient(BASE)
    sent: list[tuple[str, str, dict, dict]] = []

    def answer(request):
        body = json.loads(request.body)
        sent.append((request.method, request.url, dict(request.headers), body))
        rid = body.get("id") or f"{body['resourceType'].lower()}-1"
        return (
            (201 if request.method == "POST" else 200),
            {"Location": f"{BASE}/{body['resourceType']}/{rid}/_history/1"},
            json.dumps({**body, "id": rid}),
        )

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        for method in ("POST", "PUT"):
            rsps.add_callback(method, re.compile(re.escape(BASE) + ".*"), callback=answer)
        outcome = apply_plan(client, plan, modes)
    assert [(m, u.removeprefix(BASE + "/")) for m, u, _, _ in sent] == [
        ("POST", "RiskAssessment"),
        ("POST", "CarePlan"),
        ("PUT", "CarePlan/old"),
        ("POST", "Provenance"),
    ]
    careplan = sent[1][3]
    assert careplan["supportingInfo"][0]["reference"] == "RiskAssessment/riskassessment-1"
    assert sent[2][2]["If-Match"] == 'W/"2"'
    assert {t["reference"] for t in sent[3][3]["target"]} == {
        "CarePlan/careplan-1",
        "RiskAssessment/riskassessment-1",
        "CarePlan/old",
    }
    assert outcome.requests == 4 and outcome.careplan_id == "careplan-1"
