"""The engine's hot path (issue 6): it drives durable_rules' C engine itself, so check that
what it leaves out changes nothing: the JSON it writes, the errors it reports, the sessions
it deletes."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest

from fhir_aibl import engine as engine_module
from fhir_aibl import synth
from fhir_aibl.assess import Assessor
from fhir_aibl.errors import EvaluationError
from fhir_aibl.facts import extract_facts

AS_OF = dt.date(2026, 6, 1)


@pytest.fixture(scope="module")
def assessor() -> Assessor:
    return Assessor()


@pytest.fixture(scope="module")
def pool(assessor) -> list[list[dict]]:
    out = []
    for i in range(40):
        resources = synth.patient_record(3, i, AS_OF)
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        out.append(extract_facts(f"Patient/{pid}", resources, AS_OF, assessor.terminology).facts)
    return out


def snapshot(derivation) -> tuple:
    return (
        derivation.base,
        {k: (v.fact, v.derivations) for k, v in derivation.derived.items()},
        derivation.fired,
    )


ODD_FACTS = [
    {"t": "patient", "sex": "female", "age": None, "refs": ["Patient/x"]},
    {"t": "bmi", "value": float("nan"), "age_months": 1.0, "refs": ["Observation/nan"]},
    {"t": "lab", "concept": "calcium", "value": 10**30, "age_months": 2.0, "refs": ["Observation/big"]},
    {"t": "condition", "concept": "rheumatoid-arthritis", "active": True, "note": "Gelenk\u00e4rzte \u2013 \u00e9t\u00e9", "refs": ["Condition/u"]},
    {"t": "ai_med", "ingredient": "anastrozole", "status": "active", "ended": False, "future_start": False, "refs": ["MedicationStatement/m"]},
    {"t": "dxa", "measure": "T", "site": "LS", "value": -1.7, "age_months": 1e-7, "refs": ["Observation/tiny"]},
]


def test_orjson_messages_mean_what_json_messages_meant(assessor, pool, monkeypatch):
    fast = [snapshot(assessor.engine.evaluate(facts)) for facts in pool + [ODD_FACTS]]
    # the serialisation durable_rules' own Python layer uses
    monkeypatch.setattr(engine_module, "_dumps", lambda value: json.dumps(value, ensure_ascii=False))
    monkeypatch.setattr(engine_module, "_loads", json.loads)
    slow = [snapshot(assessor.engine.evaluate(facts)) for facts in pool + [ODD_FACTS]]
    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        # NaN != NaN: compare the odd set's bmi by its text
        assert json.dumps(a, default=str) == json.dumps(b, default=str)


def test_dumps_falls_back_to_json_where_orjson_would_differ():
    assert engine_module._dumps({"v": float("nan")}) == json.dumps({"v": float("nan")}, ensure_ascii=False)
    assert engine_module._dumps({"v": None}) == json.dumps({"v": None}, ensure_ascii=False)
    assert engine_module._dumps({"v": 10**30}) == json.dumps({"v": 10**30}, ensure_ascii=False)
    assert json.loads(engine_module._dumps({"v": "\u00e9", "x": 1.5})) == {"v": "\u00e9", "x": 1.5}
    assert engine_module._loads('{"v": NaN}')["v"] != engine_module._loads('{"v": NaN}')["v"]  # NaN read as before
    assert math.isnan(engine_module._loads('{"v": NaN}')["v"])


def asserted_type(compiled) -> str | None:
    """The literal `t` of a compiled assert template (rulebook.compile_assert)."""
    return next((value for key, alias, value in compiled if key == "t" and alias is None), None)


def test_an_action_error_fails_that_evaluation_only(assessor, pool, monkeypatch):
    good = snapshot(assessor.engine.evaluate(pool[0]))
    real = engine_module.render_compiled

    def broken(template, matched):
        if asserted_type(template) == "ai_status":
            raise RuntimeError("boom")
        return real(template, matched)

    monkeypatch.setattr(engine_module, "render_compiled", broken)
    with pytest.raises(EvaluationError, match=r"E1-STATUS-[A-Z-]+: RuntimeError: boom"):
        assessor.engine.evaluate(pool[0])
    monkeypatch.setattr(engine_module, "render_compiled", real)
    assert snapshot(assessor.engine.evaluate(pool[0])) == good  # nothing of the failed session is left


def test_an_interrupt_inside_an_action_is_reported_as_durable_reported_it(assessor, pool, monkeypatch):
    real = engine_module.render_compiled

    def interrupted(template, matched):
        if asserted_type(template) == "ai_status":
            raise KeyboardInterrupt("stop")
        return real(template, matched)

    monkeypatch.setattr(engine_module, "render_compiled", interrupted)
    with pytest.raises(EvaluationError, match="an action failed: exception caught stop"):
        assessor.engine.evaluate(pool[0])
    monkeypatch.setattr(engine_module, "render_compiled", real)
    assert assessor.engine.evaluate(pool[0]).fired


def test_output_only_facts_stay_in_the_derivation(assessor, pool):
    derived_types = set()
    for facts in pool:
        derived_types |= {d.fact["t"] for d in assessor.engine.evaluate(facts).derived.values()}
    unread = derived_types - assessor.engine._read_types
    assert unread  # e.g. flag, risk_factor: kept for the outputs, never sent to durable_rules
    assert {"risk_factor", "flag"} & unread


def test_sessions_are_deleted_beyond_durables_session_limit(assessor, pool):
    # durable_rules keeps at most 1,024 live sessions per ruleset: 1,500 evaluations prove deletion
    first = snapshot(assessor.engine.evaluate(pool[1]))
    for i in range(1500):
        assessor.engine.evaluate(pool[i % len(pool)])
    assert snapshot(assessor.engine.evaluate(pool[1])) == first


def test_rules_without_negation_derive_the_same_without_waiting_for_their_stage(assessor, monkeypatch):
    """Positive rules fire as soon as their facts exist (rulebook.needs_stage_marker): check that
    this derives exactly what joining every rule to its stage's marker derives, fact by fact,
    rule by rule and parent by parent, on the synthetic population and the worked examples."""
    from fhir_aibl import engine as engine_mod
    from fhir_aibl import rulebook as rulebook_mod
    from fhir_aibl.sources import PatientRecord, iter_records

    monkeypatch.setattr(rulebook_mod, "needs_stage_marker", lambda rule: True)
    monkeypatch.setattr(engine_mod, "needs_stage_marker", lambda rule: True)
    staged_book = rulebook_mod.load_rulebook(assessor.rulebook.path, extra_hash="every-rule-staged")
    staged = engine_module.Engine(staged_book)
    monkeypatch.undo()
    assert staged._marker_stages == assessor.rulebook.stages
    assert len(staged_book.durable_definition) == len(assessor.rulebook.durable_definition)

    def canonical(derivation) -> tuple:
        return (
            sorted(derivation.base),
            # a derived fact's key is its type and content
            sorted((k, sorted(v.derivations)) for k, v in derivation.derived.items()),
            sorted(derivation.fired),
        )

    pools = []
    for i in range(150):
        resources = synth.patient_record(11, i, AS_OF)
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        pools.append(extract_facts(f"Patient/{pid}", resources, AS_OF, assessor.terminology).facts)
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "bundles"
    for item in iter_records([fixtures]):
        if isinstance(item, PatientRecord):
            pools.append(extract_facts(item.patient_ref, item.resources, AS_OF, assessor.terminology).facts)
    assert len(pools) > 190
    for facts in pools:
        assert canonical(assessor.engine.evaluate(facts)) == canonical(staged.evaluate(facts))


def test_all_evidence_is_the_evidence_of_every_derived_fact(assessor, pool):
    with_evidence = 0
    for facts in pool + [ODD_FACTS]:
        derivation = assessor.engine.evaluate(facts)
        union = sorted({ref for key in derivation.derived for ref in derivation.evidence_for(key)})
        assert derivation.all_evidence() == union
        with_evidence += bool(union)
        key = next(iter(derivation.derived))
        assert derivation.evidence_for(key) == derivation.evidence_for(key)  # cached answer, same as traced
        assert derivation.evidence_for(key) == derivation._trace_evidence(key)
    assert with_evidence >= len(pool)
