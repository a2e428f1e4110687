"""The CDS Hooks 2.0 service: `create_app(settings)` builds the FastAPI application.

    GET  /cds-services                 discovery: aibl-patient-view, aibl-order-select
    POST /cds-services/{id}            a hook call -> {"cards": [...]}
    POST /cds-services/{id}/feedback   feedback on cards (stored in SQLite; drives suppression)
    GET  /health/live, /health/ready   liveness; readiness (rules, database, JWKS)
    GET  /metrics                      Prometheus metrics (metrics.py)

One hook call, in order (each step's failure is the HTTP status beside it, with an
OperationOutcome body naming the reason):

1. the service id (404); admission: at most `assess_workers + max_queued` calls in
   progress, beyond that 503 before anything else is spent on the call;
2. the JWT (401; before the body is read; its audience is `public_base_url`, from the
   configuration only), a JSON Content-Type (415), the body size (413), JSON and the CDS
   Hooks request shape for this hook (400);
3. order-select: nothing to do (empty cards) unless `draftOrders` holds a MedicationRequest
   for an aromatase inhibitor or an antiresorptive;
4. prefetch sorted into resources and missing keys (worker thread); missing and incomplete
   keys queried from `fhirServer` if it is on the allowlist, within `fhir.budget_seconds`
   (fetch threads); anything still missing is 412;
5. the patient's resources only (other patients' are dropped unread), of those the ones the
   facts stage can read, validated (validation.py), plus an aromatase-inhibitor draft order
   as a draft MedicationRequest (facts.py reads a draft as intended, so a patient not yet on
   one becomes `planned`); one shared `Assessor` assesses (worker thread; the engine
   serialises itself);
6. cards, minus suppressed ones, recorded in the feedback store.

Steps 4 to 6 run under what is left of `request_deadline_seconds`, counted from the call's
arrival (503 after it). Threads cannot be killed: a late result is discarded, and queued
work that never started is cancelled.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
import os
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from .. import __version__
from ..assess import Assessor
from ..careplan import load_catalogue
from ..errors import AiblError
from ..references import MEDICATION_USE_TYPES, MedicationIndex, medication_reference
from ..jsoninput import JsonInputError, NotJsonError
from ..jsoninput import loads as json_loads
from . import metrics
from .auth import JwtVerifier
from . import about
from .cards import CardBuilder, IssuedCard, fill_service_urls
from .errors import (
    BadRequestError,
    BusyError,
    CdsError,
    DeadlineExceededError,
    PayloadTooLargeError,
    PrefetchUnavailableError,
    UnauthorizedError,
    UnknownCardError,
    UnknownServiceError,
    UnsupportedMediaTypeError,
)
from .feedback import FeedbackItem, FeedbackStore
from .fhirfetch import Fetcher
from .prefetch import ID_RE, PATIENT_TOKEN, bundle_resources, collect, OPTIONAL_KEYS, default_templates, for_patient, render, template_type
from .protocol import HookRequest, parse_feedback, parse_hook_request
from .replay import SqliteReplayCache
from .safety import ANTIRESORPTIVE_CLASSES, load_safety_table, medication_concepts
from .settings import Settings, SettingsError
from .validation import select_and_validate
from ..view.routes import router as view_router

log = logging.getLogger("fhir_aibl.cds")

UNSIGNED_WARNING = (
    "UNSIGNED MODE (--allow-unsigned): requests are accepted WITHOUT verifying the EHR's JWT. "
    "Anyone who can reach this port can query it. For local development only; never in production."
)


@dataclass(frozen=True)
class ServiceDef:
    id: str
    hook: str
    title: str
    description: str
    usage: str


#: The fetch job of the Medications a patient's medication resources reference and the prefetch lacked.
MEDICATION_JOB = "medication-references"


@dataclass
class _Prepared:
    """What the prefetch gave, and the queries that must still run."""

    items: list[tuple[dict, dict]]
    jobs: dict[str, str] = field(default_factory=dict)  # key -> query (relative template or next URL)
    failed: list[str] = field(default_factory=list)


class CdsService:
    """Everything one process shares between requests: settings, the Assessor, pools, stores."""

    def __init__(self, settings: Settings, *, assessor: Assessor | None = None, clock: Callable[[], float] | None = None):
        if settings.public_base_url is None and not settings.allow_unsigned:
            raise SettingsError(
                "public_base_url is not set: a JWT's audience (aud) must be {public_base_url}/cds-services/{id}, the "
                "URL the EHRs call, and it is taken from the configuration only, never from a request's headers. "
                "Set it in the configuration file (public_base_url: https://cds.example.org) or with the "
                "environment variable FHIR_AIBL_PUBLIC_BASE_URL"
            )
        self.settings = settings
        self.clock = clock or time.time
        self.assessor = assessor if assessor is not None else Assessor(settings.rules)
        self.catalogue = load_catalogue(settings.catalogue or self.assessor.paths.catalogue)
        self.safety = load_safety_table(settings.safety)
        self.templates = dict(settings.prefetch) if settings.prefetch else default_templates(self.assessor.terminology)
        for key, template in self.templates.items():
            if PATIENT_TOKEN not in template or template_type(template) is None:
                raise AiblError(f"prefetch template {key!r} must start with a resource type and use {PATIENT_TOKEN}")
        self.cards = CardBuilder(settings, self.catalogue, self.safety, self.assessor.terminology, self.assessor.rulebook)
        self.fetcher = Fetcher(settings.fhir)
        self.store = FeedbackStore(
            settings.database_path,
            suppression_days=settings.feedback.suppression_days,
            scope=settings.feedback.suppression_scope,
            retention_days=settings.feedback.retention_days,
            clock=self.clock,
        )
        # The replay cache lives in the same database as the feedback: every worker process
        # of `serve --workers N` sees every token any of them accepted.
        self.replay = SqliteReplayCache(settings.database_path, self.clock)
        self.verifier = JwtVerifier(settings.jwt, self.clock, replay=self.replay)
        info = self.assessor.ruleset_info
        self.ruleset = info.name
        metrics.RULESET.labels(info.name, info.version).set(1)
        self.assess_pool = ThreadPoolExecutor(settings.assess_workers, thread_name_prefix="cds-assess")
        self.fetch_pool = ThreadPoolExecutor(settings.fetch_workers, thread_name_prefix="cds-fetch")
        self.in_flight = 0
        self.services = {
            settings.patient_view_id: ServiceDef(
                id=settings.patient_view_id,
                hook="patient-view",
                title="AIBL bone health: aromatase-inhibitor-associated bone loss",
                description=(
                    "For a patient taking or about to start an aromatase inhibitor (anastrozole, letrozole, "
                    "exemestane): the AIBL risk category (high, moderate, low, indeterminate), the risk factors, "
                    "and what to do (DXA, calcium and vitamin D, antiresorptive therapy), each with the rules and "
                    "FHIR resources behind it. No card for patients not on an aromatase inhibitor."
                ),
                usage=(
                    "Needs the prefetch keys listed (Patient, Observations by code, Conditions, medications, "
                    "family history, DXA reports, procedures and orders by code), or fhirServer with fhirAuthorization on this service's allowlist so it can "
                    "query what is missing. Requests must carry a JWT from a configured issuer."
                ),
            ),
            settings.order_select_id: ServiceDef(
                id=settings.order_select_id,
                hook="order-select",
                title="AIBL bone health when ordering an aromatase inhibitor",
                description=(
                    "Acts when draftOrders holds a MedicationRequest for an aromatase inhibitor: assesses the patient "
                    "as planned to start it (baseline DXA, calcium and vitamin D, risk category). Also warns "
                    "(critical) when a drafted antiresorptive is contraindicated by the record. Other orders: no cards."
                ),
                usage=(
                    "Same prefetch and authorization as the patient-view service; draftOrders must be a FHIR Bundle."
                ),
            ),
        }
        if settings.allow_unsigned:
            log.warning("!" * 20 + " " + UNSIGNED_WARNING + " " + "!" * 20)

    def close(self) -> None:
        self.assess_pool.shutdown(wait=False, cancel_futures=True)
        self.fetch_pool.shutdown(wait=False, cancel_futures=True)
        self.store.close()
        self.replay.close()

    # -- operations -----------------------------------------------------------------------
    def readiness(self) -> tuple[bool, dict]:
        """Ready: rules loaded, the database writable, every issuer's keys cached or reachable."""
        checks: dict[str, Any] = {"rules": self.ruleset}
        ready = True
        try:
            self.store.check_writable()
            checks["database"] = "writable"
        except Exception as exc:  # noqa: BLE001 - any failure to write means not ready
            checks["database"] = f"not writable ({type(exc).__name__})"
            ready = False
        if self.settings.allow_unsigned:
            checks["jwks"] = "not used (allow_unsigned)"
        else:
            available = self.verifier.keys_available()
            checks["jwks"] = {iss: "available" if ok else "unreachable and not cached" for iss, ok in available.items()}
            ready = ready and all(available.values())
        return ready, checks

    # -- helpers --------------------------------------------------------------------------
    def today(self) -> dt.date:
        return self.settings.as_of or dt.datetime.fromtimestamp(self.clock()).date()

    def service(self, service_id: str) -> ServiceDef:
        service = self.services.get(service_id)
        if service is None:
            raise UnknownServiceError(f"no CDS service {service_id!r} here; GET /cds-services lists them")
        return service

    def endpoint(self, service_id: str) -> str:
        """The URL a JWT's aud must name: from the configuration only (a Host or X-Forwarded-*
        header chosen by the caller must never decide which tokens are ours)."""
        return f"{self.settings.public_base_url}/cds-services/{service_id}"

    async def authenticate(self, request: Request, audiences: list[str]) -> None:
        if self.settings.allow_unsigned:
            log.warning("accepted a request without verifying its JWT (--allow-unsigned: local development only)")
            return
        header = request.headers.get("authorization")
        loop = asyncio.get_running_loop()
        # The JWKS may need fetching: not on the event loop.
        try:
            await loop.run_in_executor(self.fetch_pool, self.verifier.verify, header, audiences)
        except UnauthorizedError as exc:
            metrics.JWT_REJECTIONS.labels(getattr(exc, "reason", "other")).inc()
            raise

    async def read_json(self, request: Request) -> Any:
        content_type = request.headers.get("content-type")
        if not _is_json(content_type):
            said = f"Content-Type {content_type.split(';')[0].strip()[:60]!r}" if content_type else "no Content-Type"
            raise UnsupportedMediaTypeError(f"the request body must be JSON (Content-Type: application/json); it has {said}")
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise PayloadTooLargeError(f"the request body is larger than {limit} bytes (max_request_bytes)")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"the request body is larger than {limit} bytes (max_request_bytes)")
            chunks.append(chunk)
        if not size:
            raise BadRequestError("the request body is empty")
        try:
            return json_loads(b"".join(chunks))
        except NotJsonError as exc:
            raise BadRequestError(f"malformed JSON: {exc.reason.removeprefix('not JSON: ')[:120]}") from None
        except JsonInputError as exc:  # nested too deep, a duplicate key (FHIR JSON forbids them)
            raise BadRequestError(f"the request body is not valid FHIR JSON: {exc}") from None

    # -- discovery ------------------------------------------------------------------------
    def discovery(self) -> dict:
        return {
            "services": [
                {
                    "hook": s.hook,
                    "title": s.title,
                    "description": s.description,
                    "id": s.id,
                    "prefetch": dict(self.templates),
                    "usageRequirements": s.usage,
                }
                for s in self.services.values()
            ]
        }

    # -- hooks -----------------------------------------------------------------------------
    async def hook(self, service_id: str, request: Request) -> dict:
        started = time.monotonic()
        service = self.service(service_id)
        # Admission first: a saturated service answers 503 before it spends anything on a
        # call (verifying the JWT, reading and parsing the body), so that under overload the
        # calls it accepted keep the CPU and shed calls are cheap (bench/ "cds" at 200/s).
        capacity = self.settings.assess_workers + self.settings.max_queued
        if self.in_flight >= capacity:
            metrics.ADMISSION_REFUSALS.inc()
            raise BusyError(f"{self.in_flight} requests in progress (assess_workers + max_queued = {capacity}); retry later")
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        try:
            await self.authenticate(request, [self.endpoint(service_id)])
            hook_request = parse_hook_request(await self.read_json(request), service.hook)
            drafts: list[dict] = []
            if service.hook == "order-select":
                drafts = self._draft_medications(hook_request)
                if not drafts:
                    return {"cards": []}
            remaining = self.settings.request_deadline_seconds - (time.monotonic() - started)
            try:
                return await asyncio.wait_for(self._run(service, hook_request, drafts), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise DeadlineExceededError(
                    f"no answer within request_deadline_seconds ({self.settings.request_deadline_seconds} s)"
                ) from None
        finally:
            self.in_flight -= 1
            metrics.IN_FLIGHT.dec()

    def _draft_medications(self, req: HookRequest) -> list[dict]:
        """The draft MedicationRequests of order-select this service acts on: AI or antiresorptive."""
        out = []
        items = list(bundle_resources(req.context["draftOrders"]))
        medications = MedicationIndex()  # a draft may reference a Medication entry of the same Bundle
        for resource, urns in items:
            medications.add(resource, urns=urns)
        for resource, urns in items:
            if resource.get("resourceType") != "MedicationRequest":
                continue
            resource = medications.inline(resource, urns)
            if resource.get("subject") is not None:
                # A draft order in this patient's context that names another patient is not ours to read.
                owned = for_patient([(resource, urns)], req.patient_id).resources
                if not owned:
                    continue
                resource = owned[0]
            classes = {c.get("class") for c in medication_concepts(self.assessor.terminology, resource)}
            if classes & ({"aromatase-inhibitor"} | ANTIRESORPTIVE_CLASSES):
                out.append(resource)
        return out

    async def _run(self, service: ServiceDef, req: HookRequest, drafts: list[dict]) -> dict:
        loop = asyncio.get_running_loop()
        prepared, cards = await loop.run_in_executor(self.assess_pool, self._prepare_and_assess, service, req, drafts)
        if cards is None:
            prepared.items.extend(await self._fetch(req, prepared))
            cards = await loop.run_in_executor(self.assess_pool, self._assess, service, req, drafts, prepared)
        return {"cards": [c.card for c in cards]}

    def _prepare_and_assess(
        self, service: ServiceDef, req: HookRequest, drafts: list[dict]
    ) -> tuple[_Prepared, list[IssuedCard] | None]:
        # A full prefetch (the usual case) is assessed in the same worker turn: a second
        # hand-off would queue the request again behind every other one waiting for a worker.
        prepared = self._prepare(req)
        if prepared.jobs:
            return prepared, None
        return prepared, self._assess(service, req, drafts, prepared)

    def _prepare(self, req: HookRequest) -> _Prepared:
        collected = collect(req.prefetch, self.templates)
        jobs = {key: render(self.templates[key], req.patient_id) for key in collected.missing}
        for key, url in collected.incomplete.items():
            jobs.setdefault(key, url)
        query = self._medication_query(req, collected.resources)
        if query is not None:
            jobs[MEDICATION_JOB] = query
        return _Prepared(items=collected.resources, jobs=jobs, failed=collected.failed)

    def _medication_query(self, req: HookRequest, items: list[tuple[dict, dict]]) -> str | None:
        """`Medication?_id=..` for the Medications this patient's resources reference and the prefetch
        did not carry, when fhirServer may be asked; else None (they stay flagged medication-unresolved)."""
        if not any(
            r.get("resourceType") in MEDICATION_USE_TYPES and not str(medication_reference(r) or "#").startswith("#")
            for r, _urns in items
        ):
            return None  # the usual case: codes, or contained Medications
        if not req.fhirServer or not self.fetcher.allowed(req.fhirServer):
            return None
        wanted = [rid for rtype, rid in for_patient(items, req.patient_id).unresolved_medications if rtype == "Medication"]
        return f"Medication?_id={','.join(wanted)}" if wanted else None

    async def _fetch(self, req: HookRequest, prepared: _Prepared) -> list[tuple[dict, dict]]:
        required = sorted(k for k in prepared.jobs if k not in OPTIONAL_KEYS and k != MEDICATION_JOB)
        if not required and not (req.fhirServer and self.fetcher.allowed(req.fhirServer)):
            # only refinements are missing (DXA reports and orders, referenced Medications): assess
            # without them; what they would have said stays a flag or a more cautious advice
            log.info("prefetch keys %s not given and not fetched: assessed without them", ", ".join(sorted(prepared.jobs)))
            return []
        keys = ", ".join(sorted(prepared.jobs))
        failed = f" (the EHR's prefetch failed for {', '.join(sorted(prepared.failed))})" if prepared.failed else ""
        if not req.fhirServer:
            metrics.FALLBACKS.labels("refused").inc()
            raise PrefetchUnavailableError(f"prefetch keys {keys} are missing{failed} and the request has no fhirServer")
        if not self.fetcher.allowed(req.fhirServer):
            metrics.FALLBACKS.labels("refused").inc()
            raise PrefetchUnavailableError(
                f"prefetch keys {keys} are missing{failed}, and fhirServer is not on this service's allowlist "
                "(fhir.allowlist), so the service will not query it"
            )
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.fhir.budget_seconds
        outcomes = await asyncio.gather(
            *(
                loop.run_in_executor(self.fetch_pool, self.fetcher.fetch, key, req.fhirServer, query, req.access_token, deadline)
                for key, query in prepared.jobs.items()
            )
        )
        # A failed Medication look-up does not stop the assessment: what it did not find stays
        # flagged medication-unresolved on the card.
        errors = [f"{o.key}: {o.error}" for o in outcomes if o.error and o.key != MEDICATION_JOB and o.key not in OPTIONAL_KEYS]
        for o in outcomes:
            if o.error and o.key in OPTIONAL_KEYS:
                log.warning("fallback query %s failed (%s): assessed without it", o.key, o.error)
        metrics.FALLBACKS.labels("failed" if errors else "fetched").inc()
        if errors:
            raise PrefetchUnavailableError(f"data the assessment needs could not be had from fhirServer ({'; '.join(errors)})")
        return [item for o in outcomes for item in o.resources or []]

    def _assess(self, service: ServiceDef, req: HookRequest, drafts: list[dict], prepared: _Prepared) -> list[IssuedCard]:
        patient_id = req.patient_id
        filtered = for_patient(prepared.items, patient_id)
        resources = filtered.resources
        notes: list[str] = []
        # left out as unreadable: the rules must not take them for absent
        unreadable: list[str] = list(filtered.unowned_labels)
        if filtered.unowned:
            metrics.DROPPED.labels("no-patient").inc(filtered.unowned)
            notes.append(f"{filtered.unowned} prefetched resource(s) named no patient and were not read: "
                         "counted as entries of this record that could not be read.")
        if filtered.other_patient:
            metrics.DROPPED.labels("other-patient").inc(filtered.other_patient)
            notes.append(f"{filtered.other_patient} prefetched resource(s) about another patient were ignored.")
        if self.settings.validate_resources:
            resources, invalid, partly = select_and_validate(self.assessor.terminology, resources)
            unreadable += [name.strip("`") for name in invalid]
            if invalid:
                metrics.DROPPED.labels("invalid").inc(len(invalid))
                notes.append(
                    f"{len(invalid)} resource(s) failed FHIR R4 validation and were not used: {', '.join(invalid[:10])}"
                    + (" ..." if len(invalid) > 10 else "")
                )
            if partly:
                notes.append(
                    f"{len(partly)} resource(s) failed FHIR R4 validation and were read without their invalid "
                    f"elements: {', '.join(partly[:10])}" + (" ..." if len(partly) > 10 else "")
                )
        if not any(r.get("resourceType") == "Patient" for r in resources):
            # The EHR says there is no Patient (prefetch null) or sent one that fails validation:
            # assessed with age and sex unknown (never lower than with it, never low; flag
            # age-unknown). A Patient that could not be had because a fetch failed never gets
            # here: that is a 412 from _fetch.
            notes.append(
                "Age unknown: the patient record (birth date, sex) was missing or invalid, so the assessment "
                "counted age as a possible risk factor and does not rate the risk as low."
            )
        for draft in drafts:
            concepts = medication_concepts(self.assessor.terminology, draft)
            if any(c.get("class") == "aromatase-inhibitor" for c in concepts):
                # The drafted order makes the patient planned if not already active (E1). Only
                # what says "this drug, intended, for this patient" is passed on: the draft's
                # dosing dates (an EHR may copy an old template, as the specification's own
                # example does with a 2005 bounds period) would make facts.py read it as ended,
                # and the draft has not been validated.
                rid = draft.get("id")
                planned = {
                    "resourceType": "MedicationRequest",
                    "id": rid if isinstance(rid, str) and ID_RE.match(rid) else f"draft-{len(resources)}",
                    "status": "draft",
                    "intent": "order",
                    # the codes the value set recognised, nothing else of an unvalidated draft
                    "medicationCodeableConcept": {
                        "coding": [{"system": c.system, "code": c.code, "display": c.display} for c in concepts]
                    },
                    "subject": {"reference": f"Patient/{patient_id}"},
                }
                resources.append(planned)
        result = self.assessor.assess(f"Patient/{patient_id}", resources, self.today(), unreadable)
        assessment = result.assessment
        issued = self.cards.build(assessment, draft_orders=drafts, data_notes=notes, facts=result.facts, resources=resources)
        shown = [
            c
            for c in issued
            if not (c.suppressible and self.store.is_suppressed(service.id, c.kind, assessment.patient, assessment))
        ]
        if len(shown) < len(issued):
            for card in issued:
                if card not in shown:
                    metrics.SUPPRESSED.labels(card.kind).inc()
        self.store.record_cards(service.id, assessment.patient, assessment, shown)
        if self.settings.log_patient_data:
            log.debug("%s: %s category %s, %d card(s)", service.id, assessment.patient, assessment.category, len(shown))
        return shown

    # -- feedback --------------------------------------------------------------------------
    async def feedback(self, service_id: str, request: Request) -> None:
        self.service(service_id)
        endpoint = self.endpoint(service_id)
        await self.authenticate(request, [endpoint, f"{endpoint}/feedback"])
        body = parse_feedback(await self.read_json(request))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.assess_pool, self._store_feedback, service_id, body)

    def _store_feedback(self, service_id: str, body) -> None:
        items: list[FeedbackItem] = []
        for i, entry in enumerate(body.feedback):
            record = self.store.card(entry.card)
            if record is None or record.service != service_id:
                raise UnknownCardError(f"feedback[{i}]: card {entry.card} was not issued by this service")
            accepted = [s.id for s in entry.acceptedSuggestions or []]
            unknown = [s for s in accepted if s not in record.suggestions]
            if unknown:
                raise BadRequestError(f"feedback[{i}]: acceptedSuggestions {unknown} are not suggestions of that card")
            reason = entry.overrideReason.reason if entry.overrideReason else None
            if reason is not None and (reason.system, reason.code) not in record.override_reasons:
                raise BadRequestError(f"feedback[{i}]: overrideReason is not one the card offered")
            items.append(
                FeedbackItem(
                    card=entry.card,
                    outcome=entry.outcome,
                    outcome_timestamp=entry.outcomeTimestamp.isoformat(),
                    accepted_suggestions=accepted,
                    override_system=reason.system if reason else None,
                    override_code=reason.code if reason else None,
                    user_comment=entry.overrideReason.userComment if entry.overrideReason else None,
                )
            )
        self.store.add_feedback(service_id, items)
        for item in items:
            metrics.FEEDBACK.labels(item.outcome).inc()


