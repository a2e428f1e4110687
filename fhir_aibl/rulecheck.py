"""`fhir-aibl rules check`: the ruleset reviewed as a whole, by enumerating the decision space.

Every combination of eligibility x T-score band x risk-factor count x fracture x DXA status x
therapy (and, around a base case, every population, laboratory and data-hygiene variant) is
evaluated by the real engine, and each result is held to the checks the rule file declares
under `checks:` plus these, which no rule file can switch off:

- exactly one `ai_status` and one `category` (a hole, or two rules that disagree, raises);
- a patient on, starting or stopping an aromatase inhibitor gets a non-empty recommendation
  set; one not on an aromatase inhibitor gets `not-applicable`;
- no two recommendations of an `exclusive` group together (two drugs, two DXA intervals:
  rules in conflict), every `requires` satisfied (a start never without `ci-check`);
- missing, stale or BMD-only DXA never gives `low`, and neither does an unknown age (G29);
- never `low` while a DXA result without a usable value is on record from the scan the
  category was graded on or a later one, or a report or procedure of a later scan: its value
  could be lower (section 0 safety invariant);
- never `low` while entries of the record were left out as unreadable, and a medication entry
  left out that way is always flagged `medication-unresolved` (section 0: unreadable data never
  yields low, never hides a patient on an aromatase inhibitor);
- never a Z-score for a woman on an aromatase inhibitor without ovarian suppression (G24);
- `ca-vitd` whenever an antiresorptive is recommended (started, switched, or the bisphosphonate
  that follows denosumab) or continues, with or without the aromatase inhibitor (G26);
- `ci-check` whenever a drug is started or switched, the denosumab follow-on included (G17, G26);
- never the breast-cancer adjuvant regimen (`potent-ar`, `za-4mg-q6m`, `switch-iv`: zoledronic
  acid 4 mg every 6 months among the choices) for a man without breast cancer (G27);
- every rule fires in at least one combination (a rule that cannot fire is dead or mis-staged).

`CheckReport.samples` keeps, for every combination of aromatase-inhibitor state, antiresorptive
state and sex, one assessment per recommendation it gave: tests render every recommendation's
text in every state it can fire in (tests/test_recommendation_texts.py).

The first failures are reported with the combination that shows them, so a reviewer can see
the hole; the command exits non-zero.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from .assess import Assessor, build_assessment
from .errors import AiblError

AS_OF = dt.date(2026, 6, 1)

ELIGIBILITY = {
    "active": [("ai_med", {"status": "active", "ended": False, "future_start": False})],
    "active-ended": [("ai_med", {"status": "active", "ended": True, "future_start": False})],
    "active-future": [("ai_med", {"status": "active", "ended": False, "future_start": True})],
    "on-hold": [("ai_med", {"status": "on-hold", "ended": False, "future_start": False})],
    "planned": [("ai_med", {"status": "intended", "ended": False, "future_start": True})],
    "stopped": [("ai_med", {"status": "completed", "ended": True, "future_start": False})],
    "none": [],
}
T_BANDS = {
    "T -3.0": -3.0, "T -2.5": -2.5, "T -2.1": -2.1, "T -2.0": -2.0, "T -1.8": -1.8,
    "T -1.5": -1.5, "T -1.4": -1.4, "T 0.5": 0.5,
}
DXA_STATUS = {
    "valid-axial": lambda t: [("dxa", {"measure": "T", "site": "LS", "value": t, "age_months": 3.0})],
    "forearm-only": lambda t: [("dxa", {"measure": "T", "site": "FA", "value": t, "age_months": 3.0})],
    "stale": lambda t: [("dxa", {"measure": "T", "site": "TH", "value": t, "age_months": 30.0})],
    "bmd-only": lambda t: [("dxa", {"measure": "BMD", "site": "LS", "value": 0.9, "age_months": 3.0})],
    "undated": lambda t: [("dxa", {"measure": "T", "site": "FN", "value": t})],
    # a DXA on record without a usable result: done, ordered and not resulted, declined
    "done-no-result": lambda t: [("dxa_record", {"state": "done", "source": "procedure", "date": "2026-03-01", "age_months": 3.0})],
    "ordered": lambda t: [("dxa_record", {"state": "ordered", "source": "order", "date": "2026-04-01", "age_months": 2.0})],
    "declined": lambda t: [("dxa_record", {"state": "declined", "source": "order", "date": "2026-04-01", "age_months": 2.0})],
    "none": lambda t: [],
}
RISK_FACTORS = [
    ("smoking", {"status": "current", "source": "observation"}),
    ("bmi", {"value": 18.0, "age_months": 2.0}),
    ("glucocorticoid", {"months": 8.0}),
    ("family_history", {"parent": True, "concept": "hip-fracture"}),
]
FRACTURE = {
    "none": [],
    "fragility": [("fracture", {"site": "vertebral", "fragility": True, "marker": False, "high_energy": False, "possible_fragility_code": False, "age_at": 55})],
    "possible-hip": [("fracture", {"site": "hip", "fragility": False, "marker": False, "high_energy": False, "possible_fragility_code": True, "age_at": 60})],
    "possible-vertebral": [("fracture", {"site": "vertebral", "fragility": False, "marker": False, "high_energy": False, "possible_fragility_code": True, "age_at": 68})],
    "high-energy-radius": [("fracture", {"site": "wrist", "fragility": False, "marker": False, "high_energy": True, "possible_fragility_code": True, "age_at": 70})],
}
THERAPY = {
    "none": [],
    "oral-bp": [("antiresorptive", {"ingredient": "alendronate", "class": "bisphosphonate", "route": "oral", "status": "active", "ended": False})],
    "denosumab": [("antiresorptive", {"ingredient": "denosumab", "class": "denosumab", "route": "sc", "status": "active", "ended": False})],
    "denosumab-stopped": [("antiresorptive", {"ingredient": "denosumab", "class": "denosumab", "route": "sc", "status": "stopped", "ended": True})],
}
NORMAL_LABS = [
    ("renal", {"crcl": 80.0, "age_months": 2.0}),
    ("lab", {"concept": "egfr", "value": 80.0, "age_months": 2.0}),
    ("calcium_status", {"value": 9.4, "corrected": False, "age_months": 2.0}),
    ("lab", {"concept": "vitamin-d-25oh", "value": 32.0, "age_months": 2.0}),
]
# A variant may take one of the normal results away, so that the one it adds stands alone.
DROP_EGFR = ("$drop", {"t": "lab", "concept": "egfr"})
DROP_RENAL = ("$drop", {"t": "renal"})
DROP_VITAMIN_D = ("$drop", {"t": "lab", "concept": "vitamin-d-25oh"})
# Variants around a base case (active, T -2.2, no RF): each is one clinical situation.
VARIANTS = {
    "rapid-loss-LS": [("bmd_change", {"site": "LS", "days": 365, "pct_per_year": -6.0, "abs_change": -0.06, "latest_age_months": 3.0})],
    "rapid-loss-TH": [("bmd_change", {"site": "TH", "days": 365, "pct_per_year": -6.0, "abs_change": -0.05, "latest_age_months": 3.0})],
    "slow-loss": [("bmd_change", {"site": "LS", "days": 365, "pct_per_year": -3.0, "abs_change": -0.03, "latest_age_months": 3.0})],
    "alcohol-units": [("alcohol", {"measure": "units-per-day", "value": 4.0})],
    "auditc-positive": [("alcohol", {"measure": "audit-c", "value": 5.0})],
    "rheumatoid-arthritis": [("condition", {"concept": "rheumatoid-arthritis", "active": True})],
    "premature-menopause": [("condition", {"concept": "premature-menopause", "active": False})],
    "hypogonadism": [("condition", {"concept": "hypogonadism", "active": True})],
    "family-finding": [("condition", {"concept": "family-hip-fracture", "active": True})],
    "breast-cancer": [("condition", {"concept": "breast-cancer", "active": True})],
    "fracture-age-unknown": [("fracture", {"site": "wrist", "fragility": True, "marker": False, "high_energy": False, "possible_fragility_code": False})],
    "fracture-mechanism": [("fracture", {"site": "hip", "fragility": False, "marker": True, "high_energy": False, "possible_fragility_code": True, "age_at": 45})],
    "fracture-mechanism-age-unknown": [("fracture", {"site": "hip", "fragility": False, "marker": True, "high_energy": False, "possible_fragility_code": True})],
    "fracture-possible-age-unknown": [("fracture", {"site": "humerus", "fragility": False, "marker": False, "high_energy": False, "possible_fragility_code": True})],
    "forearm-t-only": [("dxa", {"measure": "T", "site": "FA", "value": -1.0, "age_months": 3.0})],
    "stale-t-moderate": [("dxa", {"measure": "T", "site": "LS", "value": -1.8, "age_months": 30.0})],
    "excluded-resource": [("excluded", {"resource": "Observation", "reason": "status entered-in-error"})],
    "medication-unresolved": [("med_issue", {"issue": "unresolved"})],
    "medication-by-text": [("med_issue", {"issue": "by-text"})],
    # a medication entry, and a Condition, left out as unreadable (sources.py, facts.extract_facts)
    "medication-unreadable": [("med_issue", {"issue": "unreadable"}), ("record_unreadable", {"count": 1})],
    "record-unreadable": [("record_unreadable", {"count": 1})],
    "d3-only": [("lab", {"concept": "vitamin-d3-25oh", "value": 28.0, "age_months": 2.0}), DROP_VITAMIN_D],
    "btm": [("lab", {"concept": "ctx", "value": 900.0, "age_months": 2.0})],
    "crcl-25": [("renal", {"crcl": 25.0, "age_months": 2.0}), ("lab", {"concept": "egfr", "value": 27.0, "age_months": 2.0})],
    "crcl-32": [("renal", {"crcl": 32.0, "age_months": 2.0})],
    "crcl-25-no-egfr": [("renal", {"crcl": 25.0, "age_months": 2.0}), DROP_EGFR],
    "egfr-only-25": [("lab", {"concept": "egfr", "value": 25.0, "age_months": 2.0}), DROP_RENAL],
    "egfr-only-33": [("lab", {"concept": "egfr", "value": 33.0, "age_months": 2.0}), DROP_RENAL],
    "egfr-only-50": [("lab", {"concept": "egfr", "value": 50.0, "age_months": 2.0}), DROP_RENAL],
    "hypocalcaemia-range": [("calcium_status", {"value": 8.6, "corrected": True, "below_reference": True, "age_months": 2.0})],
    "hypocalcaemia-fallback": [("calcium_status", {"value": 8.1, "corrected": True, "age_months": 2.0})],
    "vitamin-d-low": [("lab", {"concept": "vitamin-d-25oh", "value": 15.0, "age_months": 2.0})],
    "dental": [("condition", {"concept": "dental", "active": True})],
    "no-labs": None,  # the base case without the normal laboratory results
    "dmab-recent-dose": [("antiresorptive", {"ingredient": "denosumab", "class": "denosumab", "route": "sc", "status": "administered", "ended": False, "months_since": 3.0})],
    "dmab-overdue": [("antiresorptive", {"ingredient": "denosumab", "class": "denosumab", "route": "sc", "status": "administered", "ended": False, "months_since": 9.0})],
    "za-recent-infusion": [("antiresorptive", {"ingredient": "zoledronic acid", "class": "bisphosphonate", "route": "iv", "status": "administered", "ended": False, "months_since": 5.0})],
    "frax-above-asco": [
        ("risk_score", {"tool": "frax-mof", "label": "FRAX MOF", "unit": "%", "value": 22.0, "date": "2026-01-10", "age_months": 4.7}),
        ("risk_score", {"tool": "frax-hip", "label": "FRAX hip", "unit": "%", "value": 3.5, "date": "2026-01-10", "age_months": 4.7}),
    ],
    "screening-scores": [
        ("risk_score", {"tool": "ost", "label": "OST score", "unit": "", "value": -1.0, "date": "2026-01-10", "age_months": 4.7}),
        ("risk_score", {"tool": "orai", "label": "ORAI score", "unit": "", "value": 9.0, "date": "2026-01-10", "age_months": 4.7}),
        ("risk_score", {"tool": "osiris", "label": "OSIRIS score", "unit": "", "value": 0.0, "date": "2026-01-10", "age_months": 4.7}),
    ],
    "dxa-done-and-declined": [
        ("dxa_record", {"state": "done", "source": "report", "date": "2026-02-01", "age_months": 4.0}),
        ("dxa_record", {"state": "declined", "source": "procedure", "date": "2025-06-01", "age_months": 12.0}),
    ],
    # a DXA result without a value from the graded scan (3 months ago), and from an older scan
    "dxa-no-value-same-scan": [("dxa_record", {"state": "done", "source": "observation", "date": "2026-03-01", "age_months": 3.0})],
    "dxa-no-value-older-scan": [("dxa_record", {"state": "done", "source": "observation", "date": "2025-12-01", "age_months": 6.0})],
    # a DXA report on the day of the graded scan (that scan itself), and one of a later scan
    "dxa-report-same-scan": [("dxa_record", {"state": "done", "source": "report", "date": "2026-03-01", "age_months": 3.0})],
    "dxa-report-later-scan": [("dxa_record", {"state": "done", "source": "report", "date": "2026-05-01", "age_months": 1.0})],
    "oral-bp-rapid-loss": [
        ("antiresorptive", {"ingredient": "alendronate", "class": "bisphosphonate", "route": "oral", "status": "active", "ended": False}),
        ("bmd_change", {"site": "LS", "days": 365, "pct_per_year": -6.0, "abs_change": -0.06, "latest_age_months": 3.0}),
    ],
}
#: Variants that add a current DXA score of their own.
VALID_DXA_VARIANTS = {"forearm-t-only"}
# Populations: (patient fact fields, extra facts, DXA measure used)
POPULATIONS = {
    "woman-58": ({"sex": "female", "age": 58}, [], "T"),
    "woman-70": ({"sex": "female", "age": 70}, [], "T"),
    "man-56-trt": ({"sex": "male", "age": 56}, [("hormone_med", {"class": "testosterone", "status": "active", "ended": False})], "T"),
    "man-45-trt": ({"sex": "male", "age": 45}, [("hormone_med", {"class": "testosterone", "status": "active", "ended": False})], "Z"),
    "woman-38-ofs": ({"sex": "female", "age": 38}, [("hormone_med", {"class": "gnrh-agonist", "status": "active", "ended": False})], "Z"),
    "woman-44-oophorectomy": ({"sex": "female", "age": 44}, [("condition", {"concept": "ovarian-suppression", "active": False})], "Z"),
    "sex-unknown": ({"sex": "unknown", "age": 60}, [("alcohol", {"measure": "audit-c", "value": 3.0})], "T"),
    "man-60-auditc": ({"sex": "male", "age": 60}, [("alcohol", {"measure": "audit-c", "value": 4.0})], "T"),
    "age-unknown": ({"sex": "female"}, [], "T"),
    "woman-47-no-ofs-z-only": ({"sex": "female", "age": 47}, [], "Z"),
    "man-45-trt-t-only": ({"sex": "male", "age": 45}, [("hormone_med", {"class": "testosterone", "status": "active", "ended": False})], "T"),
    "man-60-breast-cancer": ({"sex": "male", "age": 60}, [("condition", {"concept": "breast-cancer", "active": True})], "T"),
    "patient-missing": ({"sex": "unknown", "record": "missing"}, [], "T"),
    "patient-missing-z": ({"sex": "unknown", "record": "missing"}, [], "Z"),
    "woman-ofs-age-unknown": ({"sex": "female"}, [("hormone_med", {"class": "gnrh-agonist", "status": "active", "ended": False})], "Z"),
    "oophorectomy-patient-missing": ({"sex": "unknown", "record": "missing"}, [("condition", {"concept": "ovarian-suppression", "active": False})], "T"),
    "man-45-trt-two-rf": (
        {"sex": "male", "age": 45},
        [("hormone_med", {"class": "testosterone", "status": "active", "ended": False}), *RISK_FACTORS[:2]],
        "Z",
    ),
}


@dataclass
class Case:
    name: str
    facts: list[dict]
    on_ai: bool
    has_valid_dxa: bool

    @property
    def patient(self) -> dict:
        return next(f for f in self.facts if f["t"] == "patient")

    def has(self, fact_type: str, **fields) -> bool:
        return any(f["t"] == fact_type and all(f.get(k) == v for k, v in fields.items()) for f in self.facts)


#: Recommendations that start or switch an antiresorptive (the denosumab follow-on included).
STARTS = frozenset({
    "oral-bp", "potent-ar", "potent-ar-osteoporosis", "za-4mg-q6m", "switch-iv", "switch-iv-osteoporosis", "dmab-transition",
})
#: The breast-cancer adjuvant regimen (zoledronic acid 4 mg every 6 months among its choices).
ADJUVANT = frozenset({"potent-ar", "za-4mg-q6m", "switch-iv"})


def antiresorptive_state(case: Case, derivation) -> str:
    """What the patient's antiresorptive is doing: the state recommendation texts must read true in."""
    on = {d.fact.get("class") for d in derivation.of_type("on_ar")}
    if "denosumab" in on:
        return "denosumab"
    if "bisphosphonate" in on:
        return "bisphosphonate"
    if case.has("antiresorptive", **{"class": "denosumab"}):
        return "denosumab-stopped-or-overdue"
    if case.has("antiresorptive"):
        return "bisphosphonate-stopped"
    return "none"


