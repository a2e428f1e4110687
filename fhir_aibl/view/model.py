"""What the bone-health page shows, as plain values: built from the Assessment, the FactSet and the resources.

Two layers, kept apart here so that the templates cannot mix them:
- the clinician part (`PatientView` minus `reviewer`): plain words and the patient's own values
  with their dates; never a rule id, a resource reference, a catalogue code or a reference
  to the specification;
- the reviewer part (`Reviewer`): the ruleset, every finding with its rules and the FHIR
  references behind it, the internal citations and the data-quality notes. The page folds it away.

The DXA history is read from the facts (only results that survived data hygiene and unit
checks are there); a result's date is read from the resource the fact names, since facts
carry ages, not dates.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..assessment import Assessment, Finding
from ..careplan import Catalogue
from ..clinician_text import RISK_FACTOR_WORDS, SITE_WORDS, capitalised
from ..facts import FactSet, parse_date

#: Sites and risk factors in the clinician layer's words (one source for cards, CarePlans and this view).
SITE_TEXT = SITE_WORDS
MEASURE_TEXT = {"T": "T", "Z": "Z", "BMD": "BMD"}
CATEGORY_TEXT = {
    "high": "High risk",
    "moderate": "Moderate risk",
    "low": "Low risk",
    "indeterminate": "Risk not yet known",
    "not-applicable": "No risk category",
}
RISK_FACTOR_TEXT = {code: capitalised(words) for code, words in RISK_FACTOR_WORDS.items()}
AI_TEXT = {
    "active": "taking an aromatase inhibitor",
    "planned": "about to start an aromatase inhibitor",
    "stopped": "no longer taking an aromatase inhibitor",
    "none": "not taking an aromatase inhibitor",
}
#: Recommendations that start or change a bone drug: the safety gates apply to them.
MEDICATION_RECS = (
    "oral-bp", "potent-ar", "potent-ar-osteoporosis", "za-4mg-q6m", "switch-iv", "switch-iv-osteoporosis", "dmab-transition",
)
#: Flags the safety gates raise (their rule text says what is blocked and what remains).
GATE_FLAGS = ("crcl-below-35", "crcl-below-30", "za-dose-reduction", "denosumab-ckd-mbd", "egfr-fallback", "hypocalcaemia", "vitamin-d-repletion")
LAB_TEXT = {
    "creatinine": ("Creatinine", "mg/dL"),
    "egfr": ("eGFR", "mL/min/1.73 m²"),
    "calcium": ("Calcium", "mg/dL"),
    "calcium-ionized": ("Ionised calcium", "mg/dL"),
    "albumin": ("Albumin", "g/dL"),
    "vitamin-d-25oh": ("25-OH vitamin D", "ng/mL"),
    "vitamin-d3-25oh": ("25-OH vitamin D3", "ng/mL"),
    "body-weight": ("Weight", "kg"),
    "body-height": ("Height", "cm"),
    "estradiol": ("Oestradiol", "pg/mL"),
    "testosterone-total": ("Testosterone", "ng/dL"),
}
#: Words of the specification and of internal citations: such text belongs to the reviewer.
_INTERNAL = re.compile(r"CLINICAL\.md|PROPOSAL|\bArticle [AB]\b", re.IGNORECASE)
#: A parenthesis that only points into the specification: dropped from clinician text.
_SPEC_ASIDE = re.compile(r"\s*\([^()]*(?:CLINICAL\.md|PROPOSAL)[^()]*\)")
_DOI = re.compile(r"doi:\s*(10\.\d{4,9}/[^\s;,]+[^\s;,.])", re.IGNORECASE)


def day_text(day: dt.date | None) -> str:
    """10 Feb 2026; 'date unknown' for None."""
    return f"{day.day} {day:%b %Y}" if day else "date unknown"


def number_text(value: float) -> str:
    return f"{value:.1f}" if abs(value) < 10 else f"{value:.0f}"


def score_text(value: float) -> str:
    """A T- or Z-score with a real minus sign: -2.3 is shown as −2.3."""
    return f"{value:+.1f}".replace("-", "−")


def _plain_ref(ref: str) -> str:
    return ref.split("/_history/")[0]


def resource_date(res: Mapping[str, Any] | None) -> dt.date | None:
    """When a resource happened: its effective, performed, onset, authored or issued date."""
    if not res:
        return None
    for key in ("effectiveDateTime", "effectiveInstant", "performedDateTime", "onsetDateTime", "occurrenceDateTime", "dateAsserted", "authoredOn", "recordedDate", "issued"):
        found = parse_date(res.get(key))
        if found:
            return found
    for key in ("effectivePeriod", "performedPeriod", "onsetPeriod"):
        found = parse_date((res.get(key) or {}).get("start"))
        if found:
            return found
    return None


def medication_start(res: Mapping[str, Any] | None) -> dt.date | None:
    """When a medication was (or is to be) started: the effective period or dosage bounds, else the date written."""
    if not res:
        return None
    starts = [(res.get("effectivePeriod") or {}).get("start"), res.get("effectiveDateTime")]
    for dosage in res.get("dosageInstruction") or []:
        bounds = (((dosage or {}).get("timing") or {}).get("repeat") or {}).get("boundsPeriod") or {}
        starts.append(bounds.get("start"))
    starts.append(((res.get("dispenseRequest") or {}).get("validityPeriod") or {}).get("start"))
    starts.append(res.get("authoredOn"))
    for value in starts:
        found = parse_date(value)
        if found:
            return found
    return None


def _codeable_text(codeable: Any) -> str | None:
    if not isinstance(codeable, Mapping):
        return None
    if codeable.get("text"):
        return str(codeable["text"])
    for coding in codeable.get("coding") or []:
        if isinstance(coding, Mapping) and coding.get("display"):
            return str(coding["display"])
    return None


@dataclass(frozen=True)
class DxaPoint:
    measure: str  # T | Z | BMD
    site: str
    value: float
    date: dt.date | None
    selected: bool = False

    @property
    def site_text(self) -> str:
        return SITE_TEXT.get(self.site, self.site)

    @property
    def text(self) -> str:
        """DXA lumbar spine, 10 Feb 2026, T −2.3"""
        if self.measure == "BMD":
            return f"DXA {self.site_text}, {day_text(self.date)}, BMD {self.value:.3f} g/cm²"
        return f"DXA {self.site_text}, {day_text(self.date)}, {self.measure} {score_text(self.value)}"


@dataclass(frozen=True)
class Measured:
    """A value a safety gate read: 'CrCl 28 mL/min (Cockcroft-Gault), 3 Jan 2026'."""

    text: str


@dataclass(frozen=True)
class Gate:
    text: str
    measured: tuple[Measured, ...]


@dataclass(frozen=True)
class Recommendation:
    title: str
    status: str  # Recommended | Recommended, with restrictions | Hold until corrected
    gates: tuple[Gate, ...] = ()


@dataclass(frozen=True)
class Note:
    title: str
    text: str | None
    severity: str  # info | warning


@dataclass(frozen=True)
class Citation:
    text: str
    doi: str | None


@dataclass(frozen=True)
class ReviewerFinding:
    kind: str
    code: str
    rules: tuple[str, ...]
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class Reviewer:
    ruleset: str
    boundary_mode: str
    rules: tuple[str, ...]
    findings: tuple[ReviewerFinding, ...]
    citations: tuple[str, ...]
    problems: tuple[str, ...]
    evidence: tuple[str, ...]


@dataclass(frozen=True)
class PatientView:
    patient_id: str
    name: str | None
    sex: str | None
    age: int | None
    as_of: dt.date
    category: str
    category_text: str
    why: str
    ai_status: str
    ai_start: dt.date | None
    ai_name: str | None
    dxa: tuple[DxaPoint, ...]
    risk_factors: tuple[str, ...]
    recommendations: tuple[Recommendation, ...]
    notes: tuple[Note, ...]
    evidence: tuple[str, ...]
    citations: tuple[Citation, ...]
    reviewer: Reviewer
    extra: dict = field(default_factory=dict)

    @property
    def scores(self) -> tuple[DxaPoint, ...]:
        """The T- and Z-scores (what the chart draws), oldest first, undated last."""
        return tuple(p for p in self.dxa if p.measure in ("T", "Z"))

    @property
    def selected(self) -> DxaPoint | None:
        """The score the category was decided on, if any."""
        return next((p for p in self.dxa if p.selected), None)


def _index(resources: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    out = {}
    for res in resources:
        if isinstance(res, Mapping) and res.get("resourceType") and res.get("id"):
            out[f"{res['resourceType']}/{res['id']}"] = res
    return out


def _name(patient: Mapping[str, Any] | None) -> str | None:
    for name in (patient or {}).get("name") or []:
        if not isinstance(name, Mapping):
            continue
        if name.get("text"):
            return str(name["text"])
        parts = [*(name.get("given") or []), name.get("family") or ""]
        text = " ".join(str(p) for p in parts if p).strip()
        if text:
            return text
    return None


def _dxa_points(facts: FactSet, by_ref: Mapping[str, Mapping[str, Any]], assessment: Assessment) -> list[DxaPoint]:
    selected = {(s.score, s.site, s.value) for s in assessment.selected_t}
    points = []
    for fact in facts.of_type("dxa"):
        refs = [_plain_ref(r) for r in fact.get("refs", [])]
        when = next((resource_date(by_ref.get(r)) for r in refs if resource_date(by_ref.get(r))), None)
        # a result whose resource gives no date stays undated: its age is never turned into a guessed date
        points.append(
            DxaPoint(
                measure=str(fact["measure"]),
                site=str(fact["site"]),
                value=float(fact["value"]),
                date=when,
                selected=(fact["measure"], fact["site"], float(fact["value"])) in selected,
            )
        )
    points.sort(key=lambda p: (p.date is None, p.date or dt.date.min, p.measure, p.site))
    return points


FRACTURE_SITE_TEXT = {"hip": "hip", "vertebral": "spine (vertebral)", "wrist": "wrist", "humerus": "upper arm (humerus)"}


def _also_deciding(assessment: Assessment, facts: FactSet) -> list[str]:
    """What else the category rests on, in words: the fractures, the rate of bone loss, ovarian suppression among its evidence."""
    finding = assessment.finding("category", assessment.category)
    if finding is None:
        return []
    evidence = {_plain_ref(r) for r in finding.evidence}
    out = []
    for fact in facts.facts:
        if not {_plain_ref(r) for r in fact.get("refs", [])} & evidence:
            continue
        if fact["t"] == "fracture":
            where = FRACTURE_SITE_TEXT.get(fact.get("site"))
            age = f" at age {fact['age_at']}" if isinstance(fact.get("age_at"), int) else ""
            out.append(f"a fracture{' of the ' + where if where else ''}{age}")
        elif fact["t"] == "bmd_change" and isinstance(fact.get("pct_per_year"), (int, float)) and fact["pct_per_year"] < 0:
            site = SITE_TEXT.get(fact.get("site"), "spine or hip")
            out.append(f"bone density at the {site} falling {abs(fact['pct_per_year']):.1f}% a year")
        elif fact["t"] == "hormone_med" and fact.get("class") == "gnrh-agonist":
            out.append("ovarian suppression (a GnRH agonist) with the aromatase inhibitor")
    return list(dict.fromkeys(out))


def _why(assessment: Assessment, points: list[DxaPoint], risk_factors: list[str], facts: FactSet) -> str:
    a = assessment
    if a.category == "not-applicable":
        taking = AI_TEXT.get(a.ai_status, "not taking an aromatase inhibitor")
        if a.recommendations:
            return f"The patient is {taking}, so no risk category applies; the recommendations below still do."
        return f"The patient is {taking}, so no risk category applies and nothing is recommended for bone loss from it."
    chosen = next((p for p in points if p.selected), None)
    if chosen is not None:
        score = f"The lowest valid {chosen.measure}-score is {score_text(chosen.value)} at the {chosen.site_text} ({day_text(chosen.date)})"
    else:
        score = "There is no valid T-score from the last 24 months"
    if risk_factors:
        rf = f"{len(risk_factors)} risk factor{'s' if len(risk_factors) > 1 else ''} ({', '.join(r.lower() for r in risk_factors)})"
    else:
        rf = "no risk factor on record"
    also = _also_deciding(a, facts)
    return f"{score}, with {rf}." + (f" The category also rests on {'; '.join(also)}." if also else "")


def _measured(finding: Finding, facts: FactSet, by_ref: Mapping[str, Mapping[str, Any]]) -> list[Measured]:
    """The values behind a gate: the facts of the renal function and laboratory results among the gate's evidence."""
    evidence = {_plain_ref(r) for r in finding.evidence}
    out: list[Measured] = []
    for fact in facts.facts:
        refs = [_plain_ref(r) for r in fact.get("refs", [])]
        if not refs or not set(refs) & evidence:
            continue
        dates = [d for d in (resource_date(by_ref.get(r)) for r in refs if r.startswith("Observation/")) if d]
        when = day_text(max(dates)) if dates else "date unknown"
        if fact["t"] == "renal":
            out.append(Measured(f"Creatinine clearance {number_text(fact['crcl'])} mL/min (Cockcroft-Gault, from creatinine and weight of {when})"))
        elif fact["t"] == "lab" and fact.get("concept") in LAB_TEXT and fact["concept"] not in ("body-weight", "body-height"):
            label, unit = LAB_TEXT[fact["concept"]]
            out.append(Measured(f"{label} {number_text(float(fact['value']))} {unit}, {when}"))
        elif fact["t"] == "calcium_status":
            corrected = " (albumin-corrected)" if fact.get("corrected") else ""
            out.append(Measured(f"Calcium{corrected} {number_text(float(fact['value']))} mg/dL, {when}"))
    # the calcium status repeats the calcium result when it is not corrected
    seen, unique = set(), []
    for m in out:
        key = m.text.replace("Calcium (albumin-corrected)", "Calcium")
        if key not in seen:
            seen.add(key)
            unique.append(m)
    return unique


