"""Write-back: one assessment -> one transaction Bundle of CarePlan, RiskAssessment and
Provenance, idempotent and atomic.

The decision (`plan_write`) is pure: it compares the new assessment's business identifier
(`careplan.business_identifier`: a hash of what was decided, from which resource versions,
by which ruleset) with the fhir-aibl CarePlans the pull found for the patient:

- a live CarePlan (draft, active, on-hold, unknown) with the same identifier, no other
  live one: **unchanged**, nothing is sent (zero requests);
- none with that identifier: **create** the CarePlan (conditional create on the
  identifier: `ifNoneExist`), the RiskAssessment, a Provenance, and revoke every other
  live fhir-aibl CarePlan of the patient (status `revoked`, by a versioned update with
  `If-Match`, so a plan a clinician edited meanwhile is not overwritten: the transaction
  fails with 412 and the patient is pulled and decided again); the new CarePlan
  `replaces` the revoked ones;
- one with that identifier exists but is not live: if fhir-aibl revoked it (a later
  fhir-aibl CarePlan `replaces` it), it is **reinstated** (status back to draft) and the
  later ones revoked; if someone else closed it (revoked, completed or entered-in-error
  with no fhir-aibl replacement), that decision stands and nothing is re-created.

Idempotence does not rest on conditional create alone, which is not race-safe on several
servers (DESIGN.md): the RiskAssessment and the Provenance get ids derived from the
identifier (`PUT RiskAssessment/aibl-<identifier>`) where the server accepts
client-assigned ids, so a retry or a racing worker writes the same resources again
instead of new ones. Where it does not, they are conditional creates (RiskAssessment, on
its identifier) or plain creates (Provenance has no identifier in R4), and the pull-side
check above is what keeps a re-run from writing anything.

A transaction is atomic: a failure leaves nothing half-written. A server without
transactions gets the same writes one by one, the CarePlan after the RiskAssessment and
before the Provenance and revocations, so that a re-run after a crash completes the
revocations; the Provenance of such a crashed write may be missing (documented).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.provenance import Provenance, ProvenanceAgent, ProvenanceEntity
from fhir.resources.R4B.reference import Reference
from pydantic import ValidationError

from .. import __version__
from ..assessment import Assessment
from ..clinician_text import PatientValues
from ..careplan import IDENTIFIER_SYSTEM, RULESET_SYSTEM, Catalogue, build_resources, full_url
from .client import Capabilities, FhirClient, entry_status, etag_of
from .errors import FhirError, WriteBackError, server_error
from .profiles import VendorProfile

SOFTWARE_SYSTEM = "urn:fhir-aibl:software"
#: CarePlan statuses that mean "still proposed or in force": the ones a new assessment replaces.
LIVE = frozenset({"draft", "active", "on-hold", "unknown"})
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"

Action = Literal["unchanged", "create", "reinstate", "revoke"]


def identifier_of(resource: Mapping[str, Any]) -> str | None:
    for ident in resource.get("identifier") or []:
        if isinstance(ident, dict) and ident.get("system") == IDENTIFIER_SYSTEM and ident.get("value"):
            return str(ident["value"])
    return None


def deterministic_id(*parts: str) -> str:
    """A FHIR id (<= 64 chars of [A-Za-z0-9-.]) that is a pure function of its parts."""
    return "aibl-" + hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


def _replaced_ids(careplan: Mapping[str, Any]) -> set[str]:
    out = set()
    for ref in careplan.get("replaces") or []:
        value = str((ref or {}).get("reference", ""))
        if value.startswith("CarePlan/") or "/CarePlan/" in value:
            out.add(value.split("CarePlan/", 1)[1].split("/", maxsplit=1)[0])
    return out


@dataclass
class WritePlan:
    patient_ref: str
    identifier: str
    action: Action
    #: the transaction Bundle (None when unchanged)
    bundle: dict | None = None
    #: ids of the CarePlans this write revokes
    revoked: list[str] = field(default_factory=list)
    #: id of the CarePlan that holds the assessment when unchanged or reinstated
    careplan_id: str | None = None


@dataclass(frozen=True)
class WriteModes:
    """How each resource is written on this server (from the profile and the CapabilityStatement)."""

    transaction: bool
    careplan_conditional: bool
    careplan_client_id: bool
    risk_conditional: bool
    client_ids_risk: bool
    client_ids_provenance: bool
    if_match: bool

    @classmethod
    def discover(cls, profile: VendorProfile, caps: Capabilities) -> WriteModes:
        def allowed(flag: bool, answer: bool | None) -> bool:
            return flag and answer is not False  # the profile allows it and the server does not deny it

        def client_ids(rtype: str) -> bool:
            return allowed(profile.client_assigned_ids, caps.update_create(rtype))

        careplan_conditional = allowed(profile.conditional_create, caps.conditional_create("CarePlan"))
        return cls(
            transaction=allowed(profile.transaction, caps.supports_transaction()),
            careplan_conditional=careplan_conditional,
            careplan_client_id=not careplan_conditional and client_ids("CarePlan"),
            # conditional create on a RiskAssessment needs its identifier search, which servers
            # must declare; without it a server may answer 400 (or worse, ignore the condition)
            risk_conditional=allowed(profile.conditional_create, caps.conditional_create("RiskAssessment"))
            and caps.search_param("RiskAssessment", "identifier") is True,
            client_ids_risk=client_ids("RiskAssessment"),
            client_ids_provenance=client_ids("Provenance"),
            if_match=True,
        )


def _dump(model: Any) -> dict:
    return json.loads(model.model_dump_json(exclude_none=True))


def provenance(
    assessment: Assessment,
    targets: Iterable[str],
    *,
    revised: Iterable[str] = (),
    activity: str,
    recorded: dt.datetime,
) -> dict:
    """Who wrote what, from what: fhir-aibl (with its version) as author; the ruleset (name,
    version and content hash) and every resource a fired rule used as sources; the CarePlans
    replaced as revised entities."""
    rs = assessment.ruleset
    entities = [
        ProvenanceEntity(
            role="source",
            what=Reference(
                identifier=Identifier(system=RULESET_SYSTEM, value=rs.name),
                display=(
                    f"fhir-aibl ruleset {rs.id} version {rs.version} "
                    f"(content {rs.content_hash}, boundary mode {rs.boundary_mode})"
                ),
            ),
        ),
        *(ProvenanceEntity(role="source", what=Reference(reference=ref)) for ref in assessment.evidence),
        *(ProvenanceEntity(role="revision", what=Reference(reference=ref)) for ref in revised),
    ]
    model = Provenance(
        target=[Reference(reference=t) for t in dict.fromkeys(targets)],
        recorded=recorded,
        activity=CodeableConcept(coding=[Coding(system=DATA_OPERATION, code=activity)]),
        agent=[
            ProvenanceAgent(
                type=CodeableConcept(coding=[Coding(system=PARTICIPANT_TYPE, code="author", display="Author")]),
                who=Reference(
                    identifier=Identifier(system=SOFTWARE_SYSTEM, value="fhir-aibl"),
                    display=f"fhir-aibl {__version__}",
                ),
            )
        ],
        entity=entities,
    )
    return _dump(model)


def _revoked_body(careplan: Mapping[str, Any], status: str = "revoked") -> dict:
    body = copy.deepcopy(dict(careplan))
    body["status"] = status
    body.pop("meta", None)  # the server owns meta; sending a stale versionId helps nobody
    return body


def plan_write(
    assessment: Assessment,
    existing: list[dict],
    catalogue: Catalogue,
    *,
    modes: WriteModes,
    base_url: str,
    now: dt.datetime | None = None,
    values: PatientValues | None = None,
) -> WritePlan:
    """What to write for one assessment, given the patient's fhir-aibl CarePlans on the server.
    `values`: the patient's values and their dates, which the CarePlan's text names."""
    now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    risk, plan = build_resources(assessment, catalogue, created=now, values=values)
    return plan_write_resources(_dump(risk), _dump(plan), existing, source=assessment, modes=modes,
                                base_url=base_url, now=now)


def plan_write_resources(
    risk_json: dict,
    plan_json: dict,
    existing: list[dict],
    *,
    source: Any,
    modes: WriteModes,
    base_url: str,
    now: dt.datetime | None = None,
) -> WritePlan:
    """The decision of `plan_write` for a RiskAssessment and CarePlan already built (by
    `build_resources`, here or in another process: the population write-back reads them from
    files). `source`: what the Provenance names, an Assessment or anything with its `patient`,
    `ruleset` (RulesetInfo) and `evidence`. The dicts become the plan's: pass ones of your own."""
    now = (now or dt.datetime.now(dt.timezone.utc)).replace(microsecond=0)
    assessment = source
    value = identifier_of(plan_json)
    if value is None or identifier_of(risk_json) != value:
        raise WriteBackError(
            "the CarePlan and the RiskAssessment must carry one fhir-aibl identifier", resource=assessment.patient
        )
    ident = Identifier(system=IDENTIFIER_SYSTEM, value=value)
    same = [c for c in existing if identifier_of(c) == value]
    same_live = [c for c in same if c.get("status") in LIVE]
    to_revoke = [c for c in existing if c.get("status") in LIVE and identifier_of(c) != value]
    result = WritePlan(patient_ref=assessment.patient, identifier=value, action="unchanged")

    reinstate: dict | None = None
    if same_live:
        result.careplan_id = same_live[0].get("id")
        to_revoke += same_live[1:]  # two live copies of one assessment (a race): keep the first
    elif same:
        replaced_by_us = set().union(*(_replaced_ids(c) for c in existing))
        candidates = [c for c in same if c.get("status") == "revoked" and c.get("id") in replaced_by_us]
        if candidates:
            reinstate = candidates[0]
            result.careplan_id = reinstate.get("id")
        # else: closed by someone else; that decision stands, nothing is re-created
    if (same_live or (same and reinstate is None)) and not to_revoke:
        return result

    entries: list[dict] = []
    targets: list[str] = []
    revoked_refs = [f"CarePlan/{c['id']}" for c in to_revoke]
    # versioned references to what is revised: the Provenance names the exact version replaced
    revised = [
        f"CarePlan/{c['id']}/_history/{c['meta']['versionId']}"
        if (c.get("meta") or {}).get("versionId")
        else f"CarePlan/{c['id']}"
        for c in to_revoke
    ]
    if not same:
        result.action = "create"
        risk_urn = full_url("RiskAssessment", ident)
        plan_urn = full_url("CarePlan", ident)
        if modes.client_ids_risk:
            risk_id = deterministic_id("RiskAssessment", value)
            risk_json["id"] = risk_id
            risk_ref = f"RiskAssessment/{risk_id}"
            risk_entry = {
                "fullUrl": f"{base_url}/{risk_ref}",
                "resource": risk_json,
                "request": {"method": "PUT", "url": risk_ref},
            }
        else:
            risk_ref = risk_urn
            request = {"method": "POST", "url": "RiskAssessment"}
            if modes.risk_conditional:
                request["ifNoneExist"] = f"identifier={IDENTIFIER_SYSTEM}|{value}"
            risk_entry = {"fullUrl": risk_urn, "resource": risk_json, "request": request}
        for info in plan_json.get("supportingInfo") or []:
            if info.get("reference") == risk_urn:
                info["reference"] = risk_ref
        if revoked_refs:
            plan_json["replaces"] = [{"reference": r} for r in revoked_refs]
        if modes.careplan_conditional:
            plan_ref = plan_urn
            plan_entry = {
                "fullUrl": plan_urn,
                "resource": plan_json,
                "request": {
                    "method": "POST",
                    "url": "CarePlan",
                    "ifNoneExist": f"identifier={IDENTIFIER_SYSTEM}|{value}",
                },
            }
        elif modes.careplan_client_id:
            plan_json["id"] = deterministic_id("CarePlan", value)
            plan_ref = f"CarePlan/{plan_json['id']}"
            plan_entry = {
                "fullUrl": f"{base_url}/{plan_ref}",
                "resource": plan_json,
                "request": {"method": "PUT", "url": plan_ref},
            }
        else:
            plan_ref = plan_urn
            plan_entry = {"fullUrl": plan_urn, "resource": plan_json, "request": {"method": "POST", "url": "CarePlan"}}
        entries += [risk_entry, plan_entry]
        targets += [plan_ref, risk_ref]
        activity = "CREATE"
    else:
        # reinstate (or only revoke stale copies beside a live one)
        if reinstate is not None:
            result.action = "reinstate"
            body = _revoked_body(reinstate, status="draft")
            body["replaces"] = (body.get("replaces") or []) + [
                {"reference": r} for r in revoked_refs if {"reference": r} not in (body.get("replaces") or [])
            ]
            entries.append(_update_entry(base_url, body, reinstate, modes))
            targets.append(f"CarePlan/{reinstate['id']}")
        else:
            result.action = "revoke"
        activity = "UPDATE"
    for careplan in to_revoke:
        entries.append(_update_entry(base_url, _revoked_body(careplan), careplan, modes))
        targets.append(f"CarePlan/{careplan['id']}")
    prov = provenance(assessment, targets, revised=revised, activity=activity, recorded=now)
    if modes.client_ids_provenance:
        prov["id"] = deterministic_id("Provenance", value, activity, *sorted(revoked_refs))
        entries.append(
            {
                "fullUrl": f"{base_url}/Provenance/{prov['id']}",
                "resource": prov,
                "request": {"method": "PUT", "url": f"Provenance/{prov['id']}"},
            }
        )
    else:
        urn = full_url(
            "Provenance",
            Identifier(system=IDENTIFIER_SYSTEM, value=f"{value}:{activity}:{','.join(sorted(revoked_refs))}"),
        )
        entries.append({"fullUrl": urn, "resource": prov, "request": {"method": "POST", "url": "Provenance"}})
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": entries}
    try:
        Bundle.model_validate(bundle)  # every resource, old CarePlans included, is valid FHIR R4 before it leaves
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[:3]
        raise WriteBackError(
            "the write-back Bundle fails FHIR R4 validation: "
            + "; ".join("/".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in first),
            resource=assessment.patient,
        ) from exc
    result.bundle = bundle
    result.revoked = [c["id"] for c in to_revoke]
    return result


