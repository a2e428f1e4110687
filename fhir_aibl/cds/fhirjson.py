"""An R4B model (fhir.resources) as the JSON object `model_dump_json()` would give, faster.

The card suggestions carry five resources built with the R4B models (validated as they are
built); turning them into JSON was a third of a hook call's card cost (1.5 ms for one
CarePlan). fhir_core's serializer is generic: for every nested element it recomputes the
class's alias map and resource-base test and goes through pydantic's `model_dump` again.
`as_json` walks the same elements in the same order with a plan made once per class, and
leaves the primitives (dates, times, numbers) to pydantic's JSON conversion, as fhir_core
does; the output is what `orjson.loads(model.model_dump_json(exclude_none=True))` gives
(checked over every suggestion the fixtures produce). Anything the walk does not know (an
element that is not a model) falls back to that call.
"""

from __future__ import annotations

import decimal
import uuid
from functools import lru_cache
from typing import Any

import orjson
from fhir_core.fhirabstractmodel import FHIR_COMMENTS_FIELD_NAME, FHIRAbstractModel
from fhir_core.utils import is_primitive_type
from pydantic_core import to_jsonable_python


class _Unknown(Exception):
    """Something the walk does not reproduce: use fhir_core's serializer."""


@lru_cache(maxsize=None)
def _plan(cls) -> tuple[str | None, tuple[tuple[str, str, bool, str | None, str | None], ...]]:
    """(resourceType or None, [(JSON key, field name, primitive?, extension field, its JSON key)])."""
    aliases = cls.get_alias_mapping()
    fields = cls.model_fields
    steps = []
    for prop in cls.elements_sequence():
        name = aliases[prop]
        info = fields[name]
        primitive = is_primitive_type(info)
        ext = f"{name}__ext" if primitive and f"{name}__ext" in fields else None
        ext_key = (fields[ext].alias or ext) if ext else None
        steps.append((info.alias or name, name, primitive, ext, ext_key))
    return (cls.__resource_type__ if cls.has_resource_base() else None), tuple(steps)


def _primitive(value: Any) -> Any:
    if isinstance(value, list):
        return [_primitive(v) for v in value]
    if isinstance(value, (bytes, bytearray)):
        raise _Unknown  # base64 encoders depend on the field
    if isinstance(value, uuid.UUID):
        return f"urn:uuid:{value}"
    if isinstance(value, decimal.Decimal):
        exp = value.as_tuple().exponent
        if value.is_finite() and value == value.to_integral_value() and isinstance(exp, int) and exp >= 0:
            return int(value)
        return float(value)
    return value


def _complex(value: Any) -> Any:
    if isinstance(value, list):
        return [_complex(v) for v in value]
    if isinstance(value, FHIRAbstractModel):
        return _walk(value)
    raise _Unknown


def _walk(model: FHIRAbstractModel) -> dict[str, Any]:
    if model.__fhir_serialization_summary_only__ or model.__fhir_serialization_exclude_comment__:
        raise _Unknown
    rtype, steps = _plan(type(model))
    values = model.__dict__
    out: dict[str, Any] = {}
    if rtype is not None:
        out["resourceType"] = rtype
    for key, name, primitive, ext, ext_key in steps:
        value = values.get(name)
        if value is not None:
            value = _primitive(value) if primitive else _complex(value)
            if not (isinstance(value, list) and not value):  # an empty list is left out like None
                out[key] = value
        if ext is not None:
            ext_value = values.get(ext)
            if ext_value is not None:
                ext_value = _complex(ext_value)
                if len(ext_value) > 0:
                    out[ext_key] = ext_value
    comments = values.get(FHIR_COMMENTS_FIELD_NAME)
    if comments is not None:
        out[FHIR_COMMENTS_FIELD_NAME] = comments
    return out


def as_json(model: FHIRAbstractModel) -> dict[str, Any]:
    """`orjson.loads(model.model_dump_json(exclude_none=True))`, without its cost."""
    try:
        return to_jsonable_python(_walk(model))
    except _Unknown:
        return orjson.loads(model.model_dump_json(exclude_none=True))

