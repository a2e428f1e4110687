"""A small in-memory FHIR server behind `responses`, for the HTTP contract tests.

It answers what the connector sends: `GET metadata`, reads, type searches by `patient`,
`subject`, `category`, `code`, `status`, `identifier`, `_id` + `_revinclude`, with `_count`
paging through `next` links, batch Bundles of GETs, and transactions (recorded, answered
201). What it supports is configurable, to play servers that lack batch, `_revinclude` or a
search parameter; every request it receives is recorded in `.requests`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import responses

BASE = "https://fhir.test/r4"
#: The base this fake server also holds absolute references on (its name behind a proxy).
ALIAS = "http://fhir-internal:8080/fhir"
TYPES = (
    "Patient",
    "Observation",
    "MedicationStatement",
    "MedicationRequest",
    "MedicationAdministration",
    "Condition",
    "FamilyMemberHistory",
    "DiagnosticReport",
    "Procedure",
    "ServiceRequest",
    "CarePlan",
    "RiskAssessment",
    "Provenance",
)


def mock() -> responses.RequestsMock:
    """A RequestsMock for a FakeFhir: not every method it answers needs to be called."""
    return responses.RequestsMock(assert_all_requests_are_fired=False)


def outcome(text: str, code: str = "processing", severity: str = "error") -> dict:
    return {"resourceType": "OperationOutcome", "issue": [{"severity": severity, "code": code, "diagnostics": text}]}


def patient(pid: str, **extra: Any) -> dict:
    return {
        "resourceType": "Patient",
        "id": pid,
        "meta": {"versionId": "1"},
        "gender": "female",
        "birthDate": "1950-01-01",
        **extra,
    }


def observation(
    oid: str, pid: str, code: str = "38263-8", value: float = -1.0, category: str = "imaging", **extra
) -> dict:
    return {
        "resourceType": "Observation",
        "id": oid,
        "meta": {"versionId": "1"},
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}
        ],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2025-01-10",
        "valueQuantity": {
            "value": value,
            "unit": "{T-score}",
            "system": "http://unitsofmeasure.org",
            "code": "{T-score}",
        },
        **extra,
    }


def statement(
    sid: str,
    pid: str,
    code: str = "199224",
    status: str = "active",
    system: str = "http://www.nlm.nih.gov/research/umls/rxnorm",
) -> dict:
    return {
        "resourceType": "MedicationStatement",
        "id": sid,
        "meta": {"versionId": "1"},
        "status": status,
        "medicationCodeableConcept": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectivePeriod": {"start": "2024-01-01"},
    }


def fmh(fid: str, pid: str) -> dict:
    return {
        "resourceType": "FamilyMemberHistory",
        "id": fid,
        "meta": {"versionId": "1"},
        "status": "completed",
        "patient": {"reference": f"Patient/{pid}"},
        "relationship": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-RoleCode", "code": "MTH"}]},
    }


def _patient_of(resource: dict) -> str | None:
    if resource["resourceType"] == "Patient":
        return resource["id"]
    for element in ("subject", "patient"):
        ref = (resource.get(element) or {}).get("reference", "")
        if ref.startswith("Patient/"):
            return ref.split("/")[1]
        if ref.startswith(ALIAS + "/Patient/"):  # the server's other name for itself
            return ref.split("/")[-1]
    return None


def _codes(resource: dict) -> set[str]:
    out = set()
    for element in ("code", "medicationCodeableConcept", "category"):
        values = resource.get(element)
        for cc in values if isinstance(values, list) else [values or {}]:
            for c in cc.get("coding", []):
                out.add(c.get("code"))
    return out


@dataclass
class FakeFhir:
    resources: list[dict] = field(default_factory=list)
    batch: bool = True
    revinclude: bool = True
    #: types the server cannot search by patient (not listed in its CapabilityStatement)
    unsearchable: frozenset[str] = frozenset()
    #: types whose `patient` parameter the server ignores (answering every resource of the type)
    ignores_patient: frozenset[str] = frozenset()
    #: whether ignored parameters are reported in an OperationOutcome entry (SEKMET does)
    reports_ignored: bool = False
    #: Observation searches must carry a category (Epic)
    category_required: bool = False
    transaction: bool = True
    capability_statement: bool = True
    requests: list[tuple[str, str]] = field(default_factory=list)
    headers: list[dict] = field(default_factory=list)
    transactions: list[dict] = field(default_factory=list)
    base: str = BASE
    #: keep what transactions write, so that a later pull finds it (as a real server would)
    store_writes: bool = False

    # -- wiring ------------------------------------------------------------------------------
    def install(self, rsps: responses.RequestsMock) -> FakeFhir:
        pattern = re.compile(re.escape(self.base) + r"(/.*)?(\?.*)?$")
        for method in ("GET", "POST", "PUT"):
            rsps.add_callback(method, pattern, callback=self._callback)
        return self

    def _callback(self, request) -> tuple[int, dict, str]:
        self.requests.append((request.method, request.url))
        self.headers.append(dict(request.headers))
        parts = urlsplit(request.url)
        path = parts.path[len(urlsplit(self.base).path) :].strip("/")
        params = parse_qsl(parts.query, keep_blank_values=True)
        body = json.loads(request.body) if request.body else None
        status, answer = self.handle(request.method, path, params, body)
        return status, {"Content-Type": "application/fhir+json"}, json.dumps(answer)

    # -- behaviour ---------------------------------------------------------------------------
    def handle(self, method: str, path: str, params: list[tuple[str, str]], body: Any) -> tuple[int, dict]:
        if method == "GET" and path == "metadata":
            if not self.capability_statement:
                return 404, outcome("no metadata", "not-found")
            return 200, self.capability()
        if method == "POST" and path == "":
            if body.get("type") == "batch":
                if not self.batch:
                    return 405, outcome("batch is not supported", "not-supported")
                return 200, {
                    "resourceType": "Bundle",
                    "type": "batch-response",
                    "entry": [self._entry(e["request"]) for e in body["entry"]],
                }
            if body.get("type") == "transaction":
                if not self.transaction:
                    return 405, outcome("transaction is not supported", "not-supported")
                self.transactions.append(body)
                if self.store_writes:
                    self._store(body)
                return 200, {
                    "resourceType": "Bundle",
                    "type": "transaction-response",
                    "entry": [
                        {
                            "response": {
                                "status": "201 Created",
                                "location": f"{e['resource']['resourceType']}/t{i}/_history/1",
                            },
                            "resource": {**e["resource"], "id": e["resource"].get("id") or f"t{i}"},
                        }
                        for i, e in enumerate(body["entry"])
                    ],
                }
        if method == "GET":
            segs = path.split("/")
            if len(segs) == 2:
                found = [r for r in self.resources if r["resourceType"] == segs[0] and r["id"] == segs[1]]
                return (200, found[0]) if found else (404, outcome(f"{segs[0]}/{segs[1]} not found", "not-found"))
            if len(segs) == 1:
                return self.search(segs[0], params)
        return 400, outcome(f"unsupported {method} {path}", "not-supported")

    def _store(self, transaction: dict) -> None:
        for i, e in enumerate(transaction["entry"]):
            resource = {**e["resource"], "id": e["resource"].get("id") or f"w{len(self.resources)}-{i}"}
            key = (resource["resourceType"], resource["id"])
            old = [r for r in self.resources if (r["resourceType"], r["id"]) == key]
            version = int(old[0]["meta"]["versionId"]) + 1 if old else 1
            resource["meta"] = {"versionId": str(version)}
            self.resources = [r for r in self.resources if (r["resourceType"], r["id"]) != key] + [resource]

    def _entry(self, request: dict) -> dict:
        parts = urlsplit(request["url"])
        status, answer = self.handle(request["method"], parts.path, parse_qsl(parts.query), None)
        if status == 200:
            return {"response": {"status": "200 OK"}, "resource": answer}
        return {"response": {"status": f"{status} Error", "outcome": answer}}

    def search(self, rtype: str, params: list[tuple[str, str]]) -> tuple[int, dict]:
        p = dict(params)
        count = int(p.get("_count", 10))
        offset = int(p.get("_offset", 0))
        matches = [r for r in self.resources if r["resourceType"] == rtype]
        warnings = []
        for name, value in params:
            if name in ("_count", "_offset", "_revinclude"):
                continue
            if name in ("patient", "subject"):
                if rtype in self.unsearchable or rtype in self.ignores_patient:
                    if rtype in self.unsearchable and not self.reports_ignored and rtype not in self.ignores_patient:
                        return 400, outcome(f"Unknown search parameter '{name}' for {rtype}", "not-supported")
                    warnings.append(f"Unknown search parameter '{name}' for {rtype}; parameter ignored")
                    continue
                matches = [r for r in matches if _patient_of(r) == value]
            elif name == "_id":
                matches = [r for r in matches if r["id"] == value]
            elif name in ("code", "category"):
                wanted = set(value.split(","))
                matches = [r for r in matches if _codes(r) & wanted]
            elif name == "status":
                matches = [r for r in matches if r.get("status") in value.split(",")]
            elif name == "identifier":
                system = value.split("|")[0]
                matches = [r for r in matches if any(i.get("system") == system for i in r.get("identifier", []))]
            else:
                return 400, outcome(f"Unknown search parameter '{name}'", "not-supported")
        if rtype == "Observation" and self.category_required and "category" not in p:
            return 400, outcome("Observation searches require a category", "required")
        page = matches[offset : offset + count]
        entries = [
            {"fullUrl": f"{self.base}/{r['resourceType']}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in page
        ]
        revs = [v for k, v in params if k == "_revinclude"]
        if revs:
            if not self.revinclude:
                return 400, outcome("_revinclude is not supported", "not-supported")
            ids = {r["id"] for r in page}
            for spec in revs:
                src = spec.split(":")[0]
                for r in self.resources:
                    if r["resourceType"] == src and _patient_of(r) in ids:
                        entries.append({"resource": r, "search": {"mode": "include"}})
        if warnings and self.reports_ignored:
            entries.append(
                {"resource": outcome("; ".join(warnings), "not-supported", "warning"), "search": {"mode": "outcome"}}
            )
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(matches),
            "entry": entries,
            "link": [{"relation": "self", "url": f"{self.base}/{rtype}?{urlencode(params)}"}],
        }
        if offset + count < len(matches):
            rest = [(k, v) for k, v in params if k != "_offset"] + [("_offset", str(offset + count))]
            bundle["link"].append({"relation": "next", "url": f"{self.base}/{rtype}?{urlencode(rest)}"})
        return 200, bundle

    def capability(self) -> dict:
        resources = []
        for t in TYPES:
            if t in self.unsearchable:
                continue
            params = ["_id", "identifier", "patient", "subject", "code", "status", "category"]
            resources.append(
                {
                    "type": t,
                    "conditionalCreate": True,
                    "updateCreate": True,
                    "searchParam": [{"name": n, "type": "token"} for n in params],
                    "searchRevInclude": [f"{s}:patient" for s in TYPES if s != "Patient"]
                    if (t == "Patient" and self.revinclude)
                    else [],
                }
            )
        interactions = [{"code": "history-system"}]
        interactions += [{"code": "batch"}] if self.batch else []
        interactions += [{"code": "transaction"}] if self.transaction else []
        return {
            "resourceType": "CapabilityStatement",
            "status": "active",
            "kind": "instance",
            "fhirVersion": "4.0.1",
            "software": {"name": "fake", "version": "1"},
            "rest": [{"mode": "server", "resource": resources, "interaction": interactions}],
        }

    def searches_of(self, rtype: str) -> list[str]:
        return [u for m, u in self.requests if m == "GET" and urlsplit(u).path.endswith(f"/{rtype}")]


def record(pid: str = "p1") -> list[dict]:
    """One AI patient: Patient, 2 DXA T-scores, an anastrozole statement, a mother's history."""
    return [
        patient(pid),
        observation(f"{pid}-ls", pid, "38267-1", -1.2),
        observation(f"{pid}-th", pid, "38264-8", -1.4),
        statement(f"{pid}-ai", pid),
        fmh(f"{pid}-fmh", pid),
    ]


def ids(resources: Iterable[dict]) -> list[str]:
    return [f"{r['resourceType']}/{r['id']}" for r in resources]
