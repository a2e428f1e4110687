"""Rule files: the shipped one loads; a broken one is refused with a message that names the problem."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from fhir_aibl.assess import DEFAULT_RULES, Assessor
from fhir_aibl.errors import RulesError
from fhir_aibl.rulebook import compile_document, load_rulebook


@pytest.fixture(scope="module")
def doc() -> dict:
    return yaml.safe_load(DEFAULT_RULES.read_text())


def _compile(doc: dict):
    return compile_document(doc, path=Path("test.yaml"), content_hash="0" * 12)


def test_shipped_rulebook(assessor):
    rb = assessor.rulebook
    assert rb.name == f"aibl-{rb.version}-{rb.content_hash}-default"
    assert len(rb.content_hash) == 12
    ids = [r.id for r in rb.rules]
    assert len(ids) == len(set(ids))
    # The category rules of CLINICAL.md section 4 keep their ids.
    for rid in ("C-HIGH-FX", "C-HIGH-1", "C-HIGH-2", "C-MOD-1", "C-MOD-2", "C-MOD-G2", "C-MOD-NODXA", "C-LOW", "C-LOW-RF", "C-IND", "OP1"):
        assert rid in ids
    for rule in rb.rules:
        assert rule.citation
        assert rule.title


def _first_rule(doc, rid):
    return next(r for r in doc["rules"] if r["id"] == rid)


def _late_producer(doc) -> dict:
    return {"id": "X-LATE", "stage": 3, "when": {"p": {"t": "patient"}}, "assert": {"t": "ai_med", "ingredient": "letrozole"},
            "citation": _first_rule(doc, "C-LOW")["citation"]}


def test_only_rules_that_negate_wait_for_their_stage(assessor):
    """A rule with an `unless` joins its stage's marker; a rule with only `when` patterns does not."""
    from fhir_aibl.rulebook import STAGE_FACT, needs_stage_marker

    rb = assessor.rulebook
    gated = [r for r in rb.rules if r.unless]
    positive = [r for r in rb.rules if not r.unless]
    assert gated and positive
    for rule in rb.rules:
        terms = rb.durable_definition[rule.id]["all"]
        joins_marker = any(STAGE_FACT in repr(term) for term in terms)
        assert joins_marker == needs_stage_marker(rule) == bool(rule.unless), rule.id
        assert len(terms) == len(rule.when) + len(rule.unless) + joins_marker
    # one sink for every fact type, not one each
    assert [name for name in rb.durable_definition if name.startswith("$")] == ["$sink"]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: _first_rule(d, "C-LOW")["unless"].__setitem__(0, {"t": "cat"}), "negation must only look at facts complete before"),
        (lambda d: _first_rule(d, "C-LOW")["when"].__setitem__("b", {"t": "bmdt"}), "no base fact or rule produces"),
        (lambda d: _first_rule(d, "C-LOW")["when"].__setitem__("b", {"t": "bmd_t", "valeu": 1}), "has no field"),
        (lambda d: _first_rule(d, "C-LOW").__setitem__("citation", ["NOWHERE"]), "is not declared"),
        (lambda d: _first_rule(d, "C-LOW").__setitem__("id", "C-LOW-RF"), "duplicate rule id"),
        (lambda d: _first_rule(d, "C-LOW")["when"]["b"].__setitem__("value", {"about": -1.5}), "unknown operator"),
        (lambda d: _first_rule(d, "C-LOW")["when"]["b"].__setitem__("value", {"gt": "${nope}"}), "unknown parameter"),
        (lambda d: _first_rule(d, "C-LOW").__setitem__("stage", 0), "stage must be"),
        (lambda d: _first_rule(d, "C-LOW").__setitem__("assert", {"t": "cat", "level": "$zz.level"}), "does not name a field"),
        (lambda d: _first_rule(d, "C-LOW-RF").pop("note"), "PROPOSAL \\(a G gap resolution\\) needs a note"),
        (lambda d: _first_rule(d, "E1-ACTIVE")["when"].__setitem__("m", {"t": "category"}), "after this rule.s stage"),
        (lambda d: d["outputs"]["category"].__setitem__("fact", "categroy"), "no rule asserts"),
        # durable_rules matches every fact with a one-of test beside a join: refused, not run silently wrong
        (lambda d: _first_rule(d, "DXA-LATER-SCAN-UNREAD-T")["when"]["r"].__setitem__("source", {"in": ["report", "procedure"]}),
         "an 'in' test of several values beside a join"),
        # a later stage asserting what an earlier stage reads: that stage's facts would not be complete
        (lambda d: d["rules"].append(_late_producer(d)), "'when' on 'ai_med', which rules of stage 3 assert, after this rule.s stage 1"),
    ],
)
def test_broken_rule_files_are_refused(doc, mutate, message):
    broken = copy.deepcopy(doc)
    mutate(broken)
    with pytest.raises(RulesError, match=message):
        _compile(broken)


def test_not_yaml(tmp_path):
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules: [unclosed")
    with pytest.raises(RulesError, match="not valid YAML"):
        load_rulebook(bad)


def test_changed_rules_get_a_new_name_and_run_beside_the_old(tmp_path, assessor):
    """A registered ruleset cannot be replaced in durable_rules: the edited copy has its own name."""
    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES.parent, rules_dir, ignore=shutil.ignore_patterns("__pycache__"))
    text = (rules_dir / "aibl.yaml").read_text().replace("age_rf: 65", "age_rf: 60")
    (rules_dir / "aibl.yaml").write_text(text)
    other = Assessor(rules_dir / "aibl.yaml")
    assert other.rulebook.name != assessor.rulebook.name
    facts = [
        {"t": "patient", "sex": "female", "age": 62, "refs": ["Patient/x"]},
        {"t": "ai_med", "ingredient": "anastrozole", "status": "active", "ended": False, "future_start": False, "refs": ["MedicationStatement/x"]},
    ]
    rf_old = [d.fact["code"] for d in assessor.engine.evaluate(facts).of_type("risk_factor")]
    rf_new = [d.fact["code"] for d in other.engine.evaluate(facts).of_type("risk_factor")]
    assert rf_old == [] and rf_new == ["age-over-65"]
