"""FHIR R4 validation of incoming resources (fhir.resources R4B models and FHIR JSON types), with a memo.

`ValidationMemo.problem(resource)` answers exactly what `full_problem(resource)` answers:
None if the resource is valid, else why not. A resource is valid when

1. every element has the JSON type FHIR JSON gives its datatype (`json_type_problem`):
   a string for string, code, uri, date, dateTime and the other string-like primitives,
   `true`/`false` for boolean, a number for decimal, a number without fraction for integer,
   an object for a complex element, an array for a repeating one, and no `null` (except
   inside an array of primitives that has its `_element` array beside it). The pydantic
   models alone are lax here: they take `"-3.0"` for a decimal and `20200101` for a
   dateTime (as seconds since 1970), which the facts stage would then read as "no value"
   or "no date"; and a string may not exceed 1 MiB (FHIR's limit);
2. and `Model.model_validate(resource)` accepts it.

The memo asks the same question of fewer resources.

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

JSON types: two resources of one shape have the same JSON types everywhere but at the
replaced leaves (the shape is compared as orjson bytes, where `1`, `1.0`, `"1"` and `true`
differ), and each replaced leaf is checked for its JSON type as the full walk would check
it. So the memo's verdict is `full_problem`'s, which tests/test_validation.py checks with
hypothesis on resources with a wrong JSON type put in every primitive position.

Nothing about a failure is remembered: a resource that does not hit the memo, or has a
replaced leaf its field rejects, is validated in full, and every error message comes from
that full validation, unchanged. The placeholder stands at the listed paths only, in
every resource of a type, so two shapes are equal only where the resources agree literally
everywhere else. The memo is held per reading (one `iter_records` call, one CDS request, one
connector run) and capped at `MEMO_LIMIT` shapes, so memory stays bounded whatever the input.
"""

from __future__ import annotations

import datetime
import copy
import decimal
import functools
import re
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .facts import reads_resource
from .terminology import Terminology

try:  # shapes are compared as their orjson serialisation (exact: 1 and 1.0 and True differ)
    import orjson
except ImportError:  # pragma: no cover - without orjson every resource is validated in full
    orjson = None  # type: ignore[assignment]

__all__ = ["MAX_STRING", "MEMO_LIMIT", "JsonTypeError", "Salvaged", "ValidationMemo", "full_problem", "json_type_problem",
           "model_for", "needs_validation", "salvage", "salvaged_note"]


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

#: Characters in one string value, at most (FHIR R4 datatypes: "strings SHALL NOT exceed 1MB").
MAX_STRING = 1024 * 1024
#: Elements nested in one resource, at most, for resources that did not come through jsoninput.
_MAX_NESTING = 64

_MODELS: dict[str, Any] = {}
_MEMO_SOUND = functools.lru_cache(maxsize=1)(_checked_versions)
_PLANS: dict[str, tuple[tuple[tuple[str, ...], Callable[[Any], Any]], ...]] = {}


def needs_validation(resource: Mapping[str, Any], terminology: Terminology) -> bool:
    """Whether a resource is validated before the facts stage sees it: when `facts.reads_resource` says it is read.

    One decision for the file reader (sources.py) and the CDS prefetch (cds/validation.py).
    A resource on which that test raises is malformed in a way the facts stage would trip
    over too, so it is validated (and rejected, with the pydantic messages) rather than guessed at.
    So is one whose codes are not shaped as FHIR says (`coding` an object instead of a list, a
    code that is a number): the test would read no code in it and call it irrelevant, and an
    aromatase inhibitor coded that way would pass unseen instead of being reported.
    """
    if _codes_malformed(resource):
        return True
    try:
        return reads_resource(resource, terminology)
    except Exception:  # noqa: BLE001 - any failure of the test means "validate it"
        return True


#: The coded elements that say what a resource is (what `reads_resource` classifies it by).
_CODED = ("code", "medicationCodeableConcept", "valueCodeableConcept", "category")


def _codeable_malformed(value: Any) -> bool:
    if not isinstance(value, dict):
        return True
    coding = value.get("coding")
    if coding is None:
        return False
    if not isinstance(coding, list):
        return True
    for c in coding:
        if not isinstance(c, dict):
            return True
        for key in ("system", "code"):
            if key in c and not isinstance(c[key], str):
                return True
    return False


