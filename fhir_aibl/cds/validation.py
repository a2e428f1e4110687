"""Which prefetched resources are validated against the FHIR R4 models, and the validation itself.

Validating a resource with the R4B pydantic models costs 50 to 100 µs (DESIGN.md, "Parse what
you use"); a patient-view prefetch of a real record holds 150 resources or more, most of them
Observations the rules never read (heart rate, electrolytes, blood counts: the EHR may ignore
the Observation template's code filter, or answer under keys of its own). Validating all of
them was most of a request's cost. So, as the design asks, the resources the facts stage can
read are selected first and only those are validated (`select_and_validate`), by the decision
the file reader uses too (`fhir_aibl.validation.needs_validation`: `facts.reads_resource`, and
any resource that test trips over): the Patient, every FamilyMemberHistory, and the
Observations, Conditions and medications whose codes the value sets recognise. Everything
else is dropped unvalidated and unread: facts.py would have ignored it, so the assessment is
the one validating everything gives; only an invalid resource the rules could not have read
is no longer named on the card.

One record repeats itself: a series of 8 BMIs differ only in their id, date and value, the
vitals share `subject`, `category` and `meta`. Each request validates with a
`fhir_aibl.validation.ValidationMemo` of its own, the one the file reader uses: a resource
whose shape already passed in this request is accepted without running the models again,
with the same verdicts as validating each resource alone (its module docstring says why).
Nothing is kept from one request to the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..terminology import Terminology
from ..validation import ValidationMemo, needs_validation, salvage


def validate(resources: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str], list[str]]:
    """The resources to use, `Type/id` of those left out, and `Type/id` of those read in part.

    A resource that fails FHIR R4 (R4B models) validation is read without its invalid elements
    where losing them can only make it say less (`fhir_aibl.validation.salvage`: a malformed
    dosage text must not hide an aromatase inhibitor), else left out.
    """
    good, bad, partly = [], [], []
    memo = ValidationMemo()
    for res in resources:
        try:
            problem = memo.problem(res)
        except KeyError:  # no resourceType, or one the models do not know
            problem = True
        if problem is not None:
            kept = salvage(res, problem) if isinstance(problem, Exception) else None
            name = f"`{res.get('resourceType', '?')}/{res.get('id', '?')}`"
            if kept is None:
                bad.append(name)
                continue
            partly.append(name)
            res = kept.resource
        good.append(res)
    return good, bad, partly


def select_and_validate(
    terminology: Terminology, resources: Iterable[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], list[str], list[str]]:
    """The resources facts.py can read, valid or read in part, `Type/id` of those left out and of those read in part."""
    return validate([r for r in resources if needs_validation(r, terminology)])
