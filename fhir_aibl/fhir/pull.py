"""Pull one patient's record from a FHIR server, in as few round trips as the server allows.

What is pulled: the Patient, and their Observation, MedicationStatement, MedicationRequest,
MedicationAdministration (the rules read IV antiresorptive doses from it), Condition,
FamilyMemberHistory, and DiagnosticReport, Procedure and ServiceRequest (a DXA done, ordered
or declined whose result is not on record), all pages of each; with write-back, also the patient's CarePlans
carrying fhir-aibl's identifier system (to find what an earlier run wrote).

How, best first:

1. batch: one `POST [base]` batch Bundle of a read of the Patient and one search per
   type (one round trip, plus one per extra page of a type with more than a page);
2. `_revinclude`: `GET Patient?_id=<id>&_revinclude=Observation:patient&...` for the
   types the server declares it can reverse-include, separate searches for the rest
   (only when batch is off or refused: several servers truncate `_revinclude` without a
   `next` link, so a profile can switch it off);
3. one search per type.

A refusal at run time (400, 404, 405, 415, 422, 501 on the batch itself, or on the
`_revinclude` search) switches the puller to the next way for the rest of the run.

Safety: every resource of a patient-scoped search must name that patient in `subject` or
`patient`; one that names another raises CrossPatient and the patient fails (the server
did not apply the filter; nothing it answered can be trusted). A resource naming no
patient at all is dropped with a warning, as the file reader does. A search the server
says it did not apply (an OperationOutcome entry) raises IgnoredParameter. A type the
server cannot search by patient at all is handled per `VendorProfile.unsearchable`.
The resources the rules read (`validation.needs_validation`, the file reader's decision) are
validated with the FHIR R4 (R4B) models and FHIR JSON types, as the file reader does, with
one validation memo for the whole run; an invalid one is read without its invalid elements where
losing them can only make it say less (`validation.salvage`), else left out, and either way named
as an error of the patient (the run exits 1), so that a server record and a file of the same
record give the same assessment and the same exit status. A resource the rules
never read (a heart rate) is passed on unvalidated, as the file reader passes it on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..careplan import IDENTIFIER_SYSTEM
from ..references import MEDICATION_USE_TYPES, MedicationIndex, medication_reference, parse_reference
from ..sources import RELEVANT_TYPES
from ..terminology import Terminology, default_terminology
from ..validation import Salvaged, ValidationMemo, full_problem, model_for, needs_validation, salvage, salvaged_note
from .client import FhirClient, SearchSpec, entry_status
from .errors import ConfigError, CrossPatient, NotFound, NotSupported, ServerError, server_error

log = logging.getLogger("fhir_aibl.fhir")

#: The types the rules read, besides the Patient, in the order a pull asks for them; the
#: same set as the file source's (checked below, so the two never drift apart).
PULL_TYPES = (
    "Observation",
    "MedicationStatement",
    "MedicationRequest",
    "MedicationAdministration",
    "Condition",
    "FamilyMemberHistory",
    "DiagnosticReport",
    "Procedure",
    "ServiceRequest",
)
assert set(PULL_TYPES) == RELEVANT_TYPES - {"Patient"}, "pull and file source read different resource types"
#: Statuses of a batch POST that mean "this server does not do batch here", not "this batch is wrong".
_BATCH_REFUSED = frozenset({400, 404, 405, 415, 422, 501})
_PATIENT_ELEMENTS = ("subject", "patient")
#: Medication ids per `Medication?_id=` search (keeps the URL short).
_ID_CHUNK = 50
#: FHIR R4 id datatype. A patient id goes into URLs and batch entries: anything else
#: (`1&patient=2`, `../Group/x`) could turn one patient's search into another's.
_ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass
class PatientPull:
    patient_id: str
    #: the Patient first, then the other types in PULL_TYPES order; validated, deduplicated
    resources: list[dict]
    #: the patient's CarePlans with an identifier of fhir-aibl's system, any status
    careplans: list[dict] = field(default_factory=list)
    #: HTTP requests to the FHIR server this pull took (round trips)
    requests: int = 0
    strategy: str = ""
    warnings: list[str] = field(default_factory=list)
    #: resources that failed validation: errors of the run (exit 1), as `assess` reports them
    invalid: list[str] = field(default_factory=list)
    #: `Type/id` of those left out (not even read in part): the assessment must know (facts.extract_facts)
    unreadable: list[str] = field(default_factory=list)

    @property
    def patient_ref(self) -> str:
        return f"Patient/{self.patient_id}"


def patient_of(resource: Mapping[str, Any], base_url: str) -> str | None:
    """The id of the patient a resource belongs to (its own id for a Patient), or None.

    Accepts `Patient/<id>`, `Patient/<id>/_history/<v>` and absolute references on this
    server's base; an absolute reference to another base is not known to be this server's
    patient (see `patient_elsewhere`).
    """
    pid, elsewhere = patient_reference(resource, base_url)
    return None if elsewhere else pid


def patient_elsewhere(resource: Mapping[str, Any], base_url: str) -> str | None:
    """The `<id>` of an absolute `.../Patient/<id>` reference on a base other than `base_url`, or None.

    A server behind a proxy, or known by several names, can hold absolute references on a base
    other than the one the client was given. The server's own search by patient is then what
    says whose the resource is: a resource it answers for this patient is kept (with a warning),
    and an aromatase inhibitor recorded that way still selects the patient.
    """
    pid, elsewhere = patient_reference(resource, base_url)
    return pid if elsewhere else None


def _reference_value(resource: Mapping[str, Any]) -> str | None:
    """The first non-empty `subject`/`patient` reference of a resource, stripped; None if none."""
    for element in _PATIENT_ELEMENTS:
        ref = resource.get(element)
        value = ref.get("reference") if isinstance(ref, dict) else None
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def patient_reference(resource: Mapping[str, Any], base_url: str) -> tuple[str | None, bool]:
    """(the patient id a resource names, whether by an absolute reference on a base other than
    `base_url`): what `patient_of` and `patient_elsewhere` each take half of."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return (rid if isinstance(rid, str) and rid else None), False
    value = _reference_value(resource)
    if value is None:
        return None, False
    target = parse_reference(value)  # relative, absolute, versioned (fhir_aibl/references.py)
    if target is None or target[0] != "Patient":
        return None, False
    elsewhere = value.startswith(("http://", "https://")) and not value.startswith(base_url.rstrip("/") + "/")
    return target[1], elsewhere


