"""Every recommendation's text reads true in every state it can fire in (issue 15).

`fhir-aibl rules check` enumerates the decision space; for every combination of
aromatase-inhibitor state, antiresorptive state and sex it reaches, it keeps one assessment per
recommendation given (`CheckReport.samples`). Each is rendered as a clinician reads it (the
catalogue's title and text, and the sentences the rules that produced it add) and the facts the
text states are checked against the facts of that combination: no "the aromatase inhibitor has
ended" while it is active, no "denosumab continues" when it has been stopped, and so on.
"""

from __future__ import annotations

import re

import pytest

from fhir_aibl.careplan import load_catalogue
from fhir_aibl.rulecheck import check

from .conftest import ROOT

CATALOGUE = load_catalogue(ROOT / "rules" / "recommendations.yaml")
ON_AI = ("active", "planned")
ON_AR = ("denosumab", "bisphosphonate")


def _osteoporosis(sample) -> bool:
    a = sample.assessment
    return any(s.value <= -2.5 for s in a.selected_t) or sample.case.has("fracture")


#: (pattern in the rendered text, what must hold of the state, what the text claims)
CLAIMS = [
    # a sentence (or the title) stating it, not a conditional "when ... has ended"
    (r"(?:^|[.:]\s+)(?:The )?[Aa]romatase inhibitor (?:has )?(?:stopped|ended)", lambda s: s.ai_status == "stopped",
     "the AI has ended"),
    (r"after the aromatase inhibitor ended", lambda s: s.ai_status == "stopped", "the AI has ended"),
    (r"for the duration of (ovarian suppression plus )?the aromatase inhibitor", lambda s: s.ai_status in ON_AI,
     "the AI is being taken"),
    (r"denosumab (continues|is active)", lambda s: s.antiresorptive == "denosumab", "denosumab continues"),
    (r"[Dd]enosumab has been stopped", lambda s: s.antiresorptive == "denosumab-stopped-or-overdue",
     "denosumab has been stopped"),
    (r"already takes an antiresorptive", lambda s: s.antiresorptive in ON_AR, "an antiresorptive is being taken"),
    (r"falling fast on an oral bisphosphonate", lambda s: s.antiresorptive == "bisphosphonate",
     "a bisphosphonate is being taken"),
    (r"in a man taking an aromatase\s+inhibitor without breast cancer",
     lambda s: s.sex == "male" and not s.breast_cancer, "a man without breast cancer"),
    (r"shows no osteoporosis", lambda s: not _osteoporosis(s), "no osteoporosis, no fracture"),
    (r"shows osteoporosis \(T-score\s+−2\.5 or lower\) or a fragility fracture", _osteoporosis,
     "osteoporosis or a fracture"),
    (r"\b(she|her)\b", lambda s: s.sex == "female", "a woman"),
    (r"\b(he|his)\b", lambda s: s.sex == "male", "a man"),
]
#: What a clinician must never read: references meant for reviewers (specification sections,
#: gap and rule numbers, rule ids). Those live in the rule notes and `implements`.
REVIEWER_ONLY = re.compile(r"CLINICAL\.md|PROPOSAL|\b[GS]\d{1,2}\b|\bK1[a-e]?\b|\b[A-Z]\d?-[A-Z0-9]+-[A-Z0-9-]+\b")


@pytest.fixture(scope="module")
def report(assessor):
    return check(assessor)


def rendered(sample, code: str) -> str:
    entry = CATALOGUE.recommendations[code]
    details = [f.detail for f in sample.assessment.findings_of("recommendation") if f.code == code and f.detail]
    return " ".join([entry.title, entry.text, *details])


def test_the_check_passes_and_enumerates_every_state(report):
    assert report.ok, report.failures[:5]
    states = {(ai, ar, sex) for ai, ar, sex, _ in report.samples}
    assert {s[0] for s in states} >= {"active", "planned", "stopped"}
    assert {s[1] for s in states} >= {"none", "denosumab", "bisphosphonate", "denosumab-stopped-or-overdue"}
    assert {s[2] for s in states} >= {"female", "male", "unknown"}
    # the texts that issue 15 found wrong fire in more than one state, and all are rendered
    assert len({k[:3] for k in report.samples if k[3] == "dmab-transition"}) > 3
    assert {k[0] for k in report.samples if k[3] == "dmab-transition"} >= {"active", "stopped"}


def test_every_recommendation_reads_true_in_every_state_it_fires_in(report):
    wrong = []
    for (ai, ar, sex, code), sample in sorted(report.samples.items()):
        text = rendered(sample, code)
        for pattern, holds, claim in CLAIMS:
            if re.search(pattern, text) and not holds(sample):
                wrong.append(f"{code} says '{claim}' for AI {ai}, antiresorptive {ar}, sex {sex} ({sample.case.name})")
    assert not wrong, "\n".join(wrong[:20])


def test_clinician_texts_carry_no_reviewer_references(assessor):
    """Every catalogue title and text, and every rule's sentence for the clinician (`detail`)."""
    for code, entry in [*CATALOGUE.recommendations.items(), *CATALOGUE.flags.items()]:
        found = REVIEWER_ONLY.search(entry.title + " " + entry.text)
        assert not found, (code, found.group(0))
    for rule in assessor.rulebook.rules:
        if rule.detail:
            found = REVIEWER_ONLY.search(rule.detail)
            assert not found, (rule.id, found.group(0))


def test_the_claims_would_catch_the_old_transition_text():
    """The check itself works: the old dmab-transition wording, in a state where the AI is active."""
    old = "The aromatase inhibitor has stopped and denosumab is active."
    pattern, holds, _ = CLAIMS[0]
    assert re.search(pattern, old)

    class State:
        ai_status, antiresorptive, sex = "active", "denosumab-stopped-or-overdue", "female"

    assert not holds(State)


def test_every_recommendation_and_flag_the_rules_can_give_has_a_catalogue_entry(assessor):
    recs = {a["code"] for r in assessor.rulebook.rules for a in r.asserts if a.get("t") == "rec"}
    flags = {a["code"] for r in assessor.rulebook.rules for a in r.asserts if a.get("t") == "flag"}
    assert {"potent-ar-osteoporosis", "post-ai-continue", "complete-record", "switch-iv-osteoporosis"} <= recs
    assert {"score-substituted", "age-unknown"} <= flags
    assert CATALOGUE.missing(recommendations=recs, flags=flags) == []