def _clinician(text: str | None) -> str | None:
    """Text for the clinician part, or None when it names the specification (it then stays with the reviewer)."""
    if not text:
        return None
    text = _SPEC_ASIDE.sub("", text)
    if _INTERNAL.search(text):
        return None
    return " ".join(text.split())


def _recommendations(assessment: Assessment, catalogue: Catalogue, facts: FactSet, by_ref) -> list[Recommendation]:
    gate_findings = [f for f in assessment.findings if (f.kind == "flag" and f.code in GATE_FLAGS) or f.kind == "blocked"]
    gates: list[Gate] = []
    seen: set[str] = set()
    for finding in gate_findings:
        text = _clinician(finding.detail) or "A safety check restricts the choice of drug."
        if text in seen:
            continue
        seen.add(text)
        gates.append(Gate(text=text, measured=tuple(_measured(finding, facts, by_ref))))
    hold = any(f.kind == "blocked" and f.code == "all-antiresorptives" for f in assessment.findings)
    out = []
    for code in assessment.recommendations:
        entry = catalogue.recommendations.get(code)
        title = entry.title if entry else code.replace("-", " ").capitalize()
        if code in MEDICATION_RECS and gates:
            status = "Hold until corrected" if hold else "Recommended, with restrictions"
            out.append(Recommendation(title=title, status=status, gates=tuple(gates)))
        else:
            out.append(Recommendation(title=title, status="Recommended"))
    return out


