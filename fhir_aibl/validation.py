"""FHIR R4 validation of incoming resources (fhir.resources R4B models), with a memo of what passed.

`ValidationMemo.problem(resource)` answers exactly what `Model.model_validate(resource)`
answers: None if the model accepts the resource, else the pydantic error. It is the same
question, asked of fewer resources.

Why a memo, and why it gives the same answers
---------------------------------------------
A model validation costs 70-150 µs (fhir.resources runs Python validators on every
nested element), and a record's readable resources are mostly the same few kinds over
and over: a patient's eight body heights differ from each other, and from every other
patient's, only in their id, subject, encounter, date and value. So the memo remembers the
*shape* of each resource that passed: the resource with those few leaves (listed in
`_VARYING`) replaced by a placeholder. A later resource with the same shape is accepted
without running the models if each of its replaced leaves passes the very validator its
field has in the model (a pydantic `TypeAdapter` of the field's own annotation).

That is sound because of how the R4B models validate (fhir_core 1.x, checked by
tests/test_validation.py against the full models): every field is validated on its own
value, with no field validators that read other fields; the model-level validators look
only at which fields are present (`choice[x]` one-of-many, required primitives) and at
nulls inside lists (`reject_null_complex_elements`). Two resources of one shape have the
same fields present, the same nulls and identical values everywhere except at the
replaced leaves, where both values pass the field's validator (and are not null). So the
models accept one exactly when they accept the other.

Nothing about a failure is remembered: a resource that does not hit the memo, or has a
replaced leaf its field rejects, is validated in full, and every error message comes from
that full validation, unchanged. The placeholder stands at the listed paths only, in
every resource of a type, so two shapes are equal only where the resources agree literally
everywhere else. The memo is held per reading (one `iter_records` call) and capped at `MEMO_LIMIT` shapes,
so memory stays bounded whatever the input.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Callable, Mapping
from typing import Any

from .facts import reads_resource
from .terminology import Terminology

try:  # shapes are compared as their orjson serialisation (exact: 1 and 1.0 and True differ)
    import orjson
except ImportError:  # pragma: no cover - without orjson every resource is validated in full
    orjson = None  # type: ignore[assignment]

__all__ = ["MEMO_LIMIT", "ValidationMemo", "model_for", "needs_validation"]


def _checked_versions() -> bool:
    """True on the fhir.resources / fhir_core major versions the argument above was checked against.

    A later major version might add validators that compare fields (FHIRPath invariants);
    there the memo stands aside and every resource is validated in full until it is re-checked.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fhir.resources").split(".")[0] == "8" and version("fhir_core").split(".")[0] == "1"
    except PackageNotFoundError:  # pragma: no cover - installed some other way: do not assume
        return False

#: Shapes remembered per reading, ~1 kB each (5 MB at most). The common shapes come early and
#: recur; the rest (a medication's dosage details) are mostly one-offs, not worth keeping.
MEMO_LIMIT = 5_000

#: The leaves that make resources of one kind differ: identity, patient, encounter, times and
#: the measured value. Paths of dict keys; lists are never entered (a list leaf stays literal).
_META = (("id",), ("meta", "versionId"), ("meta", "lastUpdated"))
_SUBJECT = (("subject", "reference"),)
_VARYING: dict[str, tuple[tuple[str, ...], ...]] = {
    "Observation": _META + _SUBJECT + (("encounter", "reference"), ("effectiveDateTime",), ("effectiveInstant",),
                                       ("effectivePeriod", "start"), ("effectivePeriod", "end"), ("issued",),
                                       ("valueQuantity", "value")),
    "Condition": _META + _SUBJECT + (("encounter", "reference"), ("onsetDateTime",), ("onsetPeriod", "start"),
                                     ("onsetPeriod", "end"), ("abatementDateTime",), ("recordedDate",)),
    "MedicationStatement": _META + _SUBJECT + (("context", "reference"), ("effectiveDateTime",),
                                               ("effectivePeriod", "start"), ("effectivePeriod", "end"), ("dateAsserted",)),
    "MedicationRequest": _META + _SUBJECT + (("encounter", "reference"), ("authoredOn",)),
    "MedicationAdministration": _META + _SUBJECT + (("context", "reference"), ("effectiveDateTime",),
                                                    ("effectivePeriod", "start"), ("effectivePeriod", "end")),
    "FamilyMemberHistory": _META + (("patient", "reference"), ("date",)),
    # Patient: one per record, every one different (names, identifiers): always validated in full.
}
#: Leaf values remembered as valid per reading (~4 MB at most; then forgotten and started again):
#: the repeats that matter are within one patient's record, which is read in one piece.
_LEAVES_LIMIT = 20_000
_SCALARS = (str, int, float, bool)
#: Stands where a replaced leaf was.
_PLACEHOLDER = "\x00valid"

_MODELS: dict[str, Any] = {}
_MEMO_SOUND = functools.lru_cache(maxsize=1)(_checked_versions)
_PLANS: dict[str, tuple[tuple[tuple[str, ...], Callable[[Any], Any]], ...]] = {}


def needs_validation(resource: Mapping[str, Any], terminology: Terminology) -> bool:
    """Whether a resource is validated before the facts stage sees it: when `facts.reads_resource` says it is read.

    One decision for the file reader (sources.py) and the CDS prefetch (cds/validation.py).
    A resource on which that test raises is malformed in a way the facts stage would trip
    over too, so it is validated (and rejected, with the pydantic messages) rather than guessed at.
    """
    try:
        return reads_resource(resource, terminology)
    except Exception:  # noqa: BLE001 - any failure of the test means "validate it"
        return True


