"""The clinician layer of text: what a busy oncologist or GP reads, from the catalogue's `clinician` fields.

Two layers of text live side by side in `rules/recommendations.yaml`: `text` (with the
guideline discussion, the specification's rule and gap references and the PROPOSAL marks) is
reviewer material; `clinician: {action, why}` is what a clinician reads, on a CDS card and in
the CarePlan and RiskAssessment. This module renders the second layer for one patient:

- the action line and the one-sentence why of a recommendation or flag, with the patient's own
  values and their dates filled in (`{score}` -> "T-score -2.3 at the lumbar spine on
  10 Feb 2026", `{crcl}` -> "creatinine clearance 28 mL/min on 3 Jan 2026", ...). The values
  come from the facts and the assessment's selected score; the dates from the resources the
  facts cite (without the resources, the values are given without a date);
- risk factors in words ("age over 65", "current smoker"), never codes;
- citations as author, journal, year and link (`references:` in the catalogue); citation keys
  without a clinician reference (the source articles, the specification) are never shown;
- the data-quality notes that change what the clinician should do (a result without a date,
  a DXA that could not be read); every other note is for the log (`split_notes`).

Nothing here names a rule id, a resource reference, a catalogue code or the specification:
tests/cds/test_cards.py scans everything this layer produces over every worked example and a
synthetic population.
"""

from __future__ import annotations

import datetime as dt
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .assessment import Assessment
from .facts import FactSet, parse_date

#: The placeholders a `why` may use, and what each says when the value is not on record.
PLACEHOLDERS: dict[str, str] = {
    "score": "no valid T-score from the last two years",
    "last_dxa": "no DXA on record",
    "risk_factors": "no additional risk factor",
    "crcl": "creatinine clearance not on record",
    "egfr": "eGFR not on record",
    "renal": "kidney function not on record",
    "calcium": "calcium not on record",
    "vitamin_d": "25-OH vitamin D not on record",
    "bmd_change": "bone density falling at the same site",
    "denosumab": "date of the last injection not on record",
    "dxa_done": "a DXA is on record without its result",
    "dxa_ordered": "a DXA was ordered and no result is on record",
    "dxa_declined": "a DXA was declined or not done",
    "frax": "a FRAX result is on record",
}

#: Without the facts (an assessment alone), a value cannot be said to be missing: it is named, not denied.
WITHOUT_FACTS: dict[str, str] = {
    "last_dxa": "the DXA on record",
    "crcl": "creatinine clearance as recorded",
    "egfr": "eGFR as recorded",
    "renal": "kidney function as recorded",
    "calcium": "calcium as recorded",
    "vitamin_d": "25-OH vitamin D as recorded",
    "denosumab": "the last denosumab injection as recorded",
}

CATEGORY_WORDS = {
    "high": "High risk of bone loss",
    "moderate": "Moderate risk of bone loss",
    "low": "Low risk of bone loss",
    "indeterminate": "Bone-loss risk not yet graded",
    "not-applicable": "Not on an aromatase inhibitor",
}
SITE_WORDS = {
    "LS": "lumbar spine", "TH": "total hip", "FN": "femoral neck", "FEMUR": "femur",
    "FA": "forearm", "forearm": "forearm", "CALC": "heel",
}
RISK_FACTOR_WORDS = {
    "age-over-65": "age over 65",
    "low-bmi": "body-mass index below 20",
    "parental-hip-fracture": "parental hip fracture",
    "glucocorticoids": "oral glucocorticoids for more than 6 months",
    "smoking": "smoker",
    "alcohol": "alcohol 3 or more units a day",
    "rheumatoid-arthritis": "rheumatoid arthritis",
    "hypogonadism-or-premature-menopause": "hypogonadism or premature menopause",
}
AI_WORDS = {"active": "on {drug}", "planned": "{drug} planned", "stopped": "{drug} stopped", "none": "no aromatase inhibitor on record"}

_FORMATTER = string.Formatter()
_HISTORY = re.compile(r"/_history/[^/]+$")


def day(value: dt.date) -> str:
    """10 Feb 2026: unambiguous in every locale."""
    return f"{value.day} {value:%b %Y}"


def number(value: float, places: int = 1) -> str:
    text = f"{value:.{places}f}"
    return text[:-2] if places == 1 and text.endswith(".0") and abs(value) >= 10 else text


def placeholders_of(template: str) -> set[str]:
    return {name for _lit, name, _spec, _conv in _FORMATTER.parse(template) if name}


def joined(items: Iterable[str], last: str = "and") -> str:
    items = [i for i in items if i]
    if len(items) <= 1:
        return "".join(items)
    return f"{', '.join(items[:-1])} {last} {items[-1]}"