def _notes(assessment: Assessment, catalogue: Catalogue) -> list[Note]:
    out = []
    for finding in assessment.findings_of("flag"):
        if finding.code in GATE_FLAGS:
            continue  # shown with the recommendation it restricts
        entry = catalogue.flags.get(finding.code)
        title = entry.title if entry else finding.code.replace("-", " ").capitalize()
        out.append(Note(title=title, text=_clinician(finding.detail), severity=entry.severity if entry else "info"))
    return out


def _citations(assessment: Assessment, catalogue: Catalogue) -> tuple[list[Citation], list[str]]:
    keys: list[str] = []
    for code in assessment.recommendations:
        entry = catalogue.recommendations.get(code)
        keys += list(entry.citation) if entry else []
    for code in assessment.flags:
        entry = catalogue.flags.get(code)
        keys += list(entry.citation) if entry else []
    public, internal = [], []
    for key in dict.fromkeys(keys):
        text = catalogue.citations.get(key)
        if not text:
            continue
        public_text = _clinician(text)
        if public_text is None or public_text != " ".join(text.split()):
            internal.append(f"{key}: {text}")
        if public_text is not None:
            doi = _DOI.search(public_text)
            public.append(Citation(text=public_text, doi=doi.group(1) if doi else None))
    return public, internal