def _update_entry(base_url: str, body: dict, current: Mapping[str, Any], modes: WriteModes) -> dict:
    request: dict[str, Any] = {"method": "PUT", "url": f"CarePlan/{current['id']}"}
    etag = etag_of(current)
    if modes.if_match and etag:
        request["ifMatch"] = etag  # a versioned update: refused (412) if the plan changed since the pull
    return {"fullUrl": f"{base_url}/CarePlan/{current['id']}", "resource": body, "request": request}


@dataclass
class WriteOutcome:
    action: Action
    #: HTTP requests the write took
    requests: int
    careplan_id: str | None = None
    #: the server answered that the CarePlan already existed (a conditional create matched)
    matched_existing: bool = False


def apply_plan(client: FhirClient, plan: WritePlan, modes: WriteModes) -> WriteOutcome:
    """Send a plan: one transaction, or (without transactions) the entries one by one."""
    before = client.stats.requests
    if plan.bundle is None:
        return WriteOutcome(action=plan.action, requests=0, careplan_id=plan.careplan_id)
    entries = plan.bundle["entry"]
    if modes.transaction:
        answers = client.transaction(plan.bundle, what="write-back transaction")
        check_answers(plan, answers)
    else:
        answers = _sequential(client, entries)
    outcome = outcome_of(plan, answers)
    outcome.requests = client.stats.requests - before
    return outcome