def _effective(resource: Mapping[str, Any]) -> dt.date | None:
    period = resource.get("effectivePeriod") if isinstance(resource.get("effectivePeriod"), Mapping) else {}
    onset = resource.get("onsetPeriod") if isinstance(resource.get("onsetPeriod"), Mapping) else {}
    for value in (
        resource.get("effectiveDateTime"), resource.get("effectiveInstant"), period.get("end"), period.get("start"),
        resource.get("issued"), resource.get("onsetDateTime"), onset.get("start"), resource.get("recordedDate"),
        resource.get("authoredOn"), resource.get("occurrenceDateTime"),
    ):
        found = parse_date(value)
        if found is not None:
            return found
    return None


def _label(resource: Mapping[str, Any]) -> str | None:
    code = resource.get("code") if isinstance(resource.get("code"), Mapping) else {}
    text = code.get("text")
    if not isinstance(text, str) or not text.strip():
        text = next(
            (c.get("display") for c in code.get("coding") or [] if isinstance(c, Mapping) and isinstance(c.get("display"), str)),
            None,
        )
    return " ".join(text.split())[:60] if isinstance(text, str) and text.strip() else None


@dataclass(frozen=True)
class Citation:
    text: str
    url: str | None

    def markdown(self) -> str:
        return f"[{self.text}]({self.url})" if self.url else self.text