def _is_json(content_type: str | None) -> bool:
    """application/json, or a JSON-based type (application/fhir+json), with any parameters."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _error_response(exc: AiblError, status: int) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return JSONResponse(exc.operation_outcome(), status_code=status, headers=headers)


def create_app(
    settings: Settings,
    *,
    assessor: Assessor | None = None,
    clock: Callable[[], float] | None = None,
) -> FastAPI:
    """The CDS Hooks application. `assessor` shares an already loaded Assessor (tests, one per
    process); `clock` replaces `time.time` (tests with a frozen clock)."""
    cds = CdsService(settings, assessor=assessor, clock=clock)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # Everything loaded so far (models, value sets, rulebook, engine) lives as long as the
        # process. Left in the collector's view, each full collection walks it again: 35 ms
        # once every few dozen requests, which is the service's p99. Frozen, they are skipped.
        gc.freeze()
        # Each call parses a prefetch of thousands of JSON containers that reference counting
        # frees (no cycles): at the default threshold (700 allocations) the collector scans
        # them dozens of times per call for nothing. Cycles are still collected, in larger
        # batches (as cli.fewer_collections does for `assess`).
        saved = gc.get_threshold()
        gc.set_threshold(20_000, 50, 100)
        yield
        gc.set_threshold(*saved)
        # Graceful shutdown (SIGTERM/SIGINT): uvicorn has stopped accepting and let the calls
        # in progress finish (serve --graceful-timeout); now the pools and the database.
        log.info("shutting down: closing the worker pools and the database")
        cds.close()
        metrics.process_exited(os.getpid())

    app = FastAPI(
        title="fhir-aibl CDS Hooks service",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.cds = cds
    app.include_router(about.router(cds.catalogue, settings.source_label))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )

    @app.exception_handler(CdsError)
    async def _cds_error(request: Request, exc: CdsError) -> JSONResponse:
        # Reasons name checks and keys, never patient data: safe to log.
        level = logging.WARNING if exc.status in (401, 412, 503) else logging.INFO
        log.log(level, "%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.message)
        return _error_response(exc, exc.status)

    @app.exception_handler(AiblError)
    async def _aibl_error(request: Request, exc: AiblError) -> JSONResponse:
        log.error("%s %s -> 500 %s", request.method, request.url.path, exc.code)
        return _error_response(exc, 500)

    def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Handled here rather than by an exception handler, which Starlette re-raises so the
        # server logs the full text. An exception's text may quote the data it choked on:
        # only its type and place are logged, unless the patient-data debug flag is on.
        if settings.log_patient_data:
            log.error("%s %s -> 500", request.method, request.url.path, exc_info=exc)
        else:
            where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
            place = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
            log.error("%s %s -> 500 %s%s", request.method, request.url.path, type(exc).__name__, place)
        return _error_response(AiblError("internal error"), 500)

    app.include_router(view_router)  # the bone-health view, a SMART on FHIR app (fhir_aibl/view/routes.py)
    ruleset_header = {"X-FHIR-AIBL-Ruleset": cds.ruleset}

    @app.get("/cds-services")
    async def discovery() -> dict:
        return cds.discovery()

    @app.get("/health/live")
    async def live() -> JSONResponse:
        """Liveness: the process answers (the pid says which worker)."""
        return JSONResponse({"status": "alive", "pid": os.getpid()})

    @app.get("/health/ready")
    async def ready() -> JSONResponse:
        """Readiness: 200 when rules are loaded, the database writable and the JWKS at hand; else 503."""
        ok, checks = await asyncio.get_running_loop().run_in_executor(cds.fetch_pool, cds.readiness)
        body = {"status": "ready" if ok else "not ready", "ruleset": cds.ruleset, "version": __version__, "checks": checks}
        return JSONResponse(body, status_code=200 if ok else 503, headers=ruleset_header)

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    @app.post("/cds-services/{service_id}")
    async def hook(service_id: str, request: Request) -> Response:
        started = time.monotonic()
        known = cds.services.get(service_id)
        status = 500
        try:
            answer = await cds.hook(service_id, request)
            status = 200
        except CdsError as exc:
            status = exc.status
            raise
        except AiblError:
            raise
        except Exception as exc:  # noqa: BLE001 - one failed request must not take the details to the log
            return unexpected(request, exc)
        finally:
            elapsed = time.monotonic() - started
            hook_name = known.hook if known else "unknown"
            metrics.REQUESTS.labels(service_id if known else "unknown", hook_name, str(status)).inc()
            metrics.LATENCY.labels(hook_name).observe(elapsed)
        fill_service_urls(answer["cards"], str(request.base_url))
        for card in answer["cards"]:
            metrics.CARDS.labels(known.hook, card.get("indicator", "info")).inc()
        log.info("%s: %d card(s) in %.1f ms", service_id, len(answer["cards"]), elapsed * 1000)
        return Response(orjson.dumps(answer), media_type="application/json", headers=ruleset_header)

    @app.post("/cds-services/{service_id}/feedback")
    async def feedback(service_id: str, request: Request) -> Response:
        try:
            await cds.feedback(service_id, request)
        except AiblError:
            raise
        except Exception as exc:  # noqa: BLE001
            return unexpected(request, exc)
        return JSONResponse({})

    return app
