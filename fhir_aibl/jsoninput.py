"""FHIR JSON as it enters the program: parsed, its nesting depth bounded, duplicate keys refused.

Every path that takes JSON from outside goes through this module: a file, an NDJSON line,
the CDS service's request body and what it fetches from an EHR, the connector's responses.

What is refused, and why
------------------------
- Not JSON: orjson's verdict (invalid UTF-8, a lone surrogate, NaN/Infinity, a number out
  of range, truncated text, a byte order mark: the file reader strips a leading BOM first).
- Nesting deeper than `MAX_DEPTH` containers (objects and arrays). Validation and other code
  that walks a resource recurse once or more per level: about 125 levels of nested
  `extension` exhaust Python's stack. Real FHIR data nests about a dozen levels (a Bundle of
  search results, a component's coding): 64 leaves room for any of it and none for a
  stack overflow. orjson itself stops at 1,024 levels without recursing.
- An object with a duplicate key. FHIR JSON forbids them, and a parser keeps only the last
  one: a T-score of -3.0 followed by a second `value` of 1.0 would be read as 1.0, a second
  `subject` would move a resource to another patient.

How, without losing orjson's speed
----------------------------------
The common case (a clean document) costs a few passes of C code over the bytes, no Python
walk over the parsed value:

- depth: the structural brackets are picked out of the text (escapes and string contents
  removed, `[` `]` read as `{` `}`), and innermost pairs `{}` are removed, one level per
  round; a document is at most `MAX_DEPTH` deep exactly when `MAX_DEPTH` rounds empty it;
- duplicates: every member of an object has exactly one `:` outside strings, and a `:` inside
  a string is written literally unless escaped as `\\u003a`. So if the text has no such
  escape, it has as many colons as `orjson.dumps` of its parsed value exactly when no
  member was dropped, that is, when no object repeated a key.

Only when one of these fails (or the text escapes a colon) is the document parsed again by
the standard library, keeping every key, and walked to find where the fault is, for the
message and for `loads_isolating`.

Two ways to use it
------------------
`loads(data)` refuses the whole document (`JsonInputError`), for documents that are one
thing: an NDJSON line, a request body, a server's answer about one patient.

`loads_isolating(data)` is for a file that may be a Bundle of many patients: a fault inside
one resource of a Bundle (an entry's `resource`, in nested Bundles too) replaces only that
resource by a `Rejected`, which the reader reports as an invalid resource; a fault anywhere
else (the Bundle's own structure, a lone resource) refuses the document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["MAX_DEPTH", "DuplicateKeyError", "JsonInputError", "NotJsonError", "Rejected", "TooDeepError",
           "loads", "loads_isolating", "reparse"]

#: Containers (objects and arrays) nested in one document, at most.
MAX_DEPTH = 64

# Structural characters kept for the depth count; brackets are all read as braces.
_KEEP = b'{}[]"'
_DELETE = bytes(b for b in range(256) if b not in _KEEP)
_BRACES = bytes.maketrans(b"[]", b"{}")
#: Above this many bytes, a Bundle's duplicate-key check serialises one entry at a time.
_LARGE = 8 * 1024 * 1024


class JsonInputError(ValueError):
    """JSON refused as it entered; `where` is the path of the fault (`entry[3].resource.valueQuantity`)."""

    kind = "invalid-json"

    def __init__(self, reason: str, where: str = "") -> None:
        self.reason = reason
        self.where = where
        super().__init__(f"{reason} at {where}" if where else reason)


class NotJsonError(JsonInputError):
    kind = "not-json"


class TooDeepError(JsonInputError):
    kind = "too-deep"


class DuplicateKeyError(JsonInputError):
    kind = "duplicate-key"


@dataclass(frozen=True)
class Rejected:
    """Stands where `loads_isolating` took out one resource of a Bundle; never a dict."""

    error: JsonInputError
    resource_type: str | None
    id: str | None


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """The JSON value of `data`, or `JsonInputError`: not JSON, nested too deep, or a duplicate key."""
    raw, value = _parse(data)
    if _clean(raw, value):
        return value
    faults = _faults(raw, value, isolate=False)
    if faults:
        raise faults[0][1]
    return value


def loads_isolating(data: bytes | bytearray | memoryview | str) -> Any:
    """As `loads`, but a fault inside one resource of a Bundle replaces only that resource by a `Rejected`."""
    raw, value = _parse(data)
    if _clean(raw, value):
        return value
    faults = _faults(raw, value, isolate=True)
    for unit, error in faults:
        if unit is None:
            raise error
    for unit, error in faults:
        holder = value
        for step in unit[:-1]:
            holder = holder[step]
        resource = holder[unit[-1]]
        rtype, rid = (resource.get("resourceType"), resource.get("id")) if isinstance(resource, dict) else (None, None)
        holder[unit[-1]] = Rejected(
            error, rtype if isinstance(rtype, str) else None, rid if isinstance(rid, str) else None
        )
    return value


def reparse(data: bytes) -> Any:
    """Parse bytes that `loads` accepted before (the caller has checked they are the same bytes)."""
    return orjson.loads(data)


# --------------------------------------------------------------------------- the fast checks


def _parse(data: bytes | bytearray | memoryview | str) -> tuple[bytes, Any]:
    raw = data if type(data) is bytes else data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        return raw, orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        text = str(exc).strip().splitlines()
        raise NotJsonError(f"not JSON: {text[0][:160] if text else 'unreadable'}") from None


def _clean(raw: bytes, value: Any) -> bool:
    """True if valid JSON text is at most MAX_DEPTH deep and repeats no key; False also when unsure."""
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH and not _depth_ok(raw):
        return False  # (fewer brackets than that, strings included, cannot nest deeper)
    if len(raw) > _LARGE and type(value) is dict and type(value.get("entry")) is list:
        # A large Bundle: its colons counted entry by entry, never a second copy of the whole file.
        if b"\\u003" in raw:
            return False
        colons = orjson.dumps({**value, "entry": []}).count(b":")
        for entry in value["entry"]:
            colons += orjson.dumps(entry).count(b":")
        return raw.count(b":") == colons
    again = orjson.dumps(value)  # cannot fail: parsed by orjson, at most MAX_DEPTH deep
    if again == raw or (raw[-1:] == b"\n" and again == raw.rstrip()):
        return True  # compact text as orjson writes it (an NDJSON line): the same bytes cannot hold a dropped member
    if b"\\u003" in raw:
        return False
    return raw.count(b":") == again.count(b":")


def _depth_ok(raw: bytes) -> bool:
    """Whether valid JSON text nests at most MAX_DEPTH containers (see the module docstring)."""
    s = raw
    if b"\\" in s:
        # An escaped backslash first, then an escaped quote: what is left of a backslash escapes neither.
        s = s.replace(b"\\\\", b"").replace(b'\\"', b"")
    s = s.translate(_BRACES, _DELETE)
    if b'"' in s:
        # Quotes alternate open, close; removing adjacent pairs keeps that (two strings may merge,
        # never a bracket outside a string and one inside).
        s = s.replace(b'""', b"")
        if b'"' in s:
            s = b"".join(s.split(b'"')[0::2])
    for _ in range(MAX_DEPTH):
        if not s:
            return True
        s = s.replace(b"{}", b"")
    return not s


# --------------------------------------------------------------------------- finding the fault


class _Duplicated(dict):
    """An object that repeated a key (the last value kept, as orjson does)."""

    __slots__ = ("key",)


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) == len(pairs):
        return out
    seen: set[str] = set()
    marked = _Duplicated(out)
    for key, _ in pairs:
        if key in seen:
            marked.key = key
            break
        seen.add(key)
    return marked


def _faults(raw: bytes, value: Any, *, isolate: bool) -> list[tuple[tuple | None, JsonInputError]]:
    """(unit path or None, error) for every fault; a unit is a Bundle entry's resource (isolate only)."""
    try:
        # Every key kept: parsed again by the standard library (only here, after a fast check failed).
        tree = json.loads(raw.decode("utf-8"), object_pairs_hook=_pairs)
    except RecursionError:
        return [(None, TooDeepError(f"nested deeper than {MAX_DEPTH} levels"))]
    faults: list[tuple[tuple | None, JsonInputError]] = []
    faulty_units: set[tuple | None] = set()
    # (node, depth, path, unit, is a Bundle's entry object)
    stack: list[tuple[Any, int, tuple, tuple | None, bool]] = [(tree, 1, (), None, False)]
    while stack:
        node, depth, path, unit, is_entry = stack.pop()
        if not isinstance(node, (dict, list)) or unit in faulty_units:
            continue
        if depth > MAX_DEPTH:
            faults.append((unit, TooDeepError(f"nested deeper than {MAX_DEPTH} levels", _path(path))))
            faulty_units.add(unit)
            continue
        if isinstance(node, _Duplicated):
            faults.append((unit, DuplicateKeyError(f"duplicate key {node.key!r}", _path(path))))
            faulty_units.add(unit)
            continue
        if isinstance(node, list):
            # is_entry on a list: it is a Bundle's `entry`, so its items are entries
            for i in range(len(node) - 1, -1, -1):
                stack.append((node[i], depth + 1, path + (i,), unit, is_entry))
            continue
        bundle = node.get("resourceType") == "Bundle"
        for key in reversed(list(node)):
            child_unit = unit
            if isolate and is_entry and key == "resource" and isinstance(node[key], dict):
                child_unit = path + (key,)
            stack.append((node[key], depth + 1, path + (key,), child_unit, bundle and key == "entry"))
    return faults  # empty when the fast check was only unsure (an escaped colon)


def _path(path: tuple) -> str:
    out = ""
    for part in path[:12]:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if len(path) > 12:
        out += "..."
    return out or "(top level)"
