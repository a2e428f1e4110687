"""fhir_aibl.jsoninput: the one JSON entry point refuses what FHIR JSON forbids, exactly.

The fast checks (bracket rounds for depth, a colon count for duplicate keys) are held to a
plain reference (the standard library's parser keeping every key, and a walk) on generated
JSON texts with duplicate keys, escaped colons and quotes, brackets inside strings,
whitespace, and nesting around the bound.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_aibl import jsoninput
from fhir_aibl.jsoninput import MAX_DEPTH, DuplicateKeyError, NotJsonError, Rejected, TooDeepError

KEYS = st.sampled_from(["a", "b", "value", "a:b", '"', "\\", "[", "{", "}", "]", ":", ""])
STRINGS = st.text(alphabet='ab:[]{}"\\\u00e9\u2603 ', max_size=6)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.floats(allow_nan=False, allow_infinity=False), STRINGS)


class Obj(list):
    """An object as its members in order, duplicates allowed."""


TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.lists(st.tuples(KEYS, inner), max_size=3).map(Obj)),
    max_leaves=12,
)


def text(tree, style: dict) -> str:
    sep, colon = style["sep"], style["colon"]
    if isinstance(tree, Obj):
        return "{" + sep.join(string(k, style) + colon + text(v, style) for k, v in tree) + "}"
    if isinstance(tree, list):
        return "[" + sep.join(text(v, style) for v in tree) + "]"
    if isinstance(tree, str):
        return string(tree, style)
    return json.dumps(tree)


def string(value: str, style: dict) -> str:
    out = json.dumps(value, ensure_ascii=style["ascii"])
    return out.replace(":", "\\u003a") if style["escape_colons"] else out


def wrap(tree, levels: int, kind: str):
    for _ in range(levels):
        tree = [tree] if kind == "array" else Obj([("k", tree)])
    return tree


def depth(tree) -> int:
    if isinstance(tree, Obj):
        return 1 + max((depth(v) for _k, v in tree), default=0)
    if isinstance(tree, list):
        return 1 + max((depth(v) for v in tree), default=0)
    return 0


def duplicated(tree) -> bool:
    if isinstance(tree, Obj):
        keys = [k for k, _v in tree]
        return len(keys) != len(set(keys)) or any(duplicated(v) for _k, v in tree)
    if isinstance(tree, list):
        return any(duplicated(v) for v in tree)
    return False


STYLES = st.fixed_dictionaries({
    "sep": st.sampled_from([",", ", ", " ,\n "]),
    "colon": st.sampled_from([":", ": ", " : "]),
    "ascii": st.booleans(),
    "escape_colons": st.booleans(),
})


@settings(max_examples=1500, deadline=None)
@given(tree=TREES, levels=st.integers(0, MAX_DEPTH + 3), kind=st.sampled_from(["array", "object"]), style=STYLES)
def test_loads_refuses_exactly_what_the_reference_refuses(tree, levels, kind, style):
    tree = wrap(tree, levels, kind)
    data = text(tree, style).encode()
    if depth(tree) > MAX_DEPTH:
        with pytest.raises(TooDeepError if not duplicated(tree) else (TooDeepError, DuplicateKeyError)):
            jsoninput.loads(data)
    elif duplicated(tree):
        with pytest.raises(DuplicateKeyError):
            jsoninput.loads(data)
    else:
        assert jsoninput.loads(data) == json.loads(data)


@pytest.mark.parametrize("data", [b"", b"{", b'{"a":1}}', b"NaN", b"[Infinity]", b'"\xff"', b'"\\ud800"', b"\xef\xbb\xbf{}",
                                  b"[" * 2000 + b"]" * 2000, b"{'a': 1}"])
def test_what_is_not_json_is_refused_as_not_json(data):
    with pytest.raises(NotJsonError):
        jsoninput.loads(data)


def test_the_bound_is_exact():
    assert jsoninput.loads(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH)
    with pytest.raises(TooDeepError, match=f"nested deeper than {MAX_DEPTH} levels"):
        jsoninput.loads(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1))
    # brackets inside strings are not nesting
    assert jsoninput.loads(json.dumps({"a": "[" * 500, "b": "]]}}" * 100}).encode())


def test_a_duplicate_is_named_with_its_path():
    with pytest.raises(DuplicateKeyError) as info:
        jsoninput.loads(b'{"entry":[{"resource":{"valueQuantity":{"value":-3.0,"value":1.0}}}]}')
    assert str(info.value) == "duplicate key 'value' at entry[0].resource.valueQuantity"


def bundle(*resources: bytes, extra: bytes = b"") -> bytes:
    entries = b",".join(b'{"fullUrl":"x","resource":' + r + b"}" for r in resources)
    return b'{"resourceType":"Bundle","type":"collection"' + extra + b',"entry":[' + entries + b"]}"


def test_isolating_takes_out_only_the_faulty_resources_of_a_bundle():
    good = b'{"resourceType":"Observation","id":"ok","status":"final"}'
    dup = b'{"resourceType":"Observation","id":"dup","status":"final","status":"x"}'
    deep = b'{"resourceType":"Observation","id":"deep","extension":' + b"[" * 70 + b"]" * 70 + b"}"
    nested = bundle(dup, good)
    value = jsoninput.loads_isolating(bundle(good, dup, deep, nested))
    entries = [e["resource"] for e in value["entry"]]
    assert entries[0]["id"] == "ok"
    assert isinstance(entries[1], Rejected) and entries[1].id == "dup" and isinstance(entries[1].error, DuplicateKeyError)
    assert str(entries[1].error) == "duplicate key 'status' at entry[1].resource"
    assert isinstance(entries[2], Rejected) and isinstance(entries[2].error, TooDeepError)
    inner = [e["resource"] for e in entries[3]["entry"]]  # a Bundle inside an entry: its own entries are isolated
    assert isinstance(inner[0], Rejected) and inner[1]["id"] == "ok"
    with pytest.raises(DuplicateKeyError):  # the strict form refuses the document
        jsoninput.loads(bundle(good, dup))


def test_isolating_refuses_a_fault_outside_any_entry_resource():
    good = b'{"resourceType":"Observation","id":"ok"}'
    with pytest.raises(DuplicateKeyError):
        jsoninput.loads_isolating(bundle(good, extra=b',"type":"batch"'))
    with pytest.raises(DuplicateKeyError):  # a lone resource is the document
        jsoninput.loads_isolating(b'{"resourceType":"Observation","id":"a","id":"b"}')


def test_a_large_bundle_is_checked_entry_by_entry(monkeypatch):
    """Above _LARGE bytes the duplicate check serialises one entry at a time: the same verdicts."""
    monkeypatch.setattr(jsoninput, "_LARGE", 10)
    good = b'{"resourceType":"Observation","id":"ok","note":[{"text":"a:b"}]}'
    dup = b'{"resourceType":"Observation","id":"dup","id":"x"}'
    assert jsoninput.loads(bundle(good, good)) == json.loads(bundle(good, good))
    with pytest.raises(DuplicateKeyError, match="entry\\[1\\].resource"):
        jsoninput.loads(bundle(good, dup))
    with pytest.raises(DuplicateKeyError):
        jsoninput.loads(bundle(good, extra=b',"type":"batch"'))
    escaped = bundle(b'{"resourceType":"Observation","id":"e","note":[{"text":"a\\u003ab"}]}')
    assert jsoninput.loads(escaped)["entry"][0]["resource"]["note"][0]["text"] == "a:b"
