"""Sample CDS Hooks requests built from FHIR Bundles: for tests, benchmarks and the README.

`patient_view_request(bundle)` turns a Bundle holding one patient's record (any Bundle type:
collection, searchset, transaction with `urn:uuid:` references) into the request an EHR would
send to `aibl-patient-view` with every prefetch key filled: the Patient under `patient`, and a
searchset Bundle of the patient's resources of each type under that type's key. Nothing is
left for the fallback query. `order_select_request` does the same for `aibl-order-select`
with draft orders in the context.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from .prefetch import KEY_TYPES, bundle_resources, for_patient, template_type


def _patient_ids(bundle: Mapping[str, Any]) -> list[str]:
    return [r["id"] for r, _ in bundle_resources(bundle) if r.get("resourceType") == "Patient" and isinstance(r.get("id"), str)]


def prefetch_for(bundle: Mapping[str, Any], patient_id: str, templates: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Every prefetch key filled from `bundle`, as an EHR would fill it for `patient_id`."""
    key_types = {key: template_type(t) for key, t in templates.items()} if templates else dict(KEY_TYPES)
    resources = for_patient(bundle_resources(copy.deepcopy(dict(bundle))), patient_id).resources
    prefetch: dict[str, Any] = {}
    for key, rtype in key_types.items():
        found = [r for r in resources if r.get("resourceType") == rtype]
        if rtype == "Patient":
            prefetch[key] = found[0] if found else None
            continue
        prefetch[key] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": [
{"resource": r, "search": {"mode": "match"}} for r in found
            ],
        }
    return prefetch


def patient_view_request(
    bundle: Mapping[str, Any],
    *,
    patient_id: str | None = None,
    hook_instance: str | None = None,
    fhir_server: str | None = None,
    user_id: str = "Practitioner/example",
    templates: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A patient-view request with full prefetch for the (only, or named) patient of `bundle`."""
    if patient_id is None:
        ids = _patient_ids(bundle)
        if len(ids) != 1:
            raise ValueError(f"the Bundle holds {len(ids)} Patients: name one with patient_id")
        patient_id = ids[0]
    request: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": hook_instance or str(uuid.uuid4()),
        "context": {"userId": user_id, "patientId": patient_id},
        "prefetch": prefetch_for(bundle, patient_id, templates),
    }
    if fhir_server:
        request["fhirServer"] = fhir_server
    return request


def order_select_request(
    bundle: Mapping[str, Any],
    draft_orders: Iterable[Mapping[str, Any]],
    **kwargs: Any,
) -> dict[str, Any]:
    """An order-select request: `patient_view_request` plus the draft orders in the context."""
    request = patient_view_request(bundle, **kwargs)
    request["hook"] = "order-select"
    drafts = [dict(o) for o in draft_orders]
    request["context"]["draftOrders"] = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": o} for o in drafts]}
    request["context"]["selections"] = [f"{o['resourceType']}/{o['id']}" for o in drafts if o.get("id")]
    return request


def draft_medication_request(patient_id: str, rxnorm: str, display: str, request_id: str = "draft-1") -> dict[str, Any]:
    """A draft MedicationRequest as an EHR puts it in `context.draftOrders`."""
    return {
        "resourceType": "MedicationRequest",
        "id": request_id,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": rxnorm, "display": display}],
            "text": display,
        },
        "subject": {"reference": f"Patient/{patient_id}"},
    }
