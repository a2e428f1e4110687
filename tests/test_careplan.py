"""Assessment -> RiskAssessment + CarePlan + transaction Bundle, on hand-built assessments."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import yaml
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.careplan import CarePlan
from fhir.resources.R4B.riskassessment import RiskAssessment

from fhir_aibl.assessment import Assessment, Finding, RulesetInfo
from fhir_aibl.careplan import (
    CATEGORY_SYSTEM,
    IDENTIFIER_SYSTEM,
    RECOMMENDATION_SYSTEM,
    RULE_EXTENSION,
    RULESET_EXTENSION,
    RULESET_SYSTEM,
    Catalogue,
    build_resources,
    business_identifier,
    full_url,
    load_catalogue,
    transaction_bundle,
)
from fhir_aibl.errors import RulesError

CATALOGUE_PATH = Path(__file__).resolve().parents[1] / "rules" / "recommendations.yaml"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

RECOMMENDATION_CODES = (
    "dxa-now", "dxa-24m", "dxa-12m", "dxa-12-24m", "oral-bp", "potent-ar", "za-4mg-q6m",
    "ci-check", "ca-vitd", "exercise", "secondary-causes", "adherence", "switch-iv", "post-ai",
    "dmab-transition", "btm-optional", "e2-monitor", "specialist", "dental-review",
    "potent-ar-osteoporosis", "post-ai-continue", "complete-record", "switch-iv-osteoporosis",
)
FLAG_CODES = (
    "low-with-rf", "osteoporosis-by-dxa", "forearm-only", "dxa-stale", "t-unavailable",
    "d3-only", "on-hold", "possible-fragility-fracture", "medication-unresolved", "medication-by-text",
    "score-substituted", "age-unknown",
)
MONITORING = {"dxa-24m": (24, None), "dxa-12m": (12, None), "dxa-12-24m": (12, 24)}

RULESET = RulesetInfo(name="aibl-1.0.0-0123456789ab", id="aibl", version="1.0.0", content_hash="0123456789ab")
CREATED = dt.datetime(2026, 6, 1, 9, 30, tzinfo=dt.timezone.utc)

DXA = "Observation/v10-dxa-ls/_history/1"
AI = "MedicationStatement/v10-ana/_history/2"
BC = "Condition/v10-bc"


def ext_values(element, url: str) -> list[str]:
    """The values of extension `url` on a resource or element (the rules' one is space-separated)."""
    return [v for e in element.extension or [] if e.url == url for v in (e.valueString.split() if url == RULE_EXTENSION else [e.valueString])]


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return load_catalogue(CATALOGUE_PATH)


def high_risk(**changes) -> Assessment:
    """V10: T -2.1, no risk factor, on anastrozole, with a breast cancer indication."""
    findings = (
        Finding(kind="ai-status", code="active", rules=("E1-ACTIVE",), evidence=(AI,)),
        Finding(kind="category", code="high", rules=("C-HIGH-1", "CAT-HIGH", "CAT-FINAL-HIGH"), evidence=(AI, DXA)),
        Finding(kind="recommendation", code="potent-ar", rules=("REC-HIGH-POTENT-AR",), evidence=(AI, DXA)),
        Finding(kind="recommendation", code="ci-check", rules=("REC-HIGH-POTENT-AR",), evidence=(AI, DXA)),
        Finding(kind="recommendation", code="dxa-12m", rules=("REC-HIGH-DXA-12M",), evidence=(AI, DXA)),
        Finding(kind="recommendation", code="ca-vitd", rules=("ALWAYS-CA-VITD",), evidence=(AI,)),
        Finding(kind="recommendation", code="exercise", rules=("ALWAYS-EXERCISE",), evidence=(AI,)),
        Finding(kind="indication", code="breast-cancer", rules=("E1-INDICATION",), evidence=(AI, BC)),
    )
    data = dict(
        patient="Patient/v10",
        ai_status="active",
        category="high",
        risk_factors=(),
        recommendations=("potent-ar", "ci-check", "dxa-12m", "ca-vitd", "exercise"),
        flags=(),
        rules=(
            "ALWAYS-CA-VITD", "ALWAYS-EXERCISE", "C-HIGH-1", "CAT-FINAL-HIGH", "CAT-HIGH", "E1-ACTIVE",
            "E1-INDICATION", "REC-HIGH-DXA-12M", "REC-HIGH-POTENT-AR",
        ),
        evidence=(BC, AI, DXA),
        as_of=dt.date(2026, 6, 1),
        ruleset=RULESET,
        findings=findings,
    )
    data.update(changes)
    return Assessment(**data)


def indeterminate() -> Assessment:
    """V22: only a stale DXA."""
    stale = "Observation/v22-dxa/_history/3"
    return Assessment(
        patient="Patient/v22",
        ai_status="active",
        category="indeterminate",
        risk_factors=("age-over-65",),
        recommendations=("dxa-now",),
        flags=("dxa-stale",),
        rules=("B2-FLAG-STALE", "C-IND", "CAT-FINAL-INDETERMINATE", "RF-AGE"),
        evidence=(AI, stale, "Patient/v22/_history/1"),
        as_of=dt.date(2026, 6, 1),
        ruleset=RULESET,
        findings=(
            Finding(kind="category", code="indeterminate", rules=("C-IND", "CAT-FINAL-INDETERMINATE"), evidence=(AI,)),
            Finding(kind="risk-factor", code="age-over-65", rules=("RF-AGE",), evidence=("Patient/v22/_history/1",)),
            Finding(kind="recommendation", code="dxa-now", rules=("CAT-FINAL-INDETERMINATE",), evidence=(AI,)),
            Finding(kind="flag", code="dxa-stale", rules=("B2-FLAG-STALE",), evidence=(stale,)),
        ),
    )


def not_applicable() -> Assessment:
    """V32: no aromatase inhibitor."""
    return Assessment(
        patient="Patient/v32",
        ai_status="none",
        category="not-applicable",
        risk_factors=(),
        recommendations=(),
        flags=(),
        rules=("E1-NONE", "CAT-NOT-APPLICABLE"),
        evidence=(),
        as_of=dt.date(2026, 6, 1),
        ruleset=RULESET,
    )


def codes(concept, system: str | None = None) -> list[str]:
    return [c.code for c in concept.coding or [] if system is None or c.system == system]


def rec_code(activity) -> str:
    (code,) = codes(activity.detail.code, RECOMMENDATION_SYSTEM)
    return code


# -- the catalogue -------------------------------------------------------------------------


def test_real_catalogue_covers_every_code(catalogue):
    assert catalogue.missing(recommendations=RECOMMENDATION_CODES, flags=FLAG_CODES) == []
    for code, entry in catalogue.recommendations.items():
        assert entry.title and entry.text and entry.citation, code
    for code in MONITORING:
        assert catalogue.recommendations[code].kind == "monitoring"
    assert {f.severity for f in catalogue.flags.values()} <= {"info", "warning"}


def test_real_catalogue_codes(catalogue):
    rec = catalogue.recommendations
    for code in ("dxa-now", "dxa-24m", "dxa-12m", "dxa-12-24m"):
        assert [(c.system, c.code) for c in rec[code].code] == [(SNOMED, "312681000")]
    assert [(c.system, c.code) for c in rec["oral-bp"].code] == [(RXNORM, "73056")]
    assert {c.code for c in rec["potent-ar"].code} == {"993449", "77655"}
    assert {c.code for c in rec["ca-vitd"].code} == {"1897", "2418"}
    assert rec["dxa-now"].timing.value == 0
    assert (rec["dxa-12-24m"].timing.value, rec["dxa-12-24m"].timing.max) == (12, 24)
    potent = {p.code.code: p for p in rec["potent-ar"].products}
    assert (potent["993449"].dosage, potent["993449"].route) == ("60 mg", "subcutaneous")
    assert (potent["77655"].dosage, potent["77655"].frequency) == ("4 mg", "every 6 months")
    (za,) = rec["za-4mg-q6m"].products
    assert (za.code.code, za.dosage, za.route) == ("77655", "4 mg", "intravenous")
    (ris,) = rec["oral-bp"].products
    assert (ris.dosage, ris.route, ris.frequency) == ("35 mg", "oral", "once weekly")


def test_catalogue_missing_a_code_raises(catalogue):
    doc = yaml.safe_load(CATALOGUE_PATH.read_text(encoding="utf-8"))
    del doc["recommendations"]["potent-ar"]
    del doc["flags"]["dxa-stale"]
    smaller = Catalogue.model_validate(doc)
    with pytest.raises(RulesError, match="potent-ar"):
        build_resources(high_risk(), smaller, created=CREATED)
    with pytest.raises(RulesError, match="dxa-stale"):
        build_resources(indeterminate(), smaller, created=CREATED)


def test_invalid_catalogue_file_raises(tmp_path):
    for section, code, key, value, expected in [
        ("recommendations", "exercise", "citation", ["NO-SUCH-SOURCE"], "NO-SUCH-SOURCE"),
        ("flags", "on-hold", "severity", "loud", "flags.on-hold.severity"),
        ("recommendations", "exercise", "products", [{"display": "x", "dosage": "1", "route": "oral", "frequency": "daily"}], "only for kind medication"),
    ]:
        doc = yaml.safe_load(CATALOGUE_PATH.read_text(encoding="utf-8"))
        doc[section][code][key] = value
        bad = tmp_path / "recommendations.yaml"
        bad.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
        with pytest.raises(RulesError, match=expected):
            load_catalogue(bad)
    (tmp_path / "broken.yaml").write_text("recommendations: [", encoding="utf-8")
    with pytest.raises(RulesError, match="YAML"):
        load_catalogue(tmp_path / "broken.yaml")
    with pytest.raises(RulesError, match="cannot read"):
        load_catalogue(tmp_path / "absent.yaml")


# -- the identifier ------------------------------------------------------------------------


def test_identifier_is_deterministic_and_content_derived():
    first = business_identifier(high_risk())
    assert first.system == IDENTIFIER_SYSTEM and len(first.value) == 32
    assert business_identifier(high_risk()) == first
    # Another day, same data: same identifier (as_of is not part of it) ...
    assert business_identifier(high_risk(as_of=dt.date(2026, 9, 1))) == first
    # ... and the order of lists carries no meaning.
    assert business_identifier(high_risk(evidence=(DXA, AI, BC))) == first
    # What was decided, and on which data, changes it.
    assert business_identifier(high_risk(category="moderate")) != first
    assert business_identifier(high_risk(flags=("osteoporosis-by-dxa",))) != first
    assert business_identifier(high_risk(evidence=(BC, AI, "Observation/v10-dxa-ls/_history/2"))) != first
    assert business_identifier(high_risk(patient="Patient/other")) != first
    other_rules = RULESET.model_copy(update={"name": "aibl-1.0.1-fedcba987654"})
    assert business_identifier(high_risk(ruleset=other_rules)) != first


def test_identifier_does_not_depend_on_created(catalogue):
    ra1, cp1 = build_resources(high_risk(), catalogue, created=CREATED)
    ra2, cp2 = build_resources(high_risk(), catalogue, created=CREATED + dt.timedelta(days=30))
    ra3, cp3 = build_resources(high_risk(), catalogue)  # default: now
    assert cp1.created != cp2.created
    assert cp1.identifier == cp2.identifier == cp3.identifier == ra1.identifier == ra2.identifier
    assert cp3.created.tzinfo is not None
    _, moderate = build_resources(high_risk(category="moderate"), catalogue, created=CREATED)
    assert moderate.identifier != cp1.identifier


# -- RiskAssessment ------------------------------------------------------------------------


def test_risk_assessment_high(catalogue):
    risk, _ = build_resources(high_risk(), catalogue, created=CREATED)
    assert isinstance(risk, RiskAssessment)
    assert risk.status == "final"
    assert risk.subject.reference == "Patient/v10"
    assert str(risk.occurrenceDateTime) == "2026-06-01"
    assert [b.reference for b in risk.basis] == [BC, AI, DXA]
    (method,) = risk.method.coding
    assert (method.system, method.code) == (RULESET_SYSTEM, RULESET.name)
    assert "1.0.0" in method.display and "0123456789ab" in method.display
    (prediction,) = risk.prediction
    assert codes(prediction.qualitativeRisk, CATEGORY_SYSTEM) == ["high"]
    assert prediction.rationale.startswith("High risk of bone loss, on an aromatase inhibitor")
    assert "C-HIGH-1" in ext_values(risk, RULE_EXTENSION) and "C-HIGH-1" not in prediction.rationale
    assert ext_values(risk, RULESET_EXTENSION) == []  # the method's coding names the ruleset
    assert risk.identifier == [business_identifier(high_risk())]
    assert risk.note is None


def test_risk_assessment_indeterminate_notes_flags(catalogue):
    risk, _ = build_resources(indeterminate(), catalogue, created=CREATED)
    assert codes(risk.prediction[0].qualitativeRisk, CATEGORY_SYSTEM) == ["indeterminate"]
    assert "age over 65" in risk.prediction[0].rationale and "RF-AGE" in ext_values(risk, RULE_EXTENSION)
    assert any("more than two years old" in n.text for n in risk.note)
    assert [b.reference for b in risk.basis] == list(indeterminate().evidence)


# -- CarePlan ------------------------------------------------------------------------------


def test_care_plan_high(catalogue):
    assessment = high_risk()
    risk, plan = build_resources(assessment, catalogue, created=CREATED)
    assert isinstance(plan, CarePlan)
    assert (plan.status, plan.intent) == ("draft", "proposal")
    assert codes(plan.category[0], "http://hl7.org/fhir/us/core/CodeSystem/careplan-category") == ["assess-plan"]
    assert plan.subject.reference == "Patient/v10"
    assert plan.created == CREATED
    assert "High risk" in plan.title and "High risk of bone loss, on an aromatase inhibitor" in plan.description
    assert [a.reference for a in plan.addresses] == [BC]
    supporting = [s.reference for s in plan.supportingInfo]
    assert supporting[0] == full_url("RiskAssessment", risk.identifier[0])
    assert supporting[1:] == [BC, AI, DXA]
    assert any(RULESET.name in v for v in ext_values(plan, RULESET_EXTENSION))
    assert plan.note is None  # no flags: nothing for the clinician to note

    assert [rec_code(a) for a in plan.activity] == list(assessment.recommendations)
    by_code = {rec_code(a): a.detail for a in plan.activity}
    for detail in by_code.values():
        assert detail.status == "not-started"
    potent = by_code["potent-ar"]
    assert potent.kind == "MedicationRequest"
    assert set(codes(potent.code, RXNORM)) == {"993449", "77655"}
    assert set(codes(potent.productCodeableConcept, RXNORM)) == {"993449", "77655"}
    assert "60 mg" in potent.productCodeableConcept.text and "4 mg" in potent.productCodeableConcept.text
    assert ext_values(potent, RULE_EXTENSION) == ["REC-HIGH-POTENT-AR"]
    assert "doi.org/10.1016/j.jbo.2017.03.001" in potent.description  # the citation, as a link
    assert [r.reference for r in potent.reasonReference] == [DXA]  # MedicationStatement is not a reason type
    dxa = by_code["dxa-12m"]
    assert dxa.kind == "ServiceRequest"
    assert codes(dxa.code, SNOMED) == ["312681000"]
    assert (float(dxa.scheduledTiming.repeat.period), dxa.scheduledTiming.repeat.periodUnit) == (12.0, "mo")
    assert dxa.scheduledTiming.repeat.periodMax is None
    assert "REC-HIGH-DXA-12M" in ext_values(dxa, RULE_EXTENSION) and [r.reference for r in dxa.reasonReference] == [DXA]
    assert set(codes(by_code["ca-vitd"].code, RXNORM)) == {"1897", "2418"}
    assert "1,200 mg" in by_code["ca-vitd"].productCodeableConcept.text
    assert by_code["ci-check"].kind == "ServiceRequest" and by_code["ci-check"].scheduledTiming is None
    assert by_code["exercise"].kind is None
    for code, detail in by_code.items():
        assert detail.description.startswith(catalogue.recommendations[code].clinician.action)


def test_care_plan_monitoring_timings(catalogue):
    assessment = high_risk(
        recommendations=("dxa-24m", "dxa-12-24m", "oral-bp"),
        findings=(Finding(kind="recommendation", code="dxa-24m", rules=("CAT-FINAL-LOW",), evidence=(DXA,)),),
    )
    _, plan = build_resources(assessment, catalogue, created=CREATED)
    by_code = {rec_code(a): a.detail for a in plan.activity}
    for code, (period, period_max) in [("dxa-24m", MONITORING["dxa-24m"]), ("dxa-12-24m", MONITORING["dxa-12-24m"])]:
        repeat = by_code[code].scheduledTiming.repeat
        assert (float(repeat.period), repeat.periodUnit) == (period, "mo")
        assert (float(repeat.periodMax) if repeat.periodMax is not None else None) == period_max
    assert ext_values(by_code["dxa-12-24m"], RULE_EXTENSION) == []  # no finding for it
    oral = by_code["oral-bp"]
    assert codes(oral.productCodeableConcept, RXNORM) == ["73056"]
    assert (float(oral.quantity.value), oral.quantity.code) == (35.0, "mg")


def test_care_plan_indeterminate(catalogue):
    _, plan = build_resources(indeterminate(), catalogue, created=CREATED)
    (activity,) = plan.activity
    assert rec_code(activity) == "dxa-now"
    assert codes(activity.detail.code, SNOMED) == ["312681000"]
    assert activity.detail.scheduledTiming.repeat.count == 1
    assert activity.detail.scheduledTiming.code.text == "now"
    assert plan.addresses is None
    assert any("more than two years old" in n.text for n in plan.note)


def test_care_plan_not_applicable(catalogue):
    risk, plan = build_resources(not_applicable(), catalogue, created=CREATED)
    assert codes(risk.prediction[0].qualitativeRisk, CATEGORY_SYSTEM) == ["not-applicable"]
    assert risk.basis is None
    assert plan.activity is None and plan.addresses is None
    assert [s.reference for s in plan.supportingInfo] == [full_url("RiskAssessment", plan.identifier[0])]
    json.loads(plan.model_dump_json())  # valid, no empty arrays
    assert "[]" not in plan.model_dump_json() and "[]" not in risk.model_dump_json()


# -- the transaction Bundle ----------------------------------------------------------------


def test_transaction_bundle_round_trips(catalogue):
    pairs = [build_resources(a, catalogue, created=CREATED) for a in (high_risk(), indeterminate(), not_applicable())]
    bundle = transaction_bundle(pairs + pairs[:1])  # a pair given twice is written once
    text = bundle.model_dump_json()
    again = Bundle.model_validate(json.loads(text))
    assert again.type == "transaction"
    assert len(again.entry) == 6
    assert len({e.fullUrl for e in again.entry}) == 6
    for (risk, plan), (ra_entry, cp_entry) in zip(pairs, zip(again.entry[0::2], again.entry[1::2])):
        identifier = plan.identifier[0]
        search = f"identifier={IDENTIFIER_SYSTEM}|{identifier.value}"
        assert ra_entry.resource.get_resource_type() == "RiskAssessment"
        assert cp_entry.resource.get_resource_type() == "CarePlan"
        for entry in (ra_entry, cp_entry):
            assert entry.request.method == "POST"
            assert entry.request.ifNoneExist == search
            assert entry.fullUrl.startswith("urn:uuid:")
        assert ra_entry.request.url == "RiskAssessment" and cp_entry.request.url == "CarePlan"
        assert cp_entry.resource.supportingInfo[0].reference == ra_entry.fullUrl
        assert ra_entry.fullUrl != cp_entry.fullUrl
    # The same results built again (another day) give the same bundle entries: posting twice creates nothing.
    later = [build_resources(a, catalogue, created=CREATED + dt.timedelta(days=1)) for a in (high_risk(),)]
    redo = transaction_bundle(later)
    assert [(e.fullUrl, e.request.ifNoneExist) for e in redo.entry] == [
        (e.fullUrl, e.request.ifNoneExist) for e in again.entry[:2]
    ]


def test_transaction_bundle_needs_the_identifier(catalogue):
    risk, plan = build_resources(high_risk(), catalogue, created=CREATED)
    bare = plan.model_copy(update={"identifier": None})
    with pytest.raises(ValueError, match="identifier"):
        transaction_bundle([(risk, bare)])