class PatientValues:
    """One patient's deciding values, as phrases with their dates."""

    def __init__(
        self,
        assessment: Assessment,
        facts: FactSet | None = None,
        resources: Iterable[Mapping[str, Any]] | None = None,
    ):
        self.assessment = assessment
        self.facts = facts
        # Resources by reference; their dates and labels are read only for what the text cites.
        self._by_ref: dict[str, Mapping[str, Any]] = {
            f"{res.get('resourceType')}/{res['id']}": res
            for res in resources or ()
            if isinstance(res, Mapping) and isinstance(res.get("id"), str)
        }
        self._dates: dict[str, dt.date | None] = {}
        self._phrases: dict[str, str] | None = None

    # -- lookups -------------------------------------------------------------------------
    def _date(self, ref: str) -> dt.date | None:
        ref = _HISTORY.sub("", ref)
        if ref not in self._dates:
            res = self._by_ref.get(ref)
            self._dates[ref] = _effective(res) if res is not None else None
        return self._dates[ref]

    def date_of(self, refs: Iterable[str]) -> dt.date | None:
        found = [d for d in (self._date(r) for r in refs if not r.startswith("Patient/")) if d is not None]
        return max(found) if found else None

    def label_of(self, ref: str) -> str | None:
        res = self._by_ref.get(_HISTORY.sub("", ref))
        return _label(res) if res is not None else None

    def _of_type(self, fact_type: str) -> list[dict]:
        return self.facts.of_type(fact_type) if self.facts is not None else []

    def _on(self, refs: Iterable[str]) -> str:
        when = self.date_of(refs)
        return f" on {day(when)}" if when else ""

    def drug(self) -> str:
        names = sorted({str(f.get("ingredient")) for f in self._of_type("ai_med") if f.get("ingredient")})
        return joined(names, "or") or "an aromatase inhibitor"

    # -- phrases -----------------------------------------------------------------------------
    def score(self) -> str | None:
        if not self.assessment.selected_t:
            return None
        t = self.assessment.selected_t[0]
        return f"{t.score}-score {number(t.value)} at the {SITE_WORDS.get(t.site, t.site)}{self._on(t.evidence)}"

    def last_dxa(self) -> str | None:
        scores = [f for f in self._of_type("dxa") if f.get("measure") in ("T", "Z")]
        if not scores:
            return None
        dated = [f for f in scores if f.get("age_months") is not None]
        if dated:
            latest = min(f["age_months"] for f in dated)
            pick = min((f for f in dated if f["age_months"] == latest), key=lambda f: f["value"])
        else:
            pick = min(scores, key=lambda f: f["value"])
        site = SITE_WORDS.get(pick.get("site"), str(pick.get("site")))
        when = self._on(pick["refs"]) if pick.get("age_months") is not None else ", undated"
        return f"last DXA: {pick['measure']}-score {number(pick['value'])} at the {site}{when}"

    def risk_factors(self) -> str | None:
        words = []
        for rf in self.assessment.risk_factors:
            if rf == "smoking":
                status = {f.get("status") for f in self._of_type("smoking")}
                words.append("current smoker" if "current" in status else "former smoker" if "former" in status else "smoker")
            else:
                words.append(RISK_FACTOR_WORDS.get(rf, rf.replace("-", " ")))
        return joined(words) or None

    def fracture(self) -> str | None:
        """'fragility fracture of the hip on 3 Mar 2024', the latest one counted."""
        found = [f for f in self._of_type("fracture") if f.get("fragility") or f.get("possible_fragility_code")]
        if not found:
            return None
        dated = sorted(found, key=lambda f: self.date_of(f["refs"]) or dt.date.min)
        f = dated[-1]
        site = {"hip": "hip", "vertebral": "spine", "wrist": "wrist"}.get(f.get("site"), "")
        return f"fragility fracture{' of the ' + site if site else ''}{self._on(f['refs'])}"

    def _lab(self, concepts: tuple[str, ...]) -> dict | None:
        found = [f for f in self._of_type("lab") if f.get("concept") in concepts]
        return min(found, key=lambda f: f.get("age_months") or 0) if found else None

    def crcl(self) -> str | None:
        renal = self._of_type("renal")
        if not renal:
            return None
        f = renal[0]
        return f"creatinine clearance {number(f['crcl'], 0)} mL/min{self._on(f['refs'])}"

    def egfr(self) -> str | None:
        f = self._lab(("egfr",))
        return f"eGFR {number(f['value'], 0)} mL/min/1.73 m²{self._on(f['refs'])}" if f else None

    def renal(self) -> str | None:
        return self.crcl() or self.egfr()

    def calcium(self) -> str | None:
        status = self._of_type("calcium_status")
        if not status:
            return None
        f = status[0]
        kind = "albumin-corrected calcium" if f.get("corrected") else "calcium"
        return f"{kind} {number(f['value'])} mg/dL{self._on(f['refs'])}"

    def vitamin_d(self) -> str | None:
        f = self._lab(("vitamin-d-25oh", "vitamin-d3-25oh"))
        if f is None:
            return None
        name = "25-OH vitamin D3" if f["concept"] == "vitamin-d3-25oh" else "25-OH vitamin D"
        return f"{name} {number(f['value'], 0)} ng/mL{self._on(f['refs'])}"

    def bmd_change(self) -> str | None:
        changes = self._of_type("bmd_change")
        if not changes:
            return None
        f = min(changes, key=lambda c: c["pct_per_year"])
        site = SITE_WORDS.get(f["site"], f["site"])
        verb = "fell" if f["pct_per_year"] < 0 else "rose"
        return f"{site} bone density {verb} {number(abs(f['pct_per_year']))}% a year up to the scan{self._on(f['refs'])}"

    def denosumab(self) -> str | None:
        doses = [f for f in self._of_type("antiresorptive") if f.get("class") == "denosumab"]
        dated = [(self.date_of(f["refs"]), f) for f in doses]
        dated = [(d, f) for d, f in dated if d is not None]
        if not dated:
            return None
        return f"last denosumab injection on {day(max(d for d, _ in dated))}"

    def _dxa_record(self, state: str, words: str) -> str | None:
        records = [f for f in self._of_type("dxa_record") if f.get("state") == state]
        dates = [d for d in (parse_date(f.get("date")) for f in records) if d is not None]
        if not records:
            return None
        return f"{words} on {day(max(dates))}" if dates else f"{words}, date not recorded"

    def dxa_done(self) -> str | None:
        return self._dxa_record("done", "a DXA was done")

    def dxa_ordered(self) -> str | None:
        return self._dxa_record("ordered", "a DXA was ordered")

    def dxa_declined(self) -> str | None:
        return self._dxa_record("declined", "a DXA was declined or not done")

    def frax(self) -> str | None:
        parts = []
        for f in self._of_type("risk_score"):
            what = {"frax-mof": "major osteoporotic fracture", "frax-hip": "hip fracture"}.get(f.get("tool"))
            if what is None or f.get("value") is None:
                continue
            when = parse_date(f.get("date"))
            parts.append(f"10-year {what} risk {number(float(f['value']))}%" + (f" on {day(when)}" if when else ""))
        return "FRAX " + "; ".join(parts) if parts else None

    def phrases(self) -> dict[str, str]:
        if self._phrases is None:
            fallbacks = PLACEHOLDERS if self.facts is not None else {**PLACEHOLDERS, **WITHOUT_FACTS}
            self._phrases = {name: (getattr(self, name)() or fallback) for name, fallback in fallbacks.items()}
        return self._phrases

    def headline(self) -> str:
        """'High risk, on anastrozole: T-score -2.3 at the lumbar spine on 10 Feb 2026; age over 65 and current smoker.'"""
        a = self.assessment
        status = AI_WORDS[a.ai_status].format(drug=self.drug())
        score = self.score()
        if score is None and a.category == "indeterminate":
            last = self.last_dxa()
            # a DXA on record without its result (a report, a procedure, an order) says so
            record = self.dxa_done() or self.dxa_ordered()
            if last:
                score = f"no valid DXA from the last two years; {last}"
            else:
                score = f"{record}, result not on record" if record else PLACEHOLDERS["last_dxa"]
        values = [v for v in (score, self.fracture() if a.category == "high" else None, self.risk_factors()) if v]
        return f"**{CATEGORY_WORDS[a.category]}**, {status}" + (": " + "; ".join(values) if values else "") + "."


