"""The validation memo answers exactly what the fhir.resources R4B models answer.

`ValidationMemo` skips the models for a resource whose shape (the resource with its
id, subject, dates and value replaced) already passed, when each replaced leaf passes its
field's validator. These tests hold it to the models: for real shapes, every replaced leaf
is swapped for good and bad values, and the memo's verdict and message must equal a full
validation's.
"""

from __future__ import annotations

import copy
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_aibl import synth
from fhir_aibl.sources import _Item, _validate
from fhir_aibl.validation import _VARYING, ValidationMemo, model_for

from .conftest import AS_OF

BAD_AND_GOOD = [
    "2020-12-01T15:58:31-05:00", "2020-12-01", "2020-12", "2020", "2020-13-01", "2020-02-30", "2021-02-29",
    "2020-12-01T25:00:00Z", "2020-12-01T10:00:00", "yesterday", "", " ", "Patient/p1", "Patient/p 1",
    "urn:uuid:5b6e7b2d-8f7e-4d6a-9a57-07b4c2d1c3a1", "a" * 65, "ok-id.1", "\x00valid", "1.5", "abc",
    0, 1, -2.7, 1.5, 10**20, True, False, None, [], {}, ["x"], {"value": 1},
]


def population(n: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        out += [r for r in synth.patient_record(5, i, AS_OF) if r["resourceType"] in _VARYING]
    return out


def full(resource: dict) -> str | None:
    problem = _validate(_Item(resource, "f", "f", None), ValidationMemo(limit=0))
    return None if problem is None else str(problem)


def memo_verdict(memo: ValidationMemo, resource: dict) -> str | None:
    problem = _validate(_Item(resource, "f", "f", None), memo)
    return None if problem is None else str(problem)


@functools.lru_cache(maxsize=1)
def samples() -> tuple[dict, ...]:
    """One resource of each distinct (type, code) in a small synthetic population."""
    seen, out = set(), []
    for res in population():
        key = (res["resourceType"], str(res.get("code") or res.get("medicationCodeableConcept")))
        if key not in seen:
            seen.add(key)
            out.append(res)
    return tuple(out)


def set_path(resource: dict, path: tuple[str, ...], value) -> dict | None:
    res = copy.deepcopy(resource)
    holder = res
    for name in path[:-1]:
        holder = holder.get(name)
        if not isinstance(holder, dict):
            return None
    holder[path[-1]] = value
    return res


def test_memo_agrees_with_the_models_at_every_replaced_leaf():
    compared = hits = 0
    for original in samples():
        memo = ValidationMemo()
        assert memo_verdict(memo, original) is None  # the synthetic resources are valid: now remembered
        for path in _VARYING[original["resourceType"]]:
            for value in BAD_AND_GOOD:
                variant = set_path(original, path, value)
                if variant is None:
                    continue
                expected = full(variant)
                before = copy.deepcopy(variant)
                assert memo_verdict(memo, variant) == expected, (original["resourceType"], path, value)
                assert variant == before  # never writes into the resource
                compared += 1
                hits += expected is None
    assert compared > 1000 and hits > 100


def test_memo_never_accepts_what_the_models_reject_elsewhere_in_the_resource():
    """A change outside the replaced leaves is a new shape: the models decide."""
    for original in samples():
        memo = ValidationMemo()
        memo_verdict(memo, original)
        for key in original:
            if key in ("resourceType",):
                continue
            for value in (12, None, "", [None], {"x": 1}):
                variant = copy.deepcopy(original)
                variant[key] = value
                assert memo_verdict(memo, variant) == full(variant), (key, value)


@settings(max_examples=300, deadline=None)
@given(index=st.integers(min_value=0, max_value=10_000),
       value=st.one_of(st.text(max_size=30), st.integers(), st.floats(allow_nan=False), st.booleans(), st.none()))
def test_memo_agrees_with_the_models_on_random_leaves(index, value):
    pool = samples()
    original = pool[index % len(pool)]
    paths = _VARYING[original["resourceType"]]
    path = paths[index % len(paths)]
    variant = set_path(original, path, value)
    if variant is None:
        return
    memo = ValidationMemo()
    memo_verdict(memo, original)
    assert memo_verdict(memo, variant) == full(variant)


def test_memo_spares_the_models_for_repeated_shapes(monkeypatch):
    resources = population(20)
    memo = ValidationMemo()
    calls = []
    for rtype in {r["resourceType"] for r in resources}:
        model = model_for(rtype)
        real = model.model_validate
        monkeypatch.setattr(model, "model_validate", lambda data, _real=real, **kw: calls.append(1) or _real(data, **kw))
    assert all(memo.problem(r) is None for r in resources)
    assert 0 < len(calls) < len(resources) / 3


def test_memo_is_bounded():
    memo = ValidationMemo(limit=5)
    for res in population(4):
        memo.problem(res)
    assert len(memo._valid) <= 5


@pytest.mark.parametrize("rtype", sorted(_VARYING))
def test_every_listed_leaf_is_a_plain_field_of_the_model(rtype):
    """A path that no longer names a field would silently stop being replaced: say so instead."""
    from fhir_aibl.validation import _planned_paths

    planned = _planned_paths(rtype)
    missing = [p for p in _VARYING[rtype] if p not in planned]
    assert not missing, missing


def test_memo_stands_aside_on_unchecked_library_versions(monkeypatch):
    from fhir_aibl import validation

    monkeypatch.setattr(validation, "_MEMO_SOUND", lambda: False)
    memo = ValidationMemo()
    for res in population(3):
        assert memo.problem(res) is None
    assert memo.limit == 0 and not memo._valid
