"""Prefetch validation: only what the facts stage can read is validated; the answer is the
one validating everything gives, and an invalid resource the rules read is still reported."""

from __future__ import annotations

import copy
import json
import datetime as dt
import random

import pytest
from pydantic import ValidationError

from fhir_aibl import synth
from fhir_aibl.cds.prefetch import bundle_resources, for_patient
from fhir_aibl.cds.samples import patient_view_request
from fhir_aibl.cds.validation import select_and_validate, validate
from fhir_aibl.facts import extract_facts
from fhir_aibl.validation import model_for, needs_validation

from ..conftest import FIXTURES
from .conftest import PV, bundle

AS_OF = dt.date(2026, 6, 1)
HEART_RATE = {"coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]}
LS_T_SCORE = {"coding": [{"system": "http://loinc.org", "code": "38267-1", "display": "DXA Lumbar spine [T-score]"}]}


def _records():
    for path in sorted((FIXTURES / "bundles").glob("*.json")):
        yield path.stem, bundle(path.stem)
    for i in range(12):
        resources = synth.patient_record(1, i)
        yield f"synth-{i}", {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


@pytest.mark.parametrize("name, record", list(_records()), ids=lambda v: v if isinstance(v, str) else "")
def test_selected_validation_gives_the_facts_of_full_validation(assessor, name, record):
    term = assessor.terminology
    patients = [r for r, _ in bundle_resources(record) if r.get("resourceType") == "Patient"]
    if len(patients) != 1:
        pytest.skip("not one patient's record")
    resources = for_patient(bundle_resources(record), patients[0]["id"]).resources
    everything, *_ = validate(resources)
    selected, *_ = select_and_validate(term, resources)
    ref = f"Patient/{patients[0]['id']}"
    full = extract_facts(ref, everything, AS_OF, term)
    fewer = extract_facts(ref, selected, AS_OF, term)
    assert fewer.facts == full.facts
    assert fewer.problems == full.problems


def test_what_facts_reads_is_selected(assessor):
    term = assessor.terminology
    assert needs_validation({"resourceType": "Observation", "code": LS_T_SCORE}, term)
    assert needs_validation({"resourceType": "Observation", "code": HEART_RATE, "component": [{"code": LS_T_SCORE}]}, term)
    assert not needs_validation({"resourceType": "Observation", "code": HEART_RATE}, term)
    assert needs_validation({"resourceType": "Patient"}, term)
    assert needs_validation({"resourceType": "FamilyMemberHistory"}, term)
    assert not needs_validation({"resourceType": "Condition", "code": {"text": "sprained ankle"}}, term)
    # a contained Medication is read by facts.py: validated; so is a reference that resolves to nothing
    # in the input (facts.py reads it to flag medication-unresolved, docs/medications.md)
    contained = {"resourceType": "Medication", "id": "m", "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "84857"}]}}
    assert needs_validation({"resourceType": "MedicationStatement", "medicationReference": {"reference": "#m"}, "contained": [contained]}, term)
    assert needs_validation({"resourceType": "MedicationStatement", "medicationReference": {"reference": "Medication/m"}}, term)


@pytest.mark.parametrize(
    "resource",
    [
        {"resourceType": "Observation", "code": 42},
        {"resourceType": "Observation", "code": HEART_RATE, "component": 7},
        {"resourceType": "Observation", "code": [None, "x", {"coding": "nope"}]},
        {"resourceType": "Condition", "code": {"coding": [{"system": 1, "code": ["x"]}]}},
        {"resourceType": "MedicationRequest", "medicationCodeableConcept": "anastrozole"},
    ],
)
def test_malformed_codes_never_reach_the_facts_stage(assessor, resource):
    """Dropped as codes facts.py cannot recognise, or selected and failing validation: never read."""
    good, bad, _partly = select_and_validate(assessor.terminology, [resource])
    assert not good
    assert len(bad) == int(needs_validation(resource, assessor.terminology))


def _observations(request: dict) -> list[dict]:
    return [e["resource"] for e in request["prefetch"]["observations"]["entry"]]


def test_an_invalid_resource_the_rules_read_is_reported_and_not_used(make_app):
    """V06 (high risk on its T-scores): its lumbar-spine T-score made invalid."""
    request = patient_view_request(bundle("V06"))
    baseline = make_app().hook(PV, copy.deepcopy(request)).json()["cards"][0]
    dxa = next(r for r in _observations(request) if r["code"]["coding"][0]["code"] == "38267-1")
    dxa["effectiveDateTime"] = "last spring"
    card = make_app().hook(PV, request).json()["cards"][0]
    # It changes what the clinician should do (the scan was not used): said in words, no reference
    # in the text (tests/test_unreadable_entries.py: the flag record-unreadable says it)
    assert "Check the chart for entries that could not be read (conditions, results, medications): the risk may be higher than graded." in card["detail"]
    assert dxa["id"] not in card["detail"] and dxa["id"] not in card["summary"]
    assert card["detail"] != baseline["detail"]


def test_an_aromatase_inhibitor_with_a_malformed_dosage_is_still_carded(make_app):
    """Before: the statement was left out, the patient read as on no aromatase inhibitor, and no card came back."""
    request = patient_view_request(bundle("V06"))
    baseline = make_app().hook(PV, copy.deepcopy(request)).json()["cards"]
    assert baseline
    statements = [e["resource"] for key in request["prefetch"] for e in (request["prefetch"][key] or {}).get("entry", [])
                  if e["resource"]["resourceType"] in ("MedicationStatement", "MedicationRequest")]
    assert statements
    for statement in statements:
        statement["dosage"] = [{"text": 1}]  # a number where FHIR wants a string
    cards = make_app().hook(PV, request).json()["cards"]
    assert [c["summary"] for c in cards] == [c["summary"] for c in baseline]
    assert "could be read only in part; the rest was used: check the chart" in cards[0]["detail"]
    assert all(s["id"] not in json.dumps(cards[0]["detail"]) for s in statements)


def test_an_invalid_resource_the_rules_cannot_read_changes_nothing(make_app):
    request = patient_view_request(bundle("V06"))
    baseline = make_app().hook(PV, copy.deepcopy(request)).json()["cards"]
    patient_id = request["context"]["patientId"]
    heart_rate = {"resourceType": "Observation", "id": "hr-1", "status": "final", "code": HEART_RATE,
                  "subject": {"reference": f"Patient/{patient_id}"}, "effectiveDateTime": "last spring"}
    assert validate([heart_rate])[1] == ["`Observation/hr-1`"]
    request["prefetch"]["observations"]["entry"].append({"resource": heart_rate})
    cards = make_app().hook(PV, request).json()["cards"]
    assert [c["detail"] for c in cards] == [c["detail"] for c in baseline]
    assert "hr-1" not in str(cards)


def test_without_validation_nothing_is_dropped_or_reported(make_app):
    request = patient_view_request(bundle("V06"))
    dxa = next(r for r in _observations(request) if r["code"]["coding"][0]["code"] == "38267-1")
    dxa["effectiveDateTime"] = "last spring"  # read by facts.py as undated; no validation note
    card = make_app(validate_resources=False).hook(PV, request).json()["cards"][0]
    assert "failed FHIR R4 validation" not in card["detail"]


# --------------------------------------------------------------------------- the memo inside a request


def validate_each(resources):
    """The reference: every resource validated alone, FHIR JSON types then its R4B model (`full_problem`)."""
    from fhir_aibl.validation import JsonTypeError, full_problem, salvage

    good, bad, partly = [], [], []
    for res in resources:
        try:
            problem = full_problem(res)
        except KeyError:
            problem = KeyError(res["resourceType"])
        if problem is None:
            try:  # the models agree on every resource that has the right JSON types
                model_for(res["resourceType"]).model_validate(res)
            except (ValidationError, ValueError, TypeError) as exc:
                raise AssertionError(f"JSON types right, models refuse: {exc}") from None
        elif not isinstance(problem, JsonTypeError):
            with pytest.raises((ValidationError, ValueError, TypeError, KeyError)):
                model_for(res["resourceType"]).model_validate(res)
        if problem is not None:
            kept = salvage(res, problem) if isinstance(problem, Exception) and not isinstance(problem, KeyError) else None
            if kept is None:
                bad.append(f"`{res['resourceType']}/{res.get('id', '?')}`")
                continue
            assert full_problem(kept.resource) is None  # what is read in part is valid
            partly.append(f"`{res['resourceType']}/{res.get('id', '?')}`")
            res = kept.resource
        good.append(res)
    return good, bad, partly

_BAD_VALUES = [None, "", " ", 0, 1.5, True, [], {}, [None], {"bogus": 1}, "{}", ["x"], [{}], {"coding": "x"}]


def _mutants(resource: dict, rng: random.Random, count: int):
    """Copies of `resource` with one element, at any depth, replaced by a wrong value."""

    def paths(value, path=()):
        if isinstance(value, dict):
            for key, inner in value.items():
                if path or key != "resourceType":
                    yield (*path, key)
                    yield from paths(inner, (*path, key))
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                yield (*path, i)
                yield from paths(inner, (*path, i))

    every = list(paths(resource))
    for _ in range(count):
        mutant = copy.deepcopy(resource)
        *head, last = rng.choice(every)
        holder = mutant
        for step in head:
            holder = holder[step]
        holder[last] = copy.deepcopy(rng.choice(_BAD_VALUES))
        yield mutant


def test_the_memo_gives_the_verdicts_of_validating_each_resource_alone():
    rng = random.Random(20260601)
    resources = []
    for _name, record in _records():
        resources += [r for r, _ in bundle_resources(record)]
    assert validate(resources) == validate_each(resources)
    mutants = [m for r in rng.sample(resources, 120) for m in _mutants(r, rng, 6)]
    # one call: shapes are remembered across the mutants as they would be across a prefetch
    assert validate(resources + mutants) == validate_each(resources + mutants)
    for mutant in mutants[:200]:
        assert validate([mutant]) == validate_each([mutant])