@dataclass
class Sample:
    """One assessment that gave a recommendation, and the state it was given in."""

    case: Case
    assessment: object
    ai_status: str
    antiresorptive: str
    sex: str
    breast_cancer: bool


@dataclass
class CheckReport:
    ruleset: str
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    never_fired: list[str] = field(default_factory=list)
    #: (ai_status, antiresorptive state, sex, recommendation) -> the first assessment that gave it
    samples: dict[tuple[str, str, str, str], Sample] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures and not self.never_fired


def unread_since_graded(case: Case, derivation) -> bool:
    """A DXA result without a value from the scan whose score was selected or a later one, or a later DXA without results."""
    selected = {(d.fact.get("score"), d.fact.get("site"), d.fact.get("value")) for t in ("bmd_t", "bmd_z") for d in derivation.of_type(t)}
    graded = [
        f["age_months"] for f in case.facts
        if f["t"] == "dxa" and (f.get("measure"), f.get("site"), f.get("value")) in selected and f.get("age_months") is not None
    ]
    records = [f for f in case.facts if f["t"] == "dxa_record" and f.get("state") == "done" and f.get("age_months") is not None]
    # a value-less result of the same scan or a later one; a report or procedure of a later scan
    return any(
        r["age_months"] <= g if r.get("source") == "observation" else r["age_months"] < g
        for r in records for g in graded
    )