def model_for(resource_type: str) -> Any:
    """The fhir.resources R4B model class of a resource type."""
    model = _MODELS.get(resource_type)
    if model is None:
        # Imported on first use: loading the fhir.resources models costs ~0.5 s, and
        # validate=False callers should not pay it.
        from fhir.resources.R4B import get_fhir_model_class

        model = _MODELS[resource_type] = get_fhir_model_class(resource_type)
    return model


def _field_validator(model: Any, path: tuple[str, ...]) -> Callable[[Any], Any] | None:
    """The validator the model applies at `path` (JSON names), or None if the path is not a plain field."""
    from pydantic import TypeAdapter

    cls = model
    for depth, name in enumerate(path):
        field = next((f for key, f in cls.model_fields.items() if (f.alias or key) == name), None)
        if field is None:
            return None
        if depth == len(path) - 1:
            if field.metadata:  # constraints beside the type: not reproduced here, so not replaced
                return None
            # the field's own annotation, under its model's config: the validation the model runs there
            return TypeAdapter(field.annotation, config=cls.model_config).validate_python
        inner = [a for a in typing.get_args(field.annotation) if a is not type(None)] or [field.annotation]
        if len(inner) != 1 or not hasattr(inner[0], "get_model_klass"):
            return None  # a list or a union of types: not entered
        cls = inner[0].get_model_klass()
    return None


_Checks = tuple[tuple[str, Callable[[Any], Any]], ...]


def _plan(resource_type: str) -> tuple[_Checks, tuple[tuple[str, _Checks], ...]]:
    """(top-level leaves, (element, its leaves) ...) with the validator of each; paths are one or two deep."""
    plan = _PLANS.get(resource_type)
    if plan is None:
        model = model_for(resource_type)
        top: list[tuple[str, Callable[[Any], Any]]] = []
        nested: dict[str, list[tuple[str, Callable[[Any], Any]]]] = {}
        for path in _VARYING.get(resource_type, ()):
            check = _field_validator(model, path)
            if check is None:
                continue
            if len(path) == 1:
                top.append((path[0], check))
            elif len(path) == 2:
                nested.setdefault(path[0], []).append((path[1], check))
        plan = _PLANS[resource_type] = (tuple(top), tuple((name, tuple(leaves)) for name, leaves in nested.items()))
    return plan


def _planned_paths(resource_type: str) -> set[tuple[str, ...]]:
    top, nested = _plan(resource_type)
    return {(leaf,) for leaf, _c in top} | {(name, leaf) for name, leaves in nested for leaf, _c in leaves}


class ValidationMemo:
    """`problem(resource)`: None if the R4B model accepts it, else the exception; remembers shapes that passed."""

    def __init__(self, limit: int = MEMO_LIMIT) -> None:
        self.limit = limit if _MEMO_SOUND() else 0
        self._valid: set[bytes] = set()
        # (validator, type, value) of leaf values that passed: a patient's subject, an
        # encounter's reference and date recur across resources. The validators are pure.
        self._leaves: set[tuple] = set()

    def problem(self, resource: dict) -> Exception | None:
        from pydantic import ValidationError

        rtype = resource["resourceType"]
        remember = self.limit > 0 and orjson is not None and rtype in _VARYING
        shape = self._shape(resource, rtype) if remember else None
        if shape is not None and shape in self._valid:
            return None
        try:
            model_for(rtype).model_validate(resource)
        except (ValidationError, ValueError, TypeError) as exc:  # fhir.resources raises the last two for a few root checks
            return exc
        if shape is not None and len(self._valid) < self.limit:
            self._valid.add(shape)
        return None

    def _shape(self, resource: dict, rtype: str) -> bytes | None:
        """The resource with its varying leaves replaced, serialised; None if one of them is not valid."""
        top, nested = _plan(rtype)
        shape = dict(resource)  # copies only: never write into the input
        for leaf, check in top:
            if leaf in shape:
                if not self._passes(check, shape[leaf]):
                    return None
                shape[leaf] = _PLACEHOLDER
        for name, leaves in nested:
            child = shape.get(name)
            if not isinstance(child, dict):
                continue
            child = shape[name] = dict(child)
            for leaf, check in leaves:
                if leaf in child:
                    if not self._passes(check, child[leaf]):
                        return None
                    child[leaf] = _PLACEHOLDER
        try:
            return orjson.dumps(shape)
        except (TypeError, orjson.JSONEncodeError):  # not JSON (a resource built in Python): validate in full
            return None

    def _passes(self, check: Callable[[Any], Any], value: Any) -> bool:
        from pydantic import ValidationError

        if value is None:
            return False  # a null is the models' business (and rare): validate in full
        scalar = type(value) in _SCALARS
        if scalar:
            seen = (check, type(value), value)  # the type too: 1, 1.0 and True are equal keys
            if seen in self._leaves:
                return True
        try:
            check(value)
        except (ValidationError, ValueError, TypeError):
            return False
        if scalar:
            if len(self._leaves) >= _LEAVES_LIMIT:
                self._leaves.clear()
            self._leaves.add(seen)
        return True
