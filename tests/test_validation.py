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


# --------------------------------------------------------------------------- FHIR JSON types (issue 10, item 4)

from fhir_aibl.validation import JsonTypeError, full_problem, json_type_problem  # noqa: E402

#: A wrong JSON type for each kind of position: what a hostile or broken sender may put there.
WRONG = {
    "string": st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                        st.just([]), st.just({}), st.lists(st.text(max_size=3), min_size=1, max_size=2), st.none()),
    "boolean": st.one_of(st.sampled_from(["true", "false", "1", ""]), st.integers(0, 1), st.just(1.0), st.none(),
                         st.just([True]), st.just({})),
    "integer": st.one_of(st.sampled_from(["1", "2.0"]), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                         st.none(), st.just([1])),
    "number": st.one_of(st.sampled_from(["-3.0", "1", "1e2", " -2.5"]), st.booleans(), st.none(), st.just([1.5]),
                        st.just({"value": 1})),
    "object": st.one_of(st.text(max_size=5), st.integers(), st.booleans(), st.none(), st.just([{}])),
    "array": st.one_of(st.just({}), st.just({"coding": []}), st.text(max_size=5), st.integers(), st.none()),
}


def primitive_positions(resource: dict):
    """(path, kind) of every element of a resource, as the walk of validation.py sees it, leaves and containers."""
    from fhir_aibl.validation import _type_plan

    def walk(obj, cls, path):
        plan = _type_plan(cls)
        for key, value in obj.items():
            spec = plan.get(key)
            if spec is None:
                continue
            is_list, kind, child = spec
            here = path + (key,)
            if is_list:
                yield here, "array"
                for i, item in enumerate(value):
                    if kind == "object":
                        yield here + (i,), "object"
                        yield from walk(item, child, here + (i,))
                    elif kind in ("string", "boolean", "integer", "number"):
                        yield here + (i,), kind
            elif kind == "object":
                yield here, "object"
                yield from walk(value, child, here)
            elif kind in ("string", "boolean", "integer", "number"):
                yield here, kind

    yield from walk(resource, model_for(resource["resourceType"]), ())


def put(resource: dict, path: tuple, value) -> dict:
    out = copy.deepcopy(resource)
    holder = out
    for step in path[:-1]:
        holder = holder[step]
    holder[path[-1]] = value
    return out


@functools.lru_cache(maxsize=1)
def typed_samples() -> tuple[dict, ...]:
    """The samples, and a Patient (validated in full: not a memo type)."""
    patient = next(r for r in synth.patient_record(5, 0, AS_OF) if r["resourceType"] == "Patient")
    return samples() + (patient,)


@functools.lru_cache(maxsize=1)
def positions() -> tuple:
    """(sample index, path, kind) of every element of every sample, and the _VARYING leaves."""
    out = []
    for i, res in enumerate(typed_samples()):
        seen = set()
        for path, kind in primitive_positions(res):
            out.append((i, path, kind))
            seen.add(path)
        for path in _VARYING.get(res["resourceType"], ()):  # the memo's leaves, present or not in this sample
            if path not in seen and (len(path) == 1 or isinstance(res.get(path[0]), dict)):
                kind = {"value": "number"}.get(path[-1], "string")
                out.append((i, path, kind))
    return tuple(out)


def test_the_synthetic_samples_cover_every_kind_of_position():
    kinds = {kind for _i, _p, kind in positions()}
    assert kinds == {"string", "number", "object", "array"} | ({"boolean"} & kinds) | ({"integer"} & kinds)
    assert len(positions()) > 300


@settings(max_examples=600, deadline=None)
@given(data=st.data())
def test_a_wrong_json_type_anywhere_is_refused_and_the_memo_agrees_with_a_full_validation(data):
    index, path, kind = data.draw(st.sampled_from(positions()))
    original = typed_samples()[index]
    wrong = data.draw(WRONG[kind])
    variant = put(original, path, wrong)
    expected = full(variant)
    # The verdict: never valid with a wrong JSON type (a list of one string where a string
    # is expected is the one wrong type the memo's list-free paths never see; it fails too).
    assert expected is not None, (path, wrong)
    memo = ValidationMemo()
    assert memo_verdict(memo, original) is None  # the shape is remembered
    before = copy.deepcopy(variant)
    assert memo_verdict(memo, variant) == expected, (path, wrong)
    assert variant == before


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_right_json_types_at_the_memo_leaves_get_the_models_verdict(data):
    """Well-typed values (valid or not for the datatype): the memo answers what the models answer."""
    leaves = [p for p in positions() if p[1] in _VARYING.get(typed_samples()[p[0]]["resourceType"], ())]
    index, path, kind = data.draw(st.sampled_from(leaves))
    original = typed_samples()[index]
    value = data.draw({"string": st.one_of(st.sampled_from(BAD_AND_GOOD[:20]), st.text(max_size=30)),
                       "number": st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False))}[kind])
    variant = put(original, path, value)
    memo = ValidationMemo()
    memo_verdict(memo, original)
    assert memo_verdict(memo, variant) == full(variant)
    assert full(variant) is None or full(variant) == memo_verdict(ValidationMemo(limit=0), variant)


def test_the_models_alone_are_lax_and_validation_is_not():
    """Issue 10, item 4: a T-score value given as a string and a date as an integer were accepted."""
    dxa = next(r for r in samples() if r["resourceType"] == "Observation" and "valueQuantity" in r)
    as_string = put(dxa, ("valueQuantity", "value"), "-3.0")
    as_integer = put(dxa, ("effectiveDateTime",), 20250110)
    for variant in (as_string, as_integer):
        model_for("Observation").model_validate(variant)  # the pydantic models take both
        problem = full_problem(variant)
        assert isinstance(problem, JsonTypeError)
        memo = ValidationMemo()
        assert memo.problem(dxa) is None
        assert isinstance(memo.problem(variant), JsonTypeError)
    assert json_type_problem(as_string) == "valueQuantity.value: must be a JSON number, not a string"
    assert json_type_problem(as_integer) == "effectiveDateTime: must be a JSON string, not an integer"


def test_nulls_are_refused_except_beside_a_primitive_extension_array():
    patient = typed_samples()[-1]
    name = {"family": "Doe", "given": ["Ann", None], "_given": [None, {"extension": [{"url": "http://x", "valueString": "y"}]}]}
    assert json_type_problem({**patient, "name": [name]}) is None
    assert "null" in json_type_problem({**patient, "name": [{"family": "Doe", "given": ["Ann", None]}]})
    assert "null" in json_type_problem({**patient, "gender": None})


def test_a_string_over_one_megabyte_is_refused():
    patient = typed_samples()[-1]
    assert "longer than" in json_type_problem({**patient, "name": [{"family": "x" * (1024 * 1024 + 1)}]})
    assert json_type_problem({**patient, "name": [{"family": "x" * (1024 * 1024)}]}) is None