def synthetic_facts(items) -> list[dict]:
    """Base facts from (type, fields) pairs, each with a synthetic reference."""
    out = []
    for i, (fact_type, fields) in enumerate(items):
        out.append({"t": fact_type, **fields, "refs": [f"Synthetic/{fact_type}-{i}"]})
    return out


def enumerate_cases() -> Iterator[Case]:
    # The core grid: eligibility x T band x RF count x fracture x DXA status x therapy.
    for elig, band, n_rf, fx, dxa_status, therapy in itertools.product(
        ELIGIBILITY, T_BANDS, range(len(RISK_FACTORS) + 1), FRACTURE, DXA_STATUS, THERAPY
    ):
        if dxa_status in ("stale", "undated") and band not in ("T -3.0", "T -1.8", "T -1.4"):
            continue  # an old T-score matters by band only (G28): one representative of each
        if dxa_status not in ("valid-axial", "forearm-only", "stale", "undated") and band != "T -3.0":
            continue  # the band cannot matter without a T-score: one representative
        items = [("patient", {"sex": "female", "age": 58})] + ELIGIBILITY[elig] + RISK_FACTORS[:n_rf]
        items += FRACTURE[fx] + DXA_STATUS[dxa_status](T_BANDS[band]) + THERAPY[therapy] + NORMAL_LABS
        yield Case(
            f"{elig} | {band} | RF {n_rf} | fracture {fx} | DXA {dxa_status} | therapy {therapy}",
            synthetic_facts(items),
            on_ai=elig != "none",
            has_valid_dxa=dxa_status in ("valid-axial", "forearm-only"),
        )
    # Variants and populations around base cases, for each eligibility.
    for elig, (pop, (patient, extra, score)), band in itertools.product(ELIGIBILITY, POPULATIONS.items(), ("T -2.2", "T -1.0")):
        value = -2.2 if band == "T -2.2" else -1.0
        for dxa_present in (True, False):
            dxa = [("dxa", {"measure": score, "site": "LS", "value": value, "age_months": 3.0})] if dxa_present else []
            for variant, vfacts in VARIANTS.items():
                vfacts = vfacts or []
                drops = [fields for fact_type, fields in vfacts if fact_type == "$drop"]
                labs = [] if variant == "no-labs" else [
                    (t, f) for t, f in NORMAL_LABS
                    if not any(d["t"] == t and d.get("concept", f.get("concept")) == f.get("concept") for d in drops)
                ]
                added = [(t, f) for t, f in vfacts if t != "$drop"]
                items = [("patient", patient)] + ELIGIBILITY[elig] + extra + dxa + added + labs
                yield Case(
                    f"{elig} | {pop} | {score} {value} | DXA {'valid' if dxa_present else 'none'} | {variant}",
                    synthetic_facts(items),
                    on_ai=elig != "none",
                    has_valid_dxa=dxa_present or variant in VALID_DXA_VARIANTS,
                )