def _codes_malformed(resource: Mapping[str, Any]) -> bool:
    """Whether a coded element that classifies the resource is not a CodeableConcept as FHIR JSON has it."""
    for key in _CODED:
        value = resource.get(key)
        if value is None:
            continue
        if isinstance(value, list):  # Observation/Condition/MedicationRequest.category: a list of them
            if any(_codeable_malformed(v) for v in value):
                return True
        elif _codeable_malformed(value):
            return True
    return False


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
    """The validator the model applies at `path` (JSON names), or None if the path is not a plain field.

    The JSON-type check of the leaf comes first, as `json_type_problem` would make it.
    """
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
            is_list, kind, _child = _spec(field.annotation)
            if is_list or kind not in _SCALAR_KINDS:
                return None
            validate = TypeAdapter(field.annotation, config=cls.model_config).validate_python
            allowed = _SCALAR_KINDS[kind]

            def check(value: Any, _allowed=allowed, _validate=validate, _kind=kind) -> Any:
                if type(value) not in _allowed or (_kind == "string" and len(value) > MAX_STRING):
                    raise JsonTypeError(f"not a JSON {_kind}")
                return _validate(value)

            return check
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
        rtype = resource["resourceType"]
        remember = self.limit > 0 and orjson is not None and rtype in _VARYING
        shape = self._shape(resource, rtype) if remember else None
        if shape is not None and shape in self._valid:
            return None
        exc = full_problem(resource)
        if exc is not None:
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
        except (ValidationError, ValueError, TypeError):  # JsonTypeError is a ValueError
            return False
        if scalar:
            if len(self._leaves) >= _LEAVES_LIMIT:
                self._leaves.clear()
            self._leaves.add(seen)
        return True


# --------------------------------------------------------------------------- FHIR JSON types


class JsonTypeError(ValueError):
    """An element whose JSON type is not the one FHIR JSON gives its datatype."""


def full_problem(resource: dict) -> Exception | None:
    """None if the resource is valid FHIR R4 JSON (JSON types, then the R4B model), else the exception."""
    from pydantic import ValidationError

    rtype = resource["resourceType"]
    model = model_for(rtype)  # KeyError for a type the models do not know: the caller's business
    problem = json_type_problem(resource, model)
    if problem is not None:
        return JsonTypeError(problem)
    try:
        model.model_validate(resource)
    except (ValidationError, ValueError, TypeError) as exc:  # fhir.resources raises the last two for a few root checks
        return exc
    return None


#: JSON types (Python types as orjson and json parse them) of each primitive kind.
_SCALAR_KINDS: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "boolean": (bool,),
    "integer": (int,),  # type() is compared, so True and False are not integers
    "number": (int, float),
}
_STRING_BASES = (str, bytes, datetime.date, datetime.datetime, datetime.time, uuid.UUID)
#: (repeats?, kind, model class or None) of each field of a model class, by JSON name
_TYPE_PLANS: dict[type, dict[str, tuple[bool, str, Any]]] = {}


def _spec(annotation: Any) -> tuple[bool, str, Any]:
    """(repeats?, kind, model class) of a field annotation; kind: string, boolean, integer, number, object, resource, any."""
    ann = _optional_inner(annotation)
    is_list = typing.get_origin(ann) in (list, typing.List)  # noqa: UP006 - the models use typing.List
    if is_list:
        ann = _optional_inner(typing.get_args(ann)[0])
    if typing.get_origin(ann) is typing.Annotated:
        base = typing.get_args(ann)[0]
        if base is bool:
            return is_list, "boolean", None
        if base is int:
            return is_list, "integer", None
        if base is decimal.Decimal:
            return is_list, "number", None
        if base in _STRING_BASES or typing.get_origin(base) in (typing.Union, types.UnionType):  # Url: AnyUrl | str
            return is_list, "string", None
        return is_list, "any", None
    if ann is bool:
        return is_list, "boolean", None
    if hasattr(ann, "get_model_klass"):
        if ann.__name__ == "ResourceType":
            return is_list, "resource", None
        return is_list, "object", ann.get_model_klass()
    return is_list, "any", None  # fhir_comments, and anything not foreseen: the models decide