def check_answers(plan: WritePlan, answers: list[dict], *, what: str = "write-back transaction") -> None:
    """Raise the error of the first entry a transaction answered with a failure status: a
    server must fail the whole transaction; one answering a failed entry inside a 200 has not
    applied it atomically, and says so here."""
    for entry, answer in zip(plan.bundle["entry"], answers, strict=True):  # type: ignore[index]
        status = entry_status(answer)
        if not 200 <= status < 300:
            raise server_error(
                status or 500,
                "",
                (answer.get("response") or {}).get("outcome"),
                what=f"{what} entry {entry['request']['method']} {entry['resource']['resourceType']}",
            )


def outcome_of(plan: WritePlan, answers: list[dict]) -> WriteOutcome:
    """What a sent plan gave, from the server's answers to its entries (in the plan's order)."""
    entries = plan.bundle["entry"] if plan.bundle is not None else []
    careplan_id = plan.careplan_id
    matched = False
    for entry, answer in zip(entries, answers, strict=True):
        if entry["resource"]["resourceType"] == "CarePlan" and entry["request"]["method"] == "POST":
            careplan_id = _answered_id(answer) or careplan_id
            matched = entry_status(answer) == 200
        elif (
            entry["resource"]["resourceType"] == "CarePlan"
            and plan.action == "create"
            and entry["resource"].get("id", "").startswith("aibl-")
        ):
            careplan_id = entry["resource"]["id"]
    return WriteOutcome(action=plan.action, requests=0, careplan_id=careplan_id, matched_existing=matched)