def check(assessor: Assessor, *, max_failures: int = 20) -> CheckReport:
    """Evaluate the whole decision space; stop early once `max_failures` holes are found."""
    rulebook = assessor.rulebook
    checks = rulebook.checks
    exclusive = [set(group) for group in checks.get("exclusive", [])]
    requires = {k: set(v) for k, v in (checks.get("requires") or {}).items()}
    excludes = {k: set(v) for k, v in (checks.get("excludes") or {}).items()}
    report = CheckReport(ruleset=rulebook.name)
    fired: set[str] = set()

    def fail(case: Case, message: str) -> None:
        if len(report.failures) < max_failures:
            report.failures.append(f"{case.name}: {message}")
        elif len(report.failures) == max_failures:
            report.failures.append("... (more failures not shown)")

    for case in enumerate_cases():
        if len(report.failures) > max_failures:
            break
        report.cases += 1
        try:
            derivation = assessor.engine.evaluate(case.facts)
            fired.update(derivation.fired)
            a = build_assessment("Patient/check", AS_OF, derivation, rulebook, assessor.ruleset_info)
        except AiblError as exc:
            fail(case, f"no single outcome: {exc.message}")
            continue
        recs = set(a.recommendations)
        if case.on_ai and not recs:
            fail(case, f"empty recommendation set (category {a.category})")
        if not case.on_ai and a.category != "not-applicable":
            fail(case, f"category {a.category} without an aromatase inhibitor")
        if case.on_ai and a.ai_status in ("active", "planned") and a.category == "not-applicable":
            fail(case, "not-applicable for a patient on or starting an aromatase inhibitor")
        if a.category == "low" and not case.has_valid_dxa:
            fail(case, "low without a valid DXA")
        person = case.patient
        if a.category == "low" and "age" not in person:
            fail(case, "low with age unknown")
        if a.category == "low" and unread_since_graded(case, derivation):
            fail(case, "low while a DXA result without a value is on record from the graded scan or a later one")
        if a.category == "low" and case.has("record_unreadable"):
            fail(case, "low while entries of the record could not be read")
        if case.has("med_issue", issue="unreadable") and "medication-unresolved" not in a.flags:
            fail(case, "a medication entry that could not be read, without medication-unresolved")
        ofs = bool(derivation.of_type("ofs"))
        if person.get("sex") == "female" and a.ai_status in ("active", "planned") and not ofs:
            if derivation.of_type("bmd_z"):
                fail(case, "a Z-score decided for a woman on an aromatase inhibitor without ovarian suppression")
        ar_state = antiresorptive_state(case, derivation)
        continues = a.ai_status != "none" and ar_state in ("denosumab", "bisphosphonate")
        if (recs & STARTS or continues) and "ca-vitd" not in recs:
            fail(case, f"an antiresorptive recommended or continuing ({sorted(recs & STARTS) or ar_state}) without ca-vitd")
        if recs & STARTS and "ci-check" not in recs:
            fail(case, f"{sorted(recs & STARTS)} without ci-check")
        breast_cancer = case.has("condition", concept="breast-cancer")
        if person.get("sex") == "male" and not breast_cancer and recs & ADJUVANT:
            fail(case, f"the breast-cancer adjuvant regimen {sorted(recs & ADJUVANT)} for a man without breast cancer")
        for rec in recs:
            key = (a.ai_status, ar_state, str(person.get("sex")), rec)
            if key not in report.samples:
                report.samples[key] = Sample(case, a, a.ai_status, ar_state, str(person.get("sex")), breast_cancer)
        for group in exclusive:
            both = recs & group
            if len(both) > 1:
                fail(case, f"conflicting recommendations {sorted(both)}")
        for rec, needed in requires.items():
            if rec in recs and not needed <= recs:
                fail(case, f"{rec} without {sorted(needed - recs)}")
        for rec, barred in excludes.items():
            if rec in recs and recs & barred:
                fail(case, f"{rec} together with {sorted(recs & barred)}")
    if len(report.failures) <= max_failures:  # only a complete run can say a rule never fires
        report.never_fired = sorted({r.id for r in rulebook.rules} - fired)
    return report


def format_report(report: CheckReport) -> str:
    lines = [f"rules check: {report.ruleset}: {report.cases} combinations evaluated"]
    for failure in report.failures:
        lines.append(f"  HOLE: {failure}")
    for rule_id in report.never_fired:
        lines.append(f"  NEVER FIRES: {rule_id} (no combination of the decision space reaches it)")
    lines.append("OK: one category and a non-empty, conflict-free recommendation set everywhere; every rule fires" if report.ok else "FAILED")
    return "\n".join(lines)