def _version(resource: Mapping[str, Any]) -> int:
    version = str((resource.get("meta") or {}).get("versionId", ""))
    return int(version) if version.isdigit() else -1


def validation_problem(resource: Mapping[str, Any], memo: ValidationMemo | None = None) -> str | None:
    """Why a resource fails FHIR R4 validation (first reasons), or None.

    `memo` (one per pull) skips the models for a resource whose shape already passed, with
    the same verdicts (fhir_aibl/validation.py); every message comes from a full validation.
    """
    from pydantic import ValidationError

    rtype = resource.get("resourceType")
    try:
        model_for(rtype)
    except (KeyError, ValueError, TypeError):
        return f"unknown resource type {rtype!r}"
    exc = (memo or ValidationMemo(limit=0)).problem(resource)
    if exc is None:
        return None
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        reasons = ["/".join(str(p) for p in err["loc"]) + f": {err['msg']}" for err in errors[:3]]
        return "; ".join(reasons)
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _salvaged(resource: dict) -> Salvaged | None:
    """The invalid resource without its invalid elements, where that is safe (fhir_aibl/validation.py), or None."""
    try:
        exc = full_problem(resource)
    except KeyError:
        return None
    return salvage(resource, exc) if exc is not None else None


class Puller:
    """Pulls patients from one server; learns at run time what the server refuses.

    Not thread-safe (it caches type scans and what the server refused); use one per worker.
    """

    def __init__(self, client: FhirClient, *, careplans: bool = False, terminology: Terminology | None = None):
        self.client = client
        self.careplans = careplans
        #: the value sets the pulled records are assessed with: what they read is what is validated
        self.terminology = terminology or default_terminology()
        self._memo = ValidationMemo()  # shapes that passed validation, for the whole run (bounded)
        self._batch_refused = False
        self._revinclude_refused = False
        self._scans: dict[str, dict[str, list[dict]]] = {}
        self.warnings_once: list[str] = []
        # Medications are shared between patients (a formulary): read once per run, kept by id.
        self.medications = MedicationIndex()
        self._medications_missing: set[str] = set()

    # -- planning ----------------------------------------------------------------------------
    def _patient_param(self, resource_type: str) -> str | None:
        caps = self.client.capabilities()
        for name in ("patient", "subject"):
            if caps.search_param(resource_type, name) is not False:
                return name
        return None

    def searches(self, patient_id: str) -> tuple[list[tuple[str, SearchSpec]], list[str]]:
        """(purpose, search) for the patient, and the types that cannot be searched by patient."""
        profile = self.client.profile
        count = ("_count", str(profile.page_size))
        out: list[tuple[str, SearchSpec]] = []
        unsearchable: list[str] = []
        for rtype in PULL_TYPES:
            param = self._patient_param(rtype)
            if param is None:
                unsearchable.append(rtype)
                continue
            base = SearchSpec(rtype, ((param, patient_id),))
            if rtype in MEDICATION_USE_TYPES and self._include_medication(rtype):
                base = base.with_params(("_include", f"{rtype}:medication"))
            if rtype == "Observation" and profile.observation_category_required:
                # Epic refuses Observation searches without a category: one search per category.
                for category in profile.observation_categories:
                    out.append(("clinical", base.with_params(("category", category), count)))
            else:
                out.append(("clinical", base.with_params(count)))
        if self.careplans:
            param = self._patient_param("CarePlan") or "patient"
            spec = SearchSpec("CarePlan", ((param, patient_id),))
            if self.client.capabilities().search_param("CarePlan", "identifier") is not False:
                spec = spec.with_params(("identifier", f"{IDENTIFIER_SYSTEM}|"))
            out.append(("careplan", spec.with_params(count)))
        return out, unsearchable

    def _include_medication(self, rtype: str) -> bool:
        """`_include=<rtype>:medication` where the profile allows it and the server declares it (a
        strict server refuses an include it does not know, and that would fail the patient)."""
        return self.client.profile.medication_include and self.client.capabilities().include(rtype, f"{rtype}:medication") is True

    def _use_batch(self) -> bool:
        return (
            self.client.profile.batch
            and not self._batch_refused
            and self.client.capabilities().supports_batch() is not False
        )

    # -- pulling -----------------------------------------------------------------------------
    def pull(self, patient_id: str) -> PatientPull:
        if not _ID_RE.match(patient_id or ""):
            raise ConfigError(f"not a FHIR resource id (1-64 of A-Z a-z 0-9 - .): {patient_id!r}")
        before = self.client.stats.requests
        searches, unsearchable = self.searches(patient_id)
        result = PatientPull(patient_id=patient_id, resources=[])
        found: list[tuple[str, list[dict]]] = []  # (purpose, resources) in plan order
        patient: dict | None = None
        if self._use_batch():
            try:
                patient, found = self._pull_batch(patient_id, searches)
                result.strategy = "batch"
            except ServerError as exc:
                if exc.status not in _BATCH_REFUSED or getattr(exc, "batch_entry", False):
                    raise
                self._batch_refused = True
                self._warn_once(f"the server refused a batch of searches ({exc.status}); searching type by type")
        if not result.strategy:
            patient, found, result.strategy = self._pull_searches(patient_id, searches)
        for rtype in unsearchable:
            found.append(("clinical", self._unsearchable(rtype, patient_id, result)))
        if patient is None:
            # Not found (404/410): the patient's other resources are still assessed, with age and
            # sex unknown (rule AGE-UNKNOWN: never a category lower than the data support); the
            # runner names the missing Patient as a problem of the run.
            result.warnings.append(f"Patient/{patient_id}: the server has no such Patient resource")
        found = self._resolve_medications(found)
        self._assemble(result, patient, found)
        result.requests = self.client.stats.requests - before
        return result

    def _pull_batch(self, patient_id: str, searches: list[tuple[str, SearchSpec]]):
        entries = [{"request": {"method": "GET", "url": f"Patient/{patient_id}"}}]
        entries += [{"request": {"method": "GET", "url": spec.url()}} for _, spec in searches]
        answers = self.client.batch(entries, read_only=True, what="batch of searches")
        try:
            patient = self._entry_resource(answers[0], f"GET Patient/{patient_id}")
        except NotFound:
            patient = None
        found = []
        for (purpose, spec), answer in zip(searches, answers[1:], strict=True):
            first = self._entry_resource(answer, spec.describe())
            found.append((purpose, self.client.collect(first, spec)))
        return patient, found

    @staticmethod
    def _entry_resource(entry: Mapping[str, Any], what: str) -> Any:
        status = entry_status(entry)
        if 200 <= status < 300 and isinstance(entry.get("resource"), dict):
            return entry["resource"]
        outcome = (entry.get("response") or {}).get("outcome") or entry.get("resource")
        err = server_error(status or 500, "", outcome, what=f"{what} (in a batch)")
        err.batch_entry = True  # a refused entry is about this request, not about batch support
        raise err

    def _pull_searches(self, patient_id: str, searches: list[tuple[str, SearchSpec]]):
        profile = self.client.profile
        caps = self.client.capabilities()
        via_rev: list[int] = []
        if profile.revinclude and not self._revinclude_refused:
            for i, (_, spec) in enumerate(searches):
                param = spec.params[0][0]
                extra = [p for p in spec.params[1:] if p[0] != "_count"]
                if (
                    param == "patient"
                    and not extra
                    and caps.rev_include("Patient", f"{spec.resource_type}:patient") is not False
                ):
                    via_rev.append(i)
        found: list[tuple[str, list[dict]]] = [(purpose, []) for purpose, _ in searches]
        if via_rev:
            spec = SearchSpec(
                "Patient",
                (("_id", patient_id),)
                + tuple(("_revinclude", f"{searches[i][1].resource_type}:patient") for i in via_rev),
            )
            try:
                resources = self.client.search(spec)
            except ServerError as exc:
                if exc.status not in _BATCH_REFUSED:
                    raise
                self._revinclude_refused = True
                self._warn_once(f"the server refused _revinclude ({exc.status}); searching type by type")
                return self._pull_searches(patient_id, searches)
            patients = [r for r in resources if r.get("resourceType") == "Patient" and r.get("id") == patient_id]
            if patients:
                patient = patients[0]
                by_type: dict[str, list[dict]] = {}
                for r in resources:
                    if r is not patient:
                        by_type.setdefault(r.get("resourceType", ""), []).append(r)
                for i in via_rev:
                    found[i] = (searches[i][0], by_type.pop(searches[i][1].resource_type, []))
            else:
                # No such Patient: _revinclude answers nothing else either, so search type by type.
                patient = None
                via_rev = []
            strategy = "revinclude"
        else:
            try:
                patient = self.client.read("Patient", patient_id)
            except NotFound:
                patient = None
            strategy = "searches"
        for i, (purpose, spec) in enumerate(searches):
            if i not in via_rev:
                found[i] = (purpose, self.client.search(spec))
        return patient, found, strategy

    # -- medications by reference ---------------------------------------------------------------
    def _resolve_medications(self, found: list[tuple[str, list[dict]]]) -> list[tuple[str, list[dict]]]:
        """Medications out of the answers (an `_include`, or sent on the server's own), the ones still
        missing read by id, and each medication resource given its Medication as a contained one
        (fhir_aibl/references.py). A Medication the server does not have stays unresolved: the
        facts stage flags it (medication-unresolved)."""
        found = [(purpose, [r for r in resources if not self.medications.add(r)]) for purpose, resources in found]
        wanted: list[str] = []
        for _purpose, resources in found:
            for r in resources:
                if r.get("resourceType") not in MEDICATION_USE_TYPES:
                    continue
                for rtype, rid in self.medications.unresolved(r):
                    if rtype == "Medication" and self._on_this_server(medication_reference(r)):
                        if rid not in self._medications_missing and rid not in wanted:
                            wanted.append(rid)
        if wanted:
            self._read_medications(wanted)
        return [
            (purpose, [self.medications.inline(r) if r.get("resourceType") in MEDICATION_USE_TYPES else r for r in resources])
            for purpose, resources in found
        ]

    def _on_this_server(self, reference: Any) -> bool:
        value = str(reference or "").strip()
        if value.startswith(("http://", "https://")):
            return value.startswith(self.client.base_url.rstrip("/") + "/")
        return parse_reference(value) is not None

    def _read_medications(self, ids: list[str]) -> None:
        """Read Medications by id: one batch, else `Medication?_id=a,b,..`, else one read each."""
        caps = self.client.capabilities()
        if self._use_batch():
            entries = [{"request": {"method": "GET", "url": f"Medication/{rid}"}} for rid in ids]
            for answer in self.client.batch(entries, read_only=True, what="batch of Medication reads"):
                if 200 <= entry_status(answer) < 300:
                    self.medications.add(answer.get("resource"))
        elif caps.search_param("Medication", "_id") is not False:
            for i in range(0, len(ids), _ID_CHUNK):
                spec = SearchSpec("Medication", (("_id", ",".join(ids[i : i + _ID_CHUNK])), ("_count", str(_ID_CHUNK))))
                self.medications.add_all(self.client.search(spec))
        else:
            for rid in ids:
                try:
                    self.medications.add(self.client.read("Medication", rid))
                except ServerError as exc:
                    if exc.status not in (404, 410):
                        raise
        for rid in ids:
            if not self.medications.knows("Medication", rid):
                self._medications_missing.add(rid)
                self._warn_once(f"Medication/{rid} is referenced but the server does not return it")

    def _unsearchable(self, rtype: str, patient_id: str, result: PatientPull) -> list[dict]:
        mode = self.client.profile.unsearchable
        why = f"the server cannot search {rtype} by patient (its CapabilityStatement lists no patient parameter)"
        if mode == "fail":
            raise NotSupported(why)
        if mode == "skip":
            result.warnings.append(f"{why}: {rtype} left out")
            return []
        if rtype not in self._scans:
            # Once per run: every resource of the type, kept by patient. Other patients' resources
            # are held only in this index and never handed to another patient's assessment.
            self._warn_once(f"{why}: reading all {rtype} once and keeping each patient's own")
            spec = SearchSpec(rtype, (("_count", str(self.client.profile.page_size)),))
            index: dict[str, list[dict]] = {}
            for r in self.client.search(spec, max_pages=self.client.settings.population_max_pages):
                pid = patient_of(r, self.client.base_url)
                if pid is not None:
                    index.setdefault(pid, []).append(r)
            self._scans[rtype] = index
        return list(self._scans[rtype].get(patient_id, []))

    def _warn_once(self, message: str) -> None:
        if message not in self.warnings_once:
            self.warnings_once.append(message)
            log.info(message)

    def _assemble(self, result: PatientPull, patient: Any, found: Iterable[tuple[str, list[dict]]]) -> None:
        pid = result.patient_id
        base = self.client.base_url
        if patient is not None and (
            not isinstance(patient, dict) or patient.get("resourceType") != "Patient" or patient.get("id") != pid
        ):
            raise CrossPatient(f"Patient/{pid}: the server answered a different resource for the Patient read")
        kept: dict[tuple[str, str], dict] = {("Patient", pid): patient} if patient is not None else {}
        careplans: dict[str, dict] = {}
        for purpose, resources in found:
            for r in resources:
                named, elsewhere = patient_reference(r, base)
                owner = None if elsewhere else named
                label = f"{r.get('resourceType')}/{r.get('id')}"
                if elsewhere and named == pid:
                    # the server answered it to a search by this patient: its own name for itself
                    owner = pid
                    result.warnings.append(
                        f"{label}: names Patient/{pid} on another base "
                        f"({_reference_value(r)}); kept, as the server answered it for this patient"
                    )
                if owner is None:
                    result.warnings.append(f"{label}: dropped, it names no patient this server holds")
                    if named is None and purpose != "careplan":
                        # answered to this patient's search, naming no patient at all: not read, but
                        # not taken for absent either (facts.extract_facts: never low, a drug flagged)
                        result.unreadable.append(label)
                    continue
                if owner != pid:
                    raise CrossPatient(
                        f"Patient/{pid}: a search for this patient returned {label} of another patient; "
                        "the server did not apply the patient filter, nothing it answered is used"
                    )
                if purpose == "careplan":
                    if r.get("resourceType") == "CarePlan" and any(
                        (i or {}).get("system") == IDENTIFIER_SYSTEM for i in r.get("identifier") or []
                    ):
                        careplans[r["id"]] = r
                    continue
                key = (r.get("resourceType", ""), r.get("id", ""))
                old = kept.get(key)
                if old is None or _version(r) > _version(old):
                    kept[key] = r
        valid: list[dict] = []
        for r in kept.values():
            problem = validation_problem(r, self._memo) if needs_validation(r, self.terminology) else None
            if problem is None:
                valid.append(r)
                continue
            kept = _salvaged(r)
            if kept is not None:  # read without its invalid elements: losing them can only make it say less
                valid.append(kept.resource)
                result.invalid.append(
                    f"{r.get('resourceType')}/{r.get('id')}: fails FHIR R4 validation: {problem}{salvaged_note(kept)}"
                )
            else:
                result.invalid.append(
                    f"{r.get('resourceType')}/{r.get('id')}: fails FHIR R4 validation, left out: {problem}"
                )
                result.unreadable.append(f"{r.get('resourceType')}/{r.get('id')}")
        order = {t: i for i, t in enumerate(("Patient", *PULL_TYPES))}
        valid.sort(key=lambda r: order.get(r.get("resourceType"), len(order)))  # stable: server order within a type
        result.resources = valid
        result.careplans = sorted(careplans.values(), key=lambda c: c.get("id", ""))
