"""Prefetch: the templates this service asks EHRs to fill, and the patient's resources from what they sent.

The templates (`default_templates`) fetch everything the rules read in ten queries, one per
resource type, each bound to `{{context.patientId}}`:

- `Patient/{{context.patientId}}`: age and sex;
- `Observation?patient=...&code=...`: only the codes the value sets recognise (DXA, labs, vitals,
  smoking, alcohol; the list is generated from `rules/valuesets`), so an EHR does not ship a
  patient's thousands of unrelated observations. Code-filtered rather than category-filtered,
  because real DXA and smoking observations often carry no category (and Epic, which demands a
  category, can be given category templates through the `prefetch` setting);
- `DiagnosticReport`, `Procedure` and `ServiceRequest` by patient and DXA code (the `dxa` and
  `dxa-procedures` value sets): a DXA done, ordered or declined whose result is not on record;
- Condition, MedicationStatement, MedicationRequest, MedicationAdministration and
  FamilyMemberHistory by patient, unfiltered: their codes include prefix families (ICD-10 C50.x)
  and product-level drug codes that a token search cannot express.

`_include`/`_revinclude` would need fewer round trips, but several servers truncate them
without a `next` link (DESIGN.md, known traps), which would silently drop data.

Reading what came back (`collect`), per CDS Hooks 2.0:
- a key that is absent means "query it yourself" (the fallback query, `fhirfetch.py`);
- `null` means "there is no such data";
- an OperationOutcome means the EHR's prefetch failed: the key is unavailable and is queried
  like an absent one;
- a searchset Bundle with a `next` link is incomplete: the rest is fetched from `fhirServer`.

Patient isolation (`PatientFilter`): a prefetch is attacker-reachable input, and a Bundle may
carry other patients' resources (a misconfigured EHR query, a shared Bundle, a hostile
client). Only resources that name the context patient are kept: the Patient with that id, and
resources whose `subject` or `patient` reference resolves to it. A resource naming another
patient, or no patient at all, is dropped and counted; its content is never read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..references import (
    MEDICATION_TYPES,
    MEDICATION_USE_TYPES,
    URN_PREFIXES,
    MedicationIndex,
    fullurl_index,
    parse_reference,
    urn_id,
)
from ..sources import RELEVANT_TYPES
from ..terminology import Terminology
from .errors import BadRequestError

PATIENT_TOKEN = "{{context.patientId}}"
#: FHIR R4 id datatype
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_PATIENT_ELEMENTS = ("subject", "patient")

#: Observation codes come from these value sets (every code the facts stage recognises on an
#: Observation: DXA measures and panels, labs and vitals, and finding codes such as a parental
#: hip fracture recorded as an Observation).
_OBSERVATION_VALUESETS = ("dxa", "observations", "conditions", "risk-tools")
#: DiagnosticReport, Procedure and ServiceRequest codes: a DXA study, result or procedure code.
_DXA_EVENT_VALUESETS = ("dxa", "dxa-procedures")

#: The built-in prefetch keys and the resource type each asks for, one query per type.
KEY_TYPES = {
    "patient": "Patient",
    "observations": "Observation",
    "conditions": "Condition",
    "medication-statements": "MedicationStatement",
    "medication-requests": "MedicationRequest",
    "medication-administrations": "MedicationAdministration",
    "family-history": "FamilyMemberHistory",
    "dxa-reports": "DiagnosticReport",
    "dxa-procedures": "Procedure",
    "dxa-orders": "ServiceRequest",
}
#: Keys whose data only refines the advice: a DXA done, ordered or declined without a result. Without
#: them (an EHR registered before they existed, or a failed query) the assessment is the same but
#: for asking to order a DXA rather than to obtain a report: never a lower category. So a missing
#: or failed one is logged, never a 412.
OPTIONAL_KEYS = frozenset({"dxa-reports", "dxa-procedures", "dxa-orders"})


def default_templates(terminology: Terminology) -> dict[str, str]:
    """The built-in prefetch templates, the Observation code list taken from the value sets."""
    codes: list[str] = []
    for vs_id in _OBSERVATION_VALUESETS:
        for system, code in terminology.valueset(vs_id).exact:
            if system != "http://hl7.org/fhir/sid/icd-10-cm":  # ICD-10 codes a Condition, never an Observation
                codes.append(code)
    codes = sorted(set(codes))
    dxa_codes = sorted({code for vs_id in _DXA_EVENT_VALUESETS for _system, code in terminology.valueset(vs_id).exact})
    templates = {}
    for key, rtype in KEY_TYPES.items():
        if rtype == "Patient":
            templates[key] = f"Patient/{PATIENT_TOKEN}"
        elif rtype == "Observation":
            templates[key] = f"Observation?patient={PATIENT_TOKEN}&code={','.join(codes)}"
        elif rtype in ("DiagnosticReport", "Procedure", "ServiceRequest"):
            templates[key] = f"{rtype}?patient={PATIENT_TOKEN}&code={','.join(dxa_codes)}"
        else:
            templates[key] = f"{rtype}?patient={PATIENT_TOKEN}"
    return templates


def render(template: str, patient_id: str) -> str:
    """A template with the patient id in place; the id is checked against the FHIR id syntax first."""
    if not ID_RE.match(patient_id):
        raise BadRequestError("context.patientId is not a FHIR id")
    return template.replace(PATIENT_TOKEN, patient_id)


def template_type(template: str) -> str | None:
    """The resource type a template asks for (`Observation?...` -> Observation)."""
    match = re.match(r"^([A-Z][A-Za-z]+)(?:[/?]|$)", template)
    return match.group(1) if match else None


# --------------------------------------------------------------------------- what the EHR sent


@dataclass
class Collected:
    """The prefetch of one request, sorted into what is there and what must be fetched."""

    #: every resource found in any prefetch value (not yet filtered by patient)
    resources: list[tuple[dict, dict[str, tuple[str, str]]]] = field(default_factory=list)
    #: template keys with nothing usable: absent, or an OperationOutcome
    missing: list[str] = field(default_factory=list)
    #: template key -> `next` URL of an incomplete searchset
    incomplete: dict[str, str] = field(default_factory=dict)
    #: keys whose value was an OperationOutcome (reported in the 412 reason if they stay unavailable)
    failed: list[str] = field(default_factory=list)


def collect(prefetch: Any, templates: Mapping[str, str]) -> Collected:
    """Sort a request's `prefetch` into resources, missing keys and incomplete searches.

    Values under keys this service did not ask for are read too (an EHR may answer under
    its own names, as the CDS Hooks sandbox does); they pass the same patient filter.
    """
    out = Collected()
    if prefetch is None:
        out.missing = list(templates)
        return out
    if not isinstance(prefetch, dict):
        raise BadRequestError("prefetch must be a JSON object")
    for key in templates:
        if key not in prefetch:
            out.missing.append(key)
    for key, value in prefetch.items():
        ours = key in templates
        if value is None:
            continue  # "no such data"
        if not isinstance(value, dict) or not isinstance(value.get("resourceType"), str):
            if ours:
                raise BadRequestError(f"prefetch key {key!r} is neither null nor a FHIR resource")
            continue  # the spec's own example carries `"user": "123"` under a key nobody asked for
        if value["resourceType"] == "OperationOutcome":
            if ours:
                out.missing.append(key)
                out.failed.append(key)
            continue
        if value["resourceType"] == "Bundle":
            out.resources.extend(bundle_resources(value))
            nxt = next_link(value)
            if nxt and ours:
                out.incomplete[key] = nxt
        else:
            out.resources.append((value, {}))
    return out


def next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and isinstance(link.get("url"), str):
            return link["url"]
    return None


def bundle_resources(bundle: Mapping[str, Any]) -> Iterator[tuple[dict, dict[str, tuple[str, str]]]]:
    """(resource, fullUrl map of its Bundle) for every resource in a Bundle, nested Bundles included.

    The fullUrl map resolves `urn:uuid:` references, which mean something only inside
    their own Bundle (transactions).
    """
    entries = bundle.get("entry")
    if not isinstance(entries, list):
        return
    urns = fullurl_index(entries)
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            continue
        if resource["resourceType"] == "Bundle":
            yield from bundle_resources(resource)
            continue
        if "id" not in resource:
            from_urn = urn_id(entry.get("fullUrl"))
            if from_urn:
                resource = {**resource, "id": from_urn}
        yield resource, urns


# --------------------------------------------------------------------------- one patient only


@dataclass
class Filtered:
    resources: list[dict]
    #: resources about another patient: dropped unread
    other_patient: int = 0
    #: resources of a relevant type that name no patient at all: not read (ownership unprovable)
    unowned: int = 0
    #: their `Type/id`: sent for this patient's hook, so the assessment counts them as entries of
    #: the record that could not be read (never low; an aromatase inhibitor among them flagged)
    unowned_labels: list[str] = field(default_factory=list)
    #: (type, id) of Medications the kept resources reference and nothing sent (fetch them, else flagged)
    unresolved_medications: list[tuple[str, str]] = field(default_factory=list)


def patient_of(resource: Mapping[str, Any], urns: Mapping[str, tuple[str, str]] | None = None) -> str | None:
    """The id of the patient a resource is about, or None if it names none it can be matched by."""
    if resource.get("resourceType") == "Patient":
        rid = resource.get("id")
        return rid if isinstance(rid, str) and rid else None
    for element in _PATIENT_ELEMENTS:
        ref = resource.get(element)
        if not isinstance(ref, dict):
            continue
        value = ref.get("reference")
        if not isinstance(value, str) or not value.strip():
            continue
        target = parse_reference(value, urns)  # relative, absolute, versioned, urn:uuid (fhir_aibl/references.py)
        if target is not None and target[0] == "Patient":
            return target[1]
    return None


def for_patient(items: Iterable[tuple[dict, Mapping[str, tuple[str, str]]]], patient_id: str) -> Filtered:
    """The resources about `patient_id` (relevant types only), one per type/id, the newest version.

    Returned resources are shallow copies whose `subject`/`patient` reference is rewritten
    to `Patient/<id>` when it was a `urn:uuid:`, so later stages see one reference form; the
    request's own objects are never modified.
    """
    kept: dict[tuple, dict] = {}
    out = Filtered(resources=[])
    anonymous = 0
    items = list(items)
    # Medications name no patient: any sent (an `_include`, a key of their own, a fetch) may be
    # what a medicationReference of this patient's points to (fhir_aibl/references.py).
    medications = MedicationIndex()
    for resource, urns in items:
        if resource.get("resourceType") in MEDICATION_TYPES:
            medications.add(resource, urns=urns)
    for resource, urns in items:
        rtype = resource.get("resourceType")
        if rtype not in RELEVANT_TYPES:
            continue
        owner = patient_of(resource, urns)
        if owner is None:
            out.unowned += 1
            out.unowned_labels.append(f"{rtype}/{resource.get('id') if isinstance(resource.get('id'), str) else '?'}")
            continue
        if owner != patient_id:
            out.other_patient += 1
            continue
        resource = _normalised(resource, patient_id)
        if rtype in MEDICATION_USE_TYPES and "medicationReference" in resource:
            resource = medications.inline(resource, urns)
            for target in medications.unresolved(resource):
                if target not in out.unresolved_medications:
                    out.unresolved_medications.append(target)
        rid = resource.get("id")
        if isinstance(rid, str) and rid:
            key: tuple = (rtype, rid)
        else:
            anonymous += 1
            key = (rtype, None, anonymous)
        old = kept.get(key)
        if old is None or _newer(resource, old):
            kept[key] = resource
    # The Patient first (facts reads it first), then the rest in arrival order.
    out.resources = sorted(kept.values(), key=lambda r: r.get("resourceType") != "Patient")
    return out


def _normalised(resource: dict, patient_id: str) -> dict:
    for element in _PATIENT_ELEMENTS:
        ref = resource.get(element)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"].startswith(URN_PREFIXES):
            return {**resource, element: {**ref, "reference": f"Patient/{patient_id}"}}
    return resource


def _newer(new: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    nv = str((new.get("meta") or {}).get("versionId", ""))
    ov = str((old.get("meta") or {}).get("versionId", ""))
    if nv.isdigit() and ov.isdigit():
        return int(nv) > int(ov)
    return False