class ClinicianText:
    """The clinician text of a catalogue for one patient."""

    def __init__(self, catalogue: Any, values: PatientValues):
        self.catalogue = catalogue
        self.values = values

    def _entry(self, code: str) -> Any:
        return self.catalogue.recommendations.get(code) or self.catalogue.flags.get(code)

    def action(self, code: str) -> str:
        entry = self._entry(code)
        if entry is None:
            return ""
        return entry.clinician.action if entry.clinician else entry.title

    def why(self, code: str) -> str:
        entry = self._entry(code)
        if entry is None or entry.clinician is None or not entry.clinician.why:
            return ""
        return fill(entry.clinician.why, self.values.phrases())

    def sentence(self, code: str) -> str:
        """The action and the why, one paragraph."""
        return f"{self.action(code)} {capitalised(self.why(code))}".strip()

    def citations(self, codes: Iterable[str]) -> list[Citation]:
        out: dict[str, Citation] = {}
        for code in codes:
            entry = self._entry(code)
            for key in entry.citation if entry else ():
                ref = self.catalogue.references.get(key)
                if ref is not None and ref.text not in out:
                    out[ref.text] = Citation(ref.text, ref.url)
        return list(out.values())

    def blocked_sentence(self, blocked: Iterable[Any]) -> str:
        """What the safety gates mean for a drug activity, in words, with the values measured.

        The gates' own rule texts are reviewer material (they cite the specification); the
        flags the same gates raise carry the clinician's sentence, in the plan's notes.
        """
        held = any(getattr(f, "code", None) == "all-antiresorptives" for f in blocked)
        text = (
            "every antiresorptive is on hold until the problem in the notes is corrected."
            if held
            else "some bone drugs are ruled out for this patient: see the notes."
        )
        values = [v for v in (self.values.renal(), self.values.calcium(), self.values.vitamin_d()) if v]
        return text + (f" Latest values: {'; '.join(values)}." if values else "")

    def cited(self, code: str) -> str:
        """The sentence with its citations: what a CarePlan activity carries."""
        cites = self.citations([code])
        tail = " Sources: " + "; ".join(f"{c.text} ({c.url})" if c.url else c.text for c in cites) + "." if cites else ""
        return self.sentence(code) + tail


def capitalised(text: str) -> str:
    """The text with a capital first letter, unless its first word is an abbreviation (eGFR)."""
    first = text.split(" ", 1)[0]
    return text[0].upper() + text[1:] if text and first.islower() else text


def fill(template: str, phrases: Mapping[str, str]) -> str:
    """The template with its placeholders filled; an unknown placeholder is left out (the catalogue
    test names it), never shown as braces."""
    out = []
    for literal, name, _spec, _conv in _FORMATTER.parse(template):
        out.append(literal)
        if name:
            out.append(phrases.get(name, ""))
    return "".join(out)


# -- data-quality notes -----------------------------------------------------------------------

_DXA_UNUSABLE = ("DXA result whose code and bodySite name no site", "-score with unit", "implausible T-score",
                 "implausible Z-score", "BMD unit", "implausible BMD")


def split_notes(problems: Iterable[str], values: PatientValues | None = None) -> tuple[list[str], list[str]]:
    """(notes for the clinician, notes for the log) of the facts' data-quality problems.

    A note reaches the clinician only when it changes what to do: a result without a date (it
    was not used, so the decision rests on less than the record holds), a DXA that could not be
    read, a missing date of birth. Everything else (a unit not convertible, an answer not
    recognised) is for the operator.
    """
    clinician: list[str] = []
    log: list[str] = []
    for problem in problems:
        ref, _, message = problem.partition(": ")
        if "DXA result without an effective date" in message:
            note = "A DXA result on record has no date, so it could not count as a current scan: check the report's date."
        elif message.startswith("no effective date"):
            label = values.label_of(ref) if values else None
            what = f"A result on record ({label})" if label else "A result on record"
            note = f"{what} has no date and was not used."
        elif message.startswith("no birthDate"):
            note = "The record has no date of birth, so age could not count as a risk factor."
        elif any(marker in message for marker in _DXA_UNUSABLE):
            note = "A DXA result on record could not be used (its site, unit or value is not readable): check the report."
        else:
            log.append(problem)
            continue
        if note not in clinician:
            clinician.append(note)
    return clinician, log