def _evidence(assessment: Assessment, facts: FactSet, by_ref) -> list[str]:
    """Every resource the rules used, in words."""
    dxa_by_ref: dict[str, list[str]] = {}
    for fact in facts.of_type("dxa"):
        for ref in fact.get("refs", []):
            res = by_ref.get(_plain_ref(ref))
            dxa_by_ref.setdefault(_plain_ref(ref), []).append(
                DxaPoint(str(fact["measure"]), str(fact["site"]), float(fact["value"]), resource_date(res)).text
            )
    lab_by_ref: dict[str, str] = {}
    for fact in facts.of_type("lab"):
        if fact.get("concept") in LAB_TEXT and fact.get("refs"):
            ref = _plain_ref(fact["refs"][0])
            label, unit = LAB_TEXT[fact["concept"]]
            lab_by_ref[ref] = f"{label} {number_text(float(fact['value']))} {unit}, {day_text(resource_date(by_ref.get(ref)))}"
    out: list[str] = []
    for ref in dict.fromkeys(_plain_ref(r) for r in assessment.evidence):
        res = by_ref.get(ref) or {}
        rtype = ref.split("/")[0]
        if ref in dxa_by_ref:
            out += dxa_by_ref[ref]
        elif ref in lab_by_ref:
            out.append(lab_by_ref[ref])
        elif rtype == "Patient":
            born = parse_date(res.get("birthDate"))
            out.append(f"Patient record: {res.get('gender') or 'sex not recorded'}, born {day_text(born) if born else 'date not recorded'}")
        elif rtype.startswith("Medication"):
            name = _codeable_text(res.get("medicationCodeableConcept")) or "a medication"
            start = medication_start(res)
            status = str(res.get("status") or "status not recorded").replace("-", " ")
            out.append(f"Medication: {name}, {status}, from {day_text(start)}")
        elif rtype == "Condition":
            name = _codeable_text(res.get("code")) or "a condition"
            out.append(f"Problem list: {name}, {day_text(resource_date(res))}")
        else:
            name = _codeable_text(res.get("code")) or "a record"
            value = res.get("valueQuantity") or {}
            shown = f" {number_text(float(value['value']))} {value.get('unit') or ''}".rstrip() if isinstance(value.get("value"), (int, float)) else ""
            concept = _codeable_text(res.get("valueCodeableConcept"))
            shown += f": {concept}" if concept else ""
            kind = {"Observation": "Observation", "Procedure": "Procedure", "DiagnosticReport": "Report", "ServiceRequest": "Order"}.get(rtype, "Record")
            out.append(f"{kind}: {name}{shown}, {day_text(resource_date(res))}")
    return list(dict.fromkeys(out))