def _answered_id(answer: Mapping[str, Any]) -> str | None:
    resource = answer.get("resource")
    if isinstance(resource, dict) and resource.get("id"):
        return str(resource["id"])
    location = str((answer.get("response") or {}).get("location") or "")
    if "CarePlan/" in location:
        return location.split("CarePlan/", 1)[1].split("/", maxsplit=1)[0]
    return None


def _sequential(client: FhirClient, entries: list[dict]) -> list[dict]:
    """The entries one by one, rewriting urn:uuid references to the ids the server gives.
    Order as planned: RiskAssessment, CarePlan (the marker a re-run looks for), then the
    revocations, the Provenance last once every target it names exists."""
    order = sorted(range(len(entries)), key=lambda i: (entries[i]["resource"]["resourceType"] == "Provenance", i))
    ids: dict[str, str] = {}
    answers: dict[int, dict] = {}
    for i in order:
        entry = copy.deepcopy(entries[i])
        resource = _rewrite_refs(entry["resource"], ids)
        request = entry["request"]
        if request["method"] == "POST":
            result = client.create(resource, if_none_exist=request.get("ifNoneExist"))
        else:
            result = client.update(resource, if_match=request.get("ifMatch"))
        rid = (result.resource or {}).get("id") or (
            result.location.split(f"{resource['resourceType']}/", 1)[1].split("/")[0]
            if result.location and f"{resource['resourceType']}/" in result.location
            else None
        )
        if rid is None:
            raise FhirError(f"{request['method']} {resource['resourceType']}: the server answered no id")
        if entry["fullUrl"].startswith("urn:"):
            ids[entry["fullUrl"]] = f"{resource['resourceType']}/{rid}"
        answers[i] = {
            "response": {"status": f"{result.status}", "location": result.location},
            "resource": result.resource or {"resourceType": resource["resourceType"], "id": rid},
        }
    return [answers[i] for i in range(len(entries))]


def _rewrite_refs(node: Any, ids: Mapping[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite_refs(v, ids) for k, v in node.items()}
        if isinstance(out.get("reference"), str) and out["reference"] in ids:
            out["reference"] = ids[out["reference"]]
        return out
    if isinstance(node, list):
        return [_rewrite_refs(v, ids) for v in node]
    return node
