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

One record repeats itself: every Observation carries the same `subject` and `meta`, a
series of 8 BMIs one `code`, the vitals one `category`. A complex element is validated once
per request for each distinct content (`_Elements`), and the resource is validated with the
validated instance in its place; the model accepts an instance of the element's own class
as it is, which is what it would have made of the dict. The verdict is the same: an element
whose validation fails is left as it was, for the resource's validation to judge.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from ..terminology import Terminology
from ..validation import needs_validation

_MODELS: dict[str, Any] = {}


def _model(rtype: str):
    model = _MODELS.get(rtype)
    if model is None:
        model = _MODELS[rtype] = get_fhir_model_class(rtype)
    return model


@lru_cache(maxsize=None)
def _element_fields(model) -> dict[str, Any]:
    """Member name (and alias) -> the element model class, for the complex, non-resource
    elements of `model`; resources (`contained`) are dispatched by their own resourceType."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        pending, klass = [info.annotation], None
        while pending:
            annotation = pending.pop()
            get_klass = getattr(annotation, "get_model_klass", None)
            if get_klass is not None:
                klass = get_klass()
                break
            pending.extend(typing.get_args(annotation))
        if klass is None or klass.has_resource_base():
            continue
        out[name] = klass
        if info.alias:
            out[info.alias] = klass
    return out


class _Elements:
    """Complex elements validated once per distinct content (JSON, keys sorted)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[Any, bytes], Any] = {}

    def element(self, klass, value: dict) -> Any:
        try:
            key = (klass, orjson.dumps(value, option=orjson.OPT_SORT_KEYS))
        except (orjson.JSONEncodeError, TypeError):
            return value
        hit = self._seen.get(key)
        if hit is None:
            try:
                hit = klass.model_validate(value)
            except (ValidationError, ValueError, TypeError):
                hit = value  # the resource's own validation reports it
            self._seen[key] = hit
        return hit

    def substituted(self, model, res: Mapping[str, Any]) -> dict[str, Any]:
        fields = _element_fields(model)
        data = dict(res)
        for key, value in res.items():
            klass = fields.get(key)
            if klass is None:
                continue
            if isinstance(value, dict):
                data[key] = self.element(klass, value)
            elif isinstance(value, list):
                # anything but a dict (a null, a string) stays, for the resource's validation
                data[key] = [self.element(klass, v) if isinstance(v, dict) else v for v in value]
        return data


def validate(resources: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The resources that pass FHIR R4 (R4B models) validation, and `Type/id` of the others."""
    good, bad = [], []
    elements = _Elements()
    for res in resources:
        rtype = res["resourceType"]
        try:
            model = _model(rtype)
            model.model_validate(elements.substituted(model, res))
        except (ValidationError, ValueError, TypeError, KeyError):
            bad.append(f"`{rtype}/{res.get('id', '?')}`")
            continue
        good.append(res)
    return good, bad


def validate_each(resources: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """`validate` without the shared elements: every resource on its own (the reference)."""
    good, bad = [], []
    for res in resources:
        rtype = res["resourceType"]
        try:
            _model(rtype).model_validate(res)
        except (ValidationError, ValueError, TypeError, KeyError):
            bad.append(f"`{rtype}/{res.get('id', '?')}`")
            continue
        good.append(res)
    return good, bad


def select_and_validate(
    terminology: Terminology, resources: Iterable[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The resources facts.py can read that pass validation, and `Type/id` of those that fail."""
    return validate([r for r in resources if needs_validation(r, terminology)])