def build_view(
    assessment: Assessment, facts: FactSet, resources: Iterable[Mapping[str, Any]], catalogue: Catalogue
) -> PatientView:
    """The page of one patient. `resources` are that patient's resources as assessed (for names and dates)."""
    by_ref = _index(resources)
    patient = by_ref.get(_plain_ref(assessment.patient))
    patient_fact = next(iter(facts.of_type("patient")), {})
    points = _dxa_points(facts, by_ref, assessment)
    risk_factors = [RISK_FACTOR_TEXT.get(code, code.replace("-", " ").capitalize()) for code in assessment.risk_factors]
    ai_meds = [(medication_start(by_ref.get(_plain_ref(r))), by_ref.get(_plain_ref(r))) for f in facts.of_type("ai_med") for r in f.get("refs", [])]
    starts = sorted((d, res) for d, res in ai_meds if d) if ai_meds else []
    ai_start, ai_res = (starts[0][0], starts[0][1]) if starts else (None, ai_meds[0][1] if ai_meds else None)
    ai_name = _codeable_text((ai_res or {}).get("medicationCodeableConcept")) if ai_res else None
    if ai_name is None and facts.of_type("ai_med"):
        ai_name = str(facts.of_type("ai_med")[0].get("ingredient") or "aromatase inhibitor")
    public, internal = _citations(assessment, catalogue)
    reviewer = Reviewer(
        ruleset=assessment.ruleset.name,
        boundary_mode=assessment.ruleset.boundary_mode,
        rules=assessment.rules,
        findings=tuple(ReviewerFinding(f.kind, f.code, f.rules, f.evidence) for f in assessment.findings),
        citations=tuple(internal),
        problems=tuple(facts.problems),
        evidence=assessment.evidence,
    )
    return PatientView(
        patient_id=assessment.patient.split("/", 1)[-1],
        name=_name(patient),
        sex=patient_fact.get("sex"),
        age=patient_fact.get("age"),
        as_of=assessment.as_of,
        category=assessment.category,
        category_text=CATEGORY_TEXT[assessment.category],
        why=_why(assessment, points, risk_factors, facts),
        ai_status=AI_TEXT.get(assessment.ai_status, assessment.ai_status),
        ai_start=ai_start,
        ai_name=ai_name,
        dxa=tuple(points),
        risk_factors=tuple(risk_factors),
        recommendations=tuple(_recommendations(assessment, catalogue, facts, by_ref)),
        notes=tuple(_notes(assessment, catalogue)),
        evidence=tuple(_evidence(assessment, facts, by_ref)),
        citations=tuple(public),
        reviewer=reviewer,
    )