def _optional_inner(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _type_plan(cls: Any) -> dict[str, tuple[bool, str, Any]]:
    plan = _TYPE_PLANS.get(cls)
    if plan is None:
        plan = _TYPE_PLANS[cls] = {(f.alias or name): _spec(f.annotation) for name, f in cls.model_fields.items()}
    return plan


def json_type_problem(resource: dict, model: Any = None) -> str | None:
    """Where and how a resource's JSON types differ from FHIR JSON's, or None (see the module docstring).

    Members the model does not know are left to the model (it refuses them).
    """
    return _object_problem(resource, model or model_for(resource["resourceType"]), "", 1)


def _object_problem(obj: dict, cls: Any, path: str, depth: int) -> str | None:
    if depth > _MAX_NESTING:
        return f"{path}: nested deeper than {_MAX_NESTING} levels"
    plan = _type_plan(cls)
    for key, value in obj.items():
        spec = plan.get(key)
        if spec is None:
            continue
        where = f"{path}.{key}" if path else key
        is_list, kind, child = spec
        if value is None:
            return f"{where}: null is not allowed in FHIR JSON"
        if is_list:
            if type(value) is not list:
                return f"{where}: must be a JSON array"
            # a null keeps two arrays aligned: a primitive's values and their `_element` extensions
            nulls_allowed = isinstance(obj.get(key[1:]), list) if key[0] == "_" else (
                kind in _SCALAR_KINDS and isinstance(obj.get("_" + key), list))
            for i, item in enumerate(value):
                if item is None:
                    if nulls_allowed:
                        continue
                    return f"{where}[{i}]: null is not allowed in FHIR JSON"
                problem = _value_problem(item, kind, child, f"{where}[{i}]", depth)
                if problem is not None:
                    return problem
        else:
            problem = _value_problem(value, kind, child, where, depth)
            if problem is not None:
                return problem
    return None


def _value_problem(value: Any, kind: str, child: Any, where: str, depth: int) -> str | None:
    allowed = _SCALAR_KINDS.get(kind)
    if allowed is not None:
        if type(value) not in allowed:
            return f"{where}: must be a JSON {kind}, not {_json_name(value)}"
        if kind == "string" and len(value) > MAX_STRING:
            return f"{where}: a string longer than {MAX_STRING} characters (FHIR's 1 MB limit)"
        return None
    if kind == "object":
        if type(value) is not dict:
            return f"{where}: must be a JSON object, not {_json_name(value)}"
        return _object_problem(value, child, where, depth + 1)
    if kind == "resource":
        if type(value) is not dict or not isinstance(value.get("resourceType"), str):
            return f"{where}: must be a resource (a JSON object with a resourceType)"
        try:
            model = model_for(value["resourceType"])
        except (KeyError, ValueError, TypeError):
            return f"{where}: unknown resourceType"
        return _object_problem(value, model, where, depth + 1)
    return None


def _json_name(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    return {str: "a string", int: "an integer", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__
    )


# --------------------------------------------------------------------------- salvage

#: Elements whose loss would change whose record a resource is in, or what it is.
_NEVER_PRUNED = frozenset({"resourceType", "id", "subject", "patient", "modifierExtension", "implicitRules"})
#: Per type, elements whose loss changes which rules apply: a Patient without its sex would be graded
#: on the other sex's scores; such a Patient is left out, and the record assessed with age and sex
#: unknown (never low), as for a missing Patient.
_NEVER_PRUNED_IN = {"Patient": frozenset({"gender"})}
#: Top-level elements that say what a resource is: without them it would be read as nothing the
#: rules know (a fracture as an unknown condition, an aromatase inhibitor as an unknown drug),
#: silently. Such a resource is left out instead, and the record says entries could not be read
#: (facts.extract_facts: never low, a medication flagged).
_CLASSIFYING = frozenset({"code", "medicationCodeableConcept", "medicationReference", "condition", "relationship"})
#: Resource types whose data can reassure (a normal DXA, a normal calcium): pruned only where
#: the loss leaves them saying less (no value, no note), never where it changes what they say
#: (their status, code, date, body site): such a resource is left out, as before.
_REASSURING = frozenset({"Observation", "DiagnosticReport", "Procedure", "ServiceRequest"})
_SAFE_TO_LOSE = frozenset({
    "meta", "text", "identifier", "note", "performer", "encounter", "basedOn", "partOf", "derivedFrom",
    "hasMember", "referenceRange", "extension", "specimen", "device", "interpretation", "focus",
    "presentedForm", "media", "conclusion", "conclusionCode", "resultsInterpreter", "imagingStudy",
    "report", "complication", "followUp", "reasonCode", "reasonReference", "requester", "recorder",
    "asserter", "location", "supportingInfo", "insurance", "contained", "language",
})
_MAX_SALVAGE_ROUNDS = 8


@dataclass(frozen=True)
class Salvaged:
    """A copy of an invalid resource without its invalid elements, and the paths of what was left out."""

    resource: dict
    removed: tuple[str, ...]


def salvage(resource: Mapping[str, Any], problem: Exception) -> Salvaged | None:
    """The resource without the elements validation refused, when losing them can only make it say less.

    Patient safety: an invalid resource the rules read used to be left out whole, so that one
    malformed element (a dosage text given as a number) hid a patient's aromatase inhibitor,
    and a fracture with a malformed onset date lost its risk factor: missing data must never
    hide a patient or lower a category. So the invalid elements are removed instead, one
    round at a time, until the rest validates. What may be removed is limited (`_may_lose`):
    never the identity (id, subject, patient), a modifier extension, or what says what the resource
    is (its code, its drug, a family history's condition or relative); in data that can
    reassure (an Observation, a DXA report or procedure) only what leaves it saying less (its
    value, a note), never its status, code, date or site. A medication without its status
    reads as `unknown`, the status the rules treat as possibly taken; a Condition without its
    verification or clinical status counts, as FHIR says it does; a Patient may lose its birth
    date (then age unknown: never low), never its sex. Anything else is None: the resource is
    left out, as before. The caller still reports the validation problem.
    """
    current = copy.deepcopy(dict(resource))
    removed: list[str] = []
    for _ in range(_MAX_SALVAGE_ROUNDS):
        rtype = current.get("resourceType")
        paths = [_whole_value(rtype, p) for p in _problem_paths(problem)]
        if not paths:
            return None
        # the deepest and last first, so that removing one leaves the others' array indices as they were
        for path in sorted(set(paths), key=lambda p: [(1, x) if isinstance(x, int) else (0, x) for x in p], reverse=True):
            if not _may_lose(rtype, path) or not _remove(current, path):
                return None
            removed.append(_path_text(path))
        try:
            problem = full_problem(current)
        except KeyError:
            return None
        if problem is None:
            return Salvaged(current, tuple(dict.fromkeys(removed)))
    return None


def salvaged_note(kept: Salvaged | None) -> str:
    """What a validation error adds when the resource is read without its invalid elements."""
    if kept is None:
        return ""
    return f"; read without {', '.join(kept.removed)} (the rest of it is valid and is used)"


def _problem_paths(problem: Exception) -> list[tuple]:
    from pydantic import ValidationError

    if isinstance(problem, JsonTypeError):
        where = str(problem).split(": ", 1)[0]
        path = _parse_path(where)
        return [path] if path else []
    if isinstance(problem, ValidationError):
        paths = []
        for err in problem.errors(include_url=False, include_input=False):
            loc = tuple(err.get("loc") or ())
            if not loc or "missing" in str(err.get("type", "")):
                return []  # a root check (one of a choice) or a required element: nothing to remove
            paths.append(loc)
        return paths
    return []


def _parse_path(text: str) -> tuple:
    parts: list[Any] = []
    for name, index in re.findall(r"([^.\[\]]+)|\[(\d+)\]", text):
        parts.append(int(index) if index else name)
    return tuple(parts)


def _path_text(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _may_lose(rtype: Any, path: tuple) -> bool:
    names = [p for p in path if isinstance(p, str)]
    if not names or any(n in _NEVER_PRUNED for n in names) or names[0] in _NEVER_PRUNED_IN.get(rtype, ()):
        return False
    if names[0] in _CLASSIFYING and not (names[0] == "condition" and len(names) > 1 and names[1] != "code"):
        return False  # (a family history's condition keeps its code; its onset or note may go)
    if rtype not in _REASSURING:
        return True
    top = names[0]
    if top.startswith("value") or top in _SAFE_TO_LOSE:
        return True
    # a component loses its value (or what says which value it is): it then says nothing
    return top == "component" and len(names) > 1 and (
        names[1].startswith("value") or names[1] in _SAFE_TO_LOSE or names[1] == "code")


def _whole_value(rtype: Any, path: tuple) -> tuple:
    """In data that can reassure, a value is lost whole, never in part (a comparator without its number)."""
    if rtype in _REASSURING:
        for i, part in enumerate(path):
            if isinstance(part, str) and part.startswith("value"):
                return path[: i + 1]
    return path


def _remove(resource: dict, path: tuple) -> bool:
    """Remove what `path` names, then any object or array left empty by it."""
    if not path:
        return False
    trail: list[tuple[Any, Any]] = []
    node: Any = resource
    for part in path[:-1]:
        try:
            child = node[part]
        except (KeyError, IndexError, TypeError):
            return False
        trail.append((node, part))
        node = child
    last = path[-1]
    try:
        del node[last]
    except (KeyError, IndexError, TypeError):
        return False
    while trail and node in ({}, []):
        parent, key = trail.pop()
        del parent[key]
        node = parent
    return True
