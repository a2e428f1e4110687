"""FHIR R4 resources of one patient -> flat facts for the rules. Pure: no I/O, no clinical decisions.

This module reads and normalises; the rules decide. It
- recognises codes through the value sets (`terminology.py`), never through display text
  (the one exception, documented in the value sets, is free text of `bodySite` and of a
  fracture's mechanism, which carry no code in real data);
- applies data hygiene D1: resources whose status the `statuses` value set excludes never
  become evidence; they become `excluded` facts, so the audit trail shows them;
- normalises units to the canonical UCUM unit of each concept (`units` value set),
  e.g. the FHIR R4 example's `g/cm-2`, or 25-OH vitamin D in nmol/L;
- measures time against `as_of`: ages in whole years, data age in calendar months,
  data recorded after `as_of` is not yet known and is left out;
- selects the latest measurement where the rules want one value (BMI, smoking status,
  each laboratory concept, each risk tool), and keeps every DXA result (rule B1 selects among them);
- records a DXA that exists without a usable result (a DiagnosticReport, a Procedure, an
  Observation without a value, a ServiceRequest ordered, not to be done or refused) as a
  `dxa_record`: never a valid DXA, it changes the advice (rules DXA-*);
- pairs BMD results at the same site on the same device for rule L1.

Every fact carries `refs`: the FHIR references (with `_history/<version>` where the
resource has a `meta.versionId`) of the resources it came from. Fact types and fields
are declared, for reviewers, under `facts:` in `rules/aibl.yaml`.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .terminology import Terminology

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?")
SCORE_UNITS = {"{score}", "", "1"}


@dataclass
class FactSet:
    patient: str
    as_of: dt.date
    facts: list[dict] = field(default_factory=list)
    #: data-quality findings that are not errors: a value without a usable unit, an implausible value ...
    problems: list[str] = field(default_factory=list)
    #: the dates of the usable DXA results on record (scan dates on or before as_of, distinct, ascending):
    #: the contract's `dxa_dates`, from which a population's DXA coverage over time is drawn
    dxa_dates: tuple[dt.date, ...] = ()

    def of_type(self, fact_type: str) -> list[dict]:
        return [f for f in self.facts if f["t"] == fact_type]


def parse_date(value: Any) -> dt.date | None:
    """The date of a FHIR date, dateTime or instant; a partial date is taken at its earliest day."""
    if not isinstance(value, str):
        return None
    return _parse_date(value)


# The vital signs of one encounter share a timestamp, and every dated fact is measured
# against the same as_of: both functions are pure, so recent answers are kept.
@functools.lru_cache(maxsize=4096)
def _parse_date(value: str) -> dt.date | None:
    m = _DATE.match(value.strip())
    if not m:
        return None
    year, month, day = int(m.group(1)), int(m.group(2) or 1), int(m.group(3) or 1)
    try:
        return dt.date(year, month, day)
    except ValueError:
        return None


def _add_months(day: dt.date, months: int) -> dt.date:
    """`day` moved by whole calendar months, clamped to the end of a shorter month (Jan 31 + 1 = Feb 28/29)."""
    year, month = divmod(day.month - 1 + months, 12)
    year += day.year
    return dt.date(year, month + 1, min(day.day, calendar.monthrange(year, month + 1)[1]))


def _whole_months(later: dt.date, earlier: dt.date) -> tuple[int, int]:
    """(whole calendar months, leftover days) of `later - earlier`, both negative if `later` is earlier.

    The arithmetic of dateutil's `relativedelta(later, earlier)` (months first, counted from
    `earlier` with a month end clamped, the rest in days), done directly: it runs for every
    dated Observation, and relativedelta costs about 8 us a call (tests/test_facts.py checks
    that they agree).
    """
    months = (later.year - earlier.year) * 12 + later.month - earlier.month
    anchor = _add_months(earlier, months)
    if later < earlier:
        while later > anchor:
            months += 1
            anchor = _add_months(earlier, months)
    else:
        while later < anchor:
            months -= 1
            anchor = _add_months(earlier, months)
    return months, (later - anchor).days


@functools.lru_cache(maxsize=4096)
def months_between(earlier: dt.date, later: dt.date) -> float:
    """Calendar months from `earlier` to `later`: whole months plus a fraction for leftover days.

    Exactly 24 calendar months gives 24.0 and one day more gives more than 24, which is
    what the inclusive 24-month validity of rule B2 needs (V23: 2024-06-01 to 2026-06-01).
    """
    sign = 1
    if later < earlier:
        earlier, later, sign = later, earlier, -1
    whole, days = _whole_months(later, earlier)
    return sign * round(whole + days / 31.0, 3)


def age_in_years(birth: dt.date, on: dt.date) -> int:
    """Whole years from `birth` to `on` (negative when `on` is before `birth`, towards zero)."""
    months = _whole_months(on, birth)[0]
    return months // 12 if months >= 0 else -(-months // 12)


def reference_of(resource: Mapping[str, Any]) -> str:
    ref = f"{resource.get('resourceType')}/{resource.get('id')}"
    version = (resource.get("meta") or {}).get("versionId")
    return f"{ref}/_history/{version}" if version else ref


class _Extractor:
    def __init__(self, terminology: Terminology, as_of: dt.date):
        self.term = terminology
        self.as_of = as_of
        self.statuses = terminology.valueset("statuses").data
        units = terminology.valueset("units").data
        self.unit_aliases: dict[str, str] = {str(k): str(v) for k, v in (units.get("aliases") or {}).items()}
        self.conversions: dict[str, dict] = dict(units.get("conversions") or {})
        self.facts: list[dict] = []
        self.problems: list[str] = []
        self.dxa_dates: set[dt.date] = set()
        self.birth: dt.date | None = None
        self.sex = "unknown"
        #: (fact type, ...) -> (date, reference, fields) of the latest measurement
        self._latest: dict[tuple, tuple] = {}

    # -- helpers ---------------------------------------------------------------------------
    def add(self, fact_type: str, refs: Iterable[str], **fields: Any) -> None:
        self.facts.append({"t": fact_type, **fields, "refs": sorted(set(refs))})

    def exclude(self, resource: Mapping[str, Any], reason: str) -> None:
        self.add("excluded", [reference_of(resource)], resource=resource.get("resourceType"), reason=reason)

    def age_at(self, when: dt.date | None) -> int | None:
        if self.birth is None:
            return None
        return age_in_years(self.birth, when or self.as_of)

    def unit_of(self, quantity: Mapping[str, Any]) -> str:
        raw = quantity.get("code") or quantity.get("unit") or ""
        raw = str(raw).strip()
        return self.unit_aliases.get(raw, self.unit_aliases.get(raw.lower(), raw))

    def convert(self, concept: str, value: float, unit: str) -> float | None:
        """Value in the concept's canonical unit, or None when the unit is unknown for it."""
        spec = self.conversions.get(concept)
        if spec is None:
            return value
        canonical = spec.get("unit")
        if unit == canonical or (unit == "" and spec.get("unitless_ok")):
            return value
        factor = (spec.get("factors") or {}).get(unit)
        if factor is None:
            return None
        return value * float(factor)

    # -- resources -------------------------------------------------------------------------
    def patient(self, res: Mapping[str, Any]) -> None:
        self.birth = parse_date(res.get("birthDate"))
        gender = res.get("gender")
        self.sex = gender if gender in ("female", "male", "other") else "unknown"
        fields: dict[str, Any] = {"sex": self.sex}
        if self.birth is not None:
            fields["age"] = age_in_years(self.birth, self.as_of)
        else:
            self.problems.append(f"{reference_of(res)}: no birthDate; age-based rules cannot apply")
        self.add("patient", [reference_of(res)], **fields)

    def observation(self, res: Mapping[str, Any], dxa_rows: list[dict]) -> None:
        recognised, study = observation_reading(res, self.term)
        if not recognised and not study:
            return
        status = res.get("status")
        keep = self.statuses["observation"]["keep"]
        when = parse_date(
            res.get("effectiveDateTime")
            or res.get("effectiveInstant")
            or (res.get("effectivePeriod") or {}).get("end")
            or (res.get("effectivePeriod") or {}).get("start")
            or res.get("issued")
        )
        ref = reference_of(res)
        if status not in keep:
            self.exclude(res, f"status {status}")
            return
        if when is not None and when > self.as_of:
            return  # recorded after the reference date: not known as of then
        age_months = months_between(when, self.as_of) if when is not None else None
        dxa_seen, dxa_before = study, len(self.facts)
        for code, holder in recognised:
            dxa = self.term.first("dxa", code)
            if dxa is not None and not dxa.get("measure"):
                continue  # a DXA study or panel code: its results are in the components
            if dxa is not None:
                dxa_seen = True
                # An undated DXA is still read (the FHIR R4 example Observation-bmd has no
                # date), without `age_months`: it can never be valid for B1, only shown.
                if when is None:
                    self.problems.append(f"{ref}: DXA result without an effective date; cannot count as current")
                self._dxa(res, holder, dxa, when, age_months, ref, dxa_rows)
                continue
            if when is None:
                self.problems.append(f"{ref}: no effective date; not used")
                continue
            tool = self.term.first("risk-tools", code)
            if tool is not None:
                self._risk_score(tool, holder, when, age_months, ref)
                continue
            obs = self.term.first("observations", code)
            if obs is not None:
                self._measurement(obs.get("concept"), holder, when, age_months, ref)
                continue
            finding = self.term.first("conditions", code) or self.term.first("conditions", holder.get("valueCodeableConcept"))
            if finding is not None and finding.get("concept") == "family-hip-fracture":
                self.add("condition", [ref], concept="family-hip-fracture", active=True)
        if dxa_seen and not any(f["t"] == "dxa" for f in self.facts[dxa_before:]):
            # A DXA Observation with no usable value (none, a dataAbsentReason, only a study
            # code): the scan exists, its result is not readable here.
            self.dxa_record(res, "done", "observation", when)

    # -- a DXA without a usable result, and the risk tools -----------------------------------
    def dxa_record(self, res: Mapping[str, Any], state: str, source: str, when: dt.date | None) -> None:
        """A DXA done, ordered or declined whose result is not on record: never a valid DXA."""
        ref = reference_of(res)
        fields: dict[str, Any] = {"state": state, "source": source}
        if when is not None:
            fields["date"] = when.isoformat()
            fields["age_months"] = months_between(when, self.as_of)
        else:
            self.problems.append(f"{ref}: DXA {source} without a date; cannot be shown to be recent")
        self.add("dxa_record", [ref], **fields)

    def dxa_event(self, res: Mapping[str, Any]) -> None:
        """A DiagnosticReport, Procedure or ServiceRequest for a DXA (status mapping: statuses.yaml)."""
        if not dxa_record_code(res.get("code"), self.term):
            return
        rtype = res.get("resourceType")
        spec = self.statuses["dxa_record"][rtype]
        status = res.get("status")
        state = spec["status"].get(status, "exclude")
        if rtype == "ServiceRequest":
            if res.get("doNotPerform") is True and state != "exclude":
                state = "declined"
            elif res.get("intent") not in spec["order_intents"] and state == "ordered":
                self.exclude(res, f"intent {res.get('intent')}: not an order")
                return
        if state == "exclude":
            self.exclude(res, f"status {status}")
            return
        when = parse_date(_event_date(res))
        if when is not None and when > self.as_of:
            return  # recorded after the reference date: not known as of then
        self.dxa_record(res, state, _DXA_SOURCE[rtype], when)

    def _risk_score(self, tool, holder, when: dt.date, age_months: float, ref: str) -> None:
        if tool.get("panel") and not any(k in holder for k in ("valueQuantity", "valueInteger", "valueDecimal")):
            return  # a panel without its own value: its recognised components carry the result
        number = self._number(holder, ref)
        if number is None:
            return
        value, unit = number
        expected = str(tool.get("unit", ""))
        name = tool.get("tool")
        if expected == "%":
            if unit not in ("%", ""):
                self.problems.append(f"{ref}: {name} probability with unit {unit!r} (not %); not used")
                return
            if not 0.0 <= value <= 100.0:
                self.problems.append(f"{ref}: implausible {name} probability {value}%; not used")
                return
        elif unit not in SCORE_UNITS:
            self.problems.append(f"{ref}: {name} score with unit {unit!r}; not used")
            return
        key = ("risk_score", name)
        fields = {
            "tool": name, "label": str(tool.get("label", name)), "value": round(value, 1), "unit": expected,
            "date": when.isoformat(), "age_months": age_months,
        }
        self._latest[key] = max(self._latest.get(key, (dt.date.min, None, None)), (when, ref, fields), key=_when_key)

    def _number(self, holder: Mapping[str, Any], ref: str) -> tuple[float, str] | None:
        q = holder.get("valueQuantity")
        if isinstance(q, dict) and isinstance(q.get("value"), (int, float)) and not isinstance(q.get("value"), bool):
            return float(q["value"]), self.unit_of(q)
        for key in ("valueInteger", "valueDecimal"):
            if isinstance(holder.get(key), (int, float)) and not isinstance(holder.get(key), bool):
                return float(holder[key]), ""
        if holder.get("dataAbsentReason") is None:
            self.problems.append(f"{ref}: no numeric value; not used")
        return None

    def _dxa(self, res, holder, concept, when, age_months, ref, dxa_rows) -> None:
        measure = concept.get("measure")
        site = concept.get("site")
        body = res.get("bodySite")
        if site in (None, "FEMUR", "FA") and body:
            # 38263-0 "Femur" covers the femoral neck and the total hip; bodySite tells them
            # apart. 38265-5 is forearm as LOINC defines it unless bodySite says otherwise.
            hit = self.term.first("body-sites", body)
            props = hit.properties if hit else None
            if props is None:
                texts = [body.get("text")] + [c.get("display") for c in body.get("coding") or [] if isinstance(c, dict)]
                for text in texts:
                    props = self.term.match_text("body-sites", text)
                    if props:
                        break
            if props and props.get("site"):
                site = props["site"]
        if site is None:
            self.problems.append(f"{ref}: DXA result whose code and bodySite name no site; not used")
            return
        number = self._number(holder, ref)
        if number is None:
            return
        value, unit = number
        if measure in ("T", "Z"):
            if unit not in SCORE_UNITS:
                self.problems.append(f"{ref}: {measure}-score with unit {unit!r}; not used")
                return
            if not -10.0 <= value <= 10.0:
                self.problems.append(f"{ref}: implausible {measure}-score {value}; not used")
                return
        elif measure == "BMD":
            converted = self.convert("bmd", value, unit)
            if converted is None:
                self.problems.append(f"{ref}: BMD unit {unit!r} is not g/cm2; not used")
                return
            value = converted
            if not 0.0 < value <= 3.0:
                self.problems.append(f"{ref}: implausible BMD {value} g/cm2; not used")
                return
        fields = {"measure": measure, "site": site, "value": round(value, 4)}
        if age_months is not None:
            fields["age_months"] = age_months
        self.add("dxa", [ref], **fields)
        if when is not None:
            self.dxa_dates.add(when)
        if measure == "BMD" and when is not None:
            device = (res.get("device") or {}).get("reference") or (res.get("device") or {}).get("display")
            dxa_rows.append(
                {"site": site, "side": concept.get("laterality"), "device": device, "when": when, "value": value, "ref": ref}
            )

    def _measurement(self, concept: str | None, holder, when, age_months, ref) -> None:
        if concept is None:
            return
        if concept == "smoking-status":
            answer = self.term.first("smoking-status", holder.get("valueCodeableConcept"))
            if answer is None:
                self.problems.append(f"{ref}: smoking status answer not recognised; not used")
                return
            self._latest[("smoking", "observation")] = max(
                self._latest.get(("smoking", "observation"), (dt.date.min, None, None)),
                (when, ref, {"status": answer.get("smoking"), "source": "observation"}),
                key=_when_key,
            )
            return
        number = self._number(holder, ref)
        if number is None:
            return
        value, unit = number
        converted = self.convert(concept, value, unit)
        if converted is None:
            self.problems.append(f"{ref}: {concept} unit {unit!r} not convertible; not used")
            return
        if concept == "bmi":
            key, fields = ("bmi",), {"value": round(converted, 2), "age_months": age_months}
        elif concept in ("alcohol-drinks-per-day", "audit-c"):
            measure = "units-per-day" if concept == "alcohol-drinks-per-day" else "audit-c"
            key, fields = ("alcohol", measure), {"measure": measure, "value": round(converted, 2)}
        else:
            key, fields = ("lab", concept), {"concept": concept, "value": round(converted, 4), "age_months": age_months}
            low = _reference_low(holder)
            if low is not None:
                low_value, low_unit = low[0], self.unit_aliases.get(low[1], low[1]) or unit
                low_converted = self.convert(concept, low_value, low_unit)
                if low_converted is not None:
                    fields["_ref_low"] = low_converted
        self._latest[key] = max(self._latest.get(key, (dt.date.min, None, None)), (when, ref, fields), key=_when_key)

    def condition(self, res: Mapping[str, Any]) -> None:
        concepts = condition_concepts(res, self.term)
        if not concepts:
            return
        verification = _code_of(res.get("verificationStatus"))
        if verification in self.statuses["condition"]["verification_exclude"]:
            self.exclude(res, f"verificationStatus {verification}")
            return
        clinical = _code_of(res.get("clinicalStatus"))
        active = clinical is None or clinical in self.statuses["condition"]["clinical_active"]
        onset = parse_date(
            res.get("onsetDateTime") or (res.get("onsetPeriod") or {}).get("start") or res.get("recordedDate")
        )
        if onset is not None and onset > self.as_of:
            return
        ref = reference_of(res)
        mechanism = _mechanism_properties(res, self.term)
        marker = bool(mechanism.get("fragility"))
        high_energy = bool(mechanism.get("high_energy"))
        for concept in concepts:
            name = concept.get("concept")
            if name == "fracture":
                fields: dict[str, Any] = {
                    "site": concept.get("fracture_site", "other"),
                    "fragility": bool(concept.get("fragility", False)),
                    "marker": marker,
                    "high_energy": high_energy,
                    "possible_fragility_code": concept.get("possible_fragility_age") is not None,
                }
                onset_age = res.get("onsetAge")
                if isinstance(onset_age, dict) and isinstance(onset_age.get("value"), (int, float)):
                    fields["age_at"] = int(onset_age["value"])
                else:
                    age = self.age_at(onset)
                    if age is not None:
                        fields["age_at"] = age
                self.add("fracture", [ref], **fields)
            elif name in ("current-smoker", "former-smoker"):
                if name == "current-smoker" and not active:
                    continue  # a resolved "current smoker" problem is history: the observation decides
                status = "current" if name == "current-smoker" else "former"
                self.add("smoking", [ref], status=status, source="condition")
            else:
                self.add("condition", [ref], concept=name, active=active)

    def family_history(self, res: Mapping[str, Any]) -> None:
        if res.get("status") in self.statuses["family_member_history"]["exclude"]:
            self.exclude(res, f"status {res.get('status')}")
            return
        relation = self.term.first("family-relationships", res.get("relationship"))
        parent = bool(relation.get("parent")) if relation else False
        ref = reference_of(res)
        for cond in res.get("condition") or []:
            for concept in self.term.match("conditions", (cond or {}).get("code")):
                name = concept.get("concept")
                if name == "fracture" and concept.get("fracture_site") == "hip":
                    self.add("family_history", [ref], parent=parent, concept="hip-fracture")
                elif name == "osteoporosis":
                    self.add("family_history", [ref], parent=parent, concept="osteoporosis")

    def medication(self, res: Mapping[str, Any], steroid_spans: list[tuple[dt.date, dt.date, str]]) -> None:
        rtype = res.get("resourceType")
        found = medication_reading(res, self.term)
        if found is None:
            return
        concept, coded_route, how = found
        ref = reference_of(res)
        if how == "unresolved":
            # The drug cannot be read: flagged (whatever the drug turns out to be), never silence.
            if res.get("status") != "entered-in-error":
                self.add("med_issue", [ref], issue="unresolved")
                target = (res.get("medicationReference") or {}).get("reference") or "no reference"
                self.problems.append(f"{ref}: its medication ({target}) could not be found (not in the input, not on the server); flagged medication-unresolved")
            return
        route = coded_route or _dosage_route(res)
        cls = concept.get("class")
        if how == "text" and res.get("status") != "entered-in-error":
            self.add("med_issue", [ref], issue="by-text")
            self.problems.append(f"{ref}: {concept.get('ingredient')} recognised by its name only, no known code; flagged medication-by-text")
        if rtype == "MedicationAdministration":
            self._administration(res, concept, route, ref)
            return
        status = self._e1_status(res)
        if status == "ignore":
            self.exclude(res, f"status {res.get('status')}")
            return
        start, end = self._period(res)
        ended = end is not None and end < self.as_of
        future = start is not None and start > self.as_of
        if cls == "aromatase-inhibitor":
            self.add("ai_med", [ref], ingredient=concept.get("ingredient"), status=status, ended=ended, future_start=future)
        elif cls in ("testosterone", "gnrh-agonist"):
            self.add("hormone_med", [ref], **{"class": cls}, status=status, ended=ended)
        elif cls in ("bisphosphonate", "denosumab"):
            self.add(
                "antiresorptive",
                [ref],
                ingredient=concept.get("ingredient"),
                **{"class": cls},
                route=route or ("oral" if cls == "bisphosphonate" else "sc"),
                status=status,
                ended=ended,
            )
        # A glucocorticoid of unknown route counts as oral (PROPOSAL): most are, and missing
        # data must not lower the risk; a stated non-oral route (eye drops, IV) never counts.
        elif cls == "glucocorticoid" and (route or "oral") == "oral" and start is not None and not future:
            if status in ("active", "on-hold", "unknown"):
                stop = min(end or self.as_of, self.as_of)
            else:
                stop = min(end or start, self.as_of)
            if stop >= start:
                steroid_spans.append((start, stop, ref))

    def _administration(self, res, concept, route, ref) -> None:
        if res.get("status") not in self.statuses["medication_administration"]["keep"]:
            return
        when = parse_date(res.get("effectiveDateTime") or (res.get("effectivePeriod") or {}).get("start"))
        cls = concept.get("class")
        if when is None or when > self.as_of or cls not in ("bisphosphonate", "denosumab"):
            return
        self.add(
            "antiresorptive",
            [ref],
            ingredient=concept.get("ingredient"),
            **{"class": cls},
            route=route or ("oral" if cls == "bisphosphonate" else "sc"),
            status="administered",
            ended=False,
            months_since=months_between(when, self.as_of),
        )

    def _e1_status(self, res) -> str:
        if res.get("resourceType") == "MedicationStatement":
            return self.statuses["medication_statement"].get(res.get("status"), "unknown")
        table = self.statuses["medication_request"]
        status = table["status"].get(res.get("status"), "unknown")
        if status == "active" and res.get("intent") in table["intent_intended"]:
            return "intended"
        return status

    def _period(self, res) -> tuple[dt.date | None, dt.date | None]:
        if res.get("resourceType") == "MedicationStatement":
            period = res.get("effectivePeriod") or {}
            start = parse_date(period.get("start") or res.get("effectiveDateTime"))
            return start, parse_date(period.get("end"))
        bounds = {}
        for dosage in res.get("dosageInstruction") or []:
            bounds = (((dosage or {}).get("timing") or {}).get("repeat") or {}).get("boundsPeriod") or {}
            if bounds:
                break
        dispense = res.get("dispenseRequest") or {}
        validity = dispense.get("validityPeriod") or {}
        start = parse_date(bounds.get("start") or validity.get("start") or res.get("authoredOn"))
        end = parse_date(bounds.get("end"))
        # A request's validity period is how long it may be dispensed, not when therapy ends:
        # only an explicit dosage bounds period ends it. A finished request without one lasted
        # as long as what was dispensed: the expected supply times (1 + repeats).
        supply = dispense.get("expectedSupplyDuration") or {}
        if end is None and start is not None and isinstance(supply.get("value"), (int, float)):
            days_per = {"d": 1, "wk": 7, "mo": 30.4375, "a": 365.25}.get(supply.get("code") or supply.get("unit"), None)
            if days_per is not None:
                repeats = dispense.get("numberOfRepeatsAllowed") or 0
                end = start + dt.timedelta(days=round(supply["value"] * days_per * (1 + repeats)))
                if res.get("status") == "active":
                    end = None  # still being taken: exposure runs to as_of
        return start, end

    # -- pairing and selection -------------------------------------------------------------
    def bmd_changes(self, rows: list[dict]) -> None:
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for row in rows:
            if row["site"] in ("LS", "TH"):
                groups[(row["site"], row["side"], row["device"])].append(row)
        for (site, _side, _device), series in sorted(groups.items(), key=lambda kv: str(kv[0])):
            series.sort(key=lambda r: (r["when"], r["ref"]))
            latest = series[-1]
            for earlier in series[:-1]:
                days = (latest["when"] - earlier["when"]).days
                if days <= 0 or earlier["value"] <= 0:
                    continue
                change = latest["value"] - earlier["value"]
                pct_per_year = change / earlier["value"] * 100.0 * 365.25 / days
                self.add(
                    "bmd_change",
                    [earlier["ref"], latest["ref"]],
                    site=site,
                    days=days,
                    pct_per_year=round(pct_per_year, 3),
                    abs_change=round(change, 4),
                    latest_age_months=months_between(latest["when"], self.as_of),
                )

    def steroid_exposure(self, spans: list[tuple[dt.date, dt.date, str]]) -> None:
        if not spans:
            return
        spans.sort()
        total_days = 0
        cur_start, cur_end = spans[0][0], spans[0][1]
        for start, end, _ref in spans[1:]:
            if start <= cur_end:
                cur_end = max(cur_end, end)
            else:
                total_days += (cur_end - cur_start).days
                cur_start, cur_end = start, end
        total_days += (cur_end - cur_start).days
        # months of 30.4375 days (365.25 / 12): exposure spans are summed across statements
        self.add("glucocorticoid", [ref for _s, _e, ref in spans], months=round(total_days / 30.4375, 2))

    def flush_latest(self) -> None:
        for key, (_when, ref, fields) in sorted(self._latest.items(), key=lambda kv: str(kv[0])):
            self.add(key[0], [ref], **{k: v for k, v in fields.items() if not k.startswith("_")})

    def derived_measurements(self, patient_refs: list[str]) -> None:
        """Creatinine clearance and albumin-corrected calcium: the quantities the drug labels use.

        Arithmetic on the latest results, no thresholds: the gates are rules (K1).
        """
        latest = {key[1]: value for key, value in self._latest.items() if key[0] == "lab"}
        creatinine, weight = latest.get("creatinine"), latest.get("body-weight")
        age = age_in_years(self.birth, self.as_of) if self.birth else None
        if creatinine and weight and age is not None and creatinine[2]["value"] > 0:
            # Cockcroft-Gault (docs/clinical-specification.md 2.5: the labels use CrCl): (140 - age) x kg / (72 x mg/dL),
            # x 0.85 for women. Sex unknown takes the lower (female) value: missing data must not
            # make a drug look safer.
            crcl = (140 - age) * weight[2]["value"] / (72 * creatinine[2]["value"])
            if self.sex != "male":
                crcl *= 0.85
            self.add(
                "renal",
                [creatinine[1], weight[1], *patient_refs],
                crcl=round(crcl, 1),
                age_months=max(creatinine[2]["age_months"], weight[2]["age_months"]),
            )
        height = latest.get("body-height")
        if ("bmi",) not in self._latest and weight and height and height[2]["value"] > 0:
            # No BMI recorded: weight / height^2 from the latest of each (kg, cm), so that a
            # low BMI is not missed where a system records only the vitals it measures.
            bmi = weight[2]["value"] / (height[2]["value"] / 100.0) ** 2
            if 8.0 <= bmi <= 80.0:
                self.add(
                    "bmi", [weight[1], height[1]], value=round(bmi, 2),
                    age_months=max(weight[2]["age_months"], height[2]["age_months"]),
                )
        calcium = latest.get("calcium")
        if calcium:
            value, refs, corrected = calcium[2]["value"], [calcium[1]], False
            albumin = latest.get("albumin")
            if albumin:
                # Payne: corrected Ca (mg/dL) = Ca + 0.8 x (4.0 - albumin g/dL)
                value = value + 0.8 * (4.0 - albumin[2]["value"])
                refs.append(albumin[1])
                corrected = True
            fields = {"value": round(value, 2), "corrected": corrected, "age_months": calcium[2]["age_months"]}
            if "_ref_low" in calcium[2]:
                fields["below_reference"] = value < calcium[2]["_ref_low"]
            self.add("calcium_status", refs, **fields)


# --------------------------------------------------------------------------- what is read
#
# What the facts stage reads of each resource is decided here, once: the extractor calls
# these before it looks at anything else in a resource, and the file source calls
# `reads_resource` to choose which resources to validate (sources.py), so the two cannot
# drift apart. They expect FHIR shapes and may raise on other JSON (a `code` that is a
# number); the reader validates a resource they raise on, so the extractor only ever meets
# an unvalidated resource on which they answered "nothing read" without raising.

#: Medication classes the rules read; a medication of any other class is not read.
MEDICATION_CLASSES = frozenset(
    {"aromatase-inhibitor", "bisphosphonate", "denosumab", "glucocorticoid", "testosterone", "gnrh-agonist"}
)


_OBSERVATION_VALUESETS = ("dxa", "observations", "conditions", "risk-tools")


def _observation_code_read(code: Any, term: Terminology) -> bool:
    dxa, observation, condition, tool = term.firsts(_OBSERVATION_VALUESETS, code)
    if dxa is not None:
        return bool(dxa.get("measure"))  # a DXA study or panel code: its results are in the components
    return bool(observation or condition or tool)


#: Where a DXA can be on record without a result, besides an Observation.
_DXA_EVENT_TYPES = frozenset({"DiagnosticReport", "Procedure", "ServiceRequest"})
_DXA_SOURCE = {"DiagnosticReport": "report", "Procedure": "procedure", "ServiceRequest": "order", "Observation": "observation"}


def dxa_record_code(code: Any, term: Terminology) -> bool:
    """True if a code names a DXA: any code of the `dxa` value set, or a DXA procedure code."""
    dxa, procedure = term.firsts(("dxa", "dxa-procedures"), code)
    return dxa is not None or procedure is not None


def _event_date(res: Mapping[str, Any]) -> Any:
    """When a DXA report, procedure or order happened: the scan's date, else when it was recorded."""
    rtype = res.get("resourceType")
    if rtype == "DiagnosticReport":
        period = res.get("effectivePeriod") or {}
        return res.get("effectiveDateTime") or period.get("end") or period.get("start") or res.get("issued")
    if rtype == "Procedure":
        period = res.get("performedPeriod") or {}
        found = res.get("performedDateTime") or period.get("end") or period.get("start")
        if found:
            return found
        # A procedure not done has no performed date; QI-Core records when in an extension.
        for ext in res.get("extension") or []:
            if isinstance(ext, dict) and str(ext.get("url", "")).endswith("recorded"):
                return ext.get("valueDateTime")
        return None
    period = res.get("occurrencePeriod") or {}
    return res.get("authoredOn") or res.get("occurrenceDateTime") or period.get("start")


def observation_parts(res: Mapping[str, Any], term: Terminology) -> list[tuple[Any, Mapping[str, Any]]]:
    """(code, holder) of every part of an Observation whose code the value sets recognise.

    The holder is the Observation itself for `code`, or one of its components.
    """
    found = [(res.get("code"), res)] if _observation_code_read(res.get("code"), term) else []
    components = res.get("component")
    if components:
        found += [(c.get("code"), c) for c in components if isinstance(c, dict) and _observation_code_read(c.get("code"), term)]
    return found


#: Every value set an Observation's own code is asked about: `_OBSERVATION_VALUESETS`, then `dxa-procedures`.
_OBSERVATION_CODE_VALUESETS = (*_OBSERVATION_VALUESETS, "dxa-procedures")


def observation_reading(res: Mapping[str, Any], term: Terminology) -> tuple[list[tuple[Any, Mapping[str, Any]]], bool]:
    """`(observation_parts(res, term), dxa_record_code(res.get("code"), term))`, the code looked up once.

    Every Observation of every record is asked both, by the reader (which to validate) and by
    the extractor; most (vital signs, blood counts) are neither, and one look-up of the
    code's codings in the five value sets answers both (`Terminology.firsts`: each value
    set's answer is the one it gives alone).
    """
    code = res.get("code")
    dxa, observation, condition, tool, procedure = term.firsts(_OBSERVATION_CODE_VALUESETS, code)
    read = bool(dxa.get("measure")) if dxa is not None else bool(observation or condition or tool)
    found = [(code, res)] if read else []
    components = res.get("component")
    if components:
        found += [(c.get("code"), c) for c in components if isinstance(c, dict) and _observation_code_read(c.get("code"), term)]
    return found, dxa is not None or procedure is not None


def condition_concepts(res: Mapping[str, Any], term: Terminology) -> list:
    """The conditions-value-set concepts a Condition's code carries."""
    return term.match("conditions", res.get("code"))


def medication_concept(res: Mapping[str, Any], term: Terminology) -> tuple[Any, str | None] | None:
    """(concept, route its coding states) of a medication of a class the rules read, else None.

    As `medication_reading`, without saying how the drug was recognised.
    """
    found = medication_reading(res, term)
    if found is None or found[2] == "unresolved":
        return None
    return found[0], found[1]


def medication_reading(res: Mapping[str, Any], term: Terminology) -> tuple[Any, str | None, str] | None:
    """(concept, route, how) of a medication the rules read, else None. `how` is one of:

    - "code": `medicationCodeableConcept`, else the contained Medication that
      `medicationReference` points to (its code, and its ingredients' itemCodeableConcept or
      itemReference to another contained Medication/Substance), carries a code of a class the
      rules read (a Medication held elsewhere in the input was made contained by
      fhir_aibl/references.py before this runs);
    - "text": no code is recognised at all, but a text or display names an aromatase
      inhibitor (generic or brand, the `texts` of the medications value set): assessed as on
      it, and flagged so that a human checks it. Text never removes a drug a code names;
    - "unresolved": `medicationReference` names nothing that can be read here (a Medication
      not in the input, a `#id` with no such contained resource, a reference with only a
      display or identifier), or the Medication's code says nothing the rules know and one of
      its ingredients is a reference to nothing readable: concept None; flagged, never read
      as "no drug".
    """
    codes, texts, unresolved = _medication_codes(res)
    concepts = term.match("medications", codes)
    if concepts:
        concept, coded_route = _best_concept(concepts)
        if concept.get("class") not in MEDICATION_CLASSES:
            return None
        return concept, coded_route, "code"
    for text in texts:
        if isinstance(text, str):
            props = term.match_text("medications", text)
            if props is not None and props.get("class") in MEDICATION_CLASSES:
                return props, None, "text"
    if unresolved:
        return None, None, "unresolved"
    return None


def _medication_codes(res: Mapping[str, Any]) -> tuple[list, list, bool]:
    """(codeables, texts, unresolved) of what a medication-use resource says its drug is."""
    codeable = res.get("medicationCodeableConcept")
    if codeable:
        return [codeable], _texts_of(codeable), False
    ref = res.get("medicationReference")
    if not isinstance(ref, dict):
        return [], [], False
    texts = [ref.get("display")]
    value = ref.get("reference")
    if not isinstance(value, str) or not value.startswith("#"):
        return [], texts, True  # not contained: unread unless references.py made it contained
    contained = {
        c.get("id"): c for c in res.get("contained") or [] if isinstance(c, dict) and c.get("resourceType") in ("Medication", "Substance")
    }
    medication = contained.get(value[1:])
    if medication is None or medication.get("resourceType") != "Medication":
        return [], texts, True
    codes = [medication.get("code")]
    texts += _texts_of(medication.get("code"))
    unread_ingredient = False
    for ingredient in medication.get("ingredient") or []:
        if not isinstance(ingredient, dict):
            continue
        item = ingredient.get("itemCodeableConcept")
        item_ref = ingredient.get("itemReference")
        if item is None and isinstance(item_ref, dict):
            target = item_ref.get("reference")
            held = contained.get(target[1:]) if isinstance(target, str) and target.startswith("#") else None
            item = held.get("code") if held is not None else None
            texts.append(item_ref.get("display"))
            unread_ingredient = unread_ingredient or held is None  # an ingredient nobody can read
        if item:
            codes.append(item)
            texts += _texts_of(item)
    return [c for c in codes if c], texts, unread_ingredient


def _texts_of(codeable: Any) -> list:
    if not isinstance(codeable, dict):
        return []
    return [codeable.get("text")] + [c.get("display") for c in codeable.get("coding") or [] if isinstance(c, dict)]


_MEDICATION_TYPES = frozenset({"MedicationStatement", "MedicationRequest", "MedicationAdministration"})


def reads_resource(res: Mapping[str, Any], term: Terminology) -> bool:
    """True if `extract_facts` could read anything of this resource; False if it never looks past its code.

    The Patient and every FamilyMemberHistory are read (a FamilyMemberHistory's status alone
    can make an `excluded` fact); an Observation, Condition or medication only when its code
    is recognised, exactly as `extract_facts` decides; any other type never. May raise on a
    resource that is not valid FHIR (a `code` that is a number): callers treat that as read.
    """
    rtype = res.get("resourceType")
    if rtype == "Observation":
        parts, study = observation_reading(res, term)
        return bool(parts) or study
    if rtype in _DXA_EVENT_TYPES:
        return dxa_record_code(res.get("code"), term)
    if rtype == "Condition":
        return bool(condition_concepts(res, term))
    if rtype in _MEDICATION_TYPES:
        return medication_reading(res, term) is not None
    return rtype in ("Patient", "FamilyMemberHistory")


def _mechanism_properties(res: Mapping[str, Any], term: Terminology) -> dict[str, Any]:
    """What the mechanism words of a Condition say: `fragility` (low-trauma) and/or `high_energy`."""
    found: dict[str, Any] = {}
    rules = term.valueset("conditions").texts
    for text in _mechanism_texts(res):
        lowered = text.lower()
        for rule in rules:
            if rule.contains in lowered:
                found.update(rule.properties)
    return found


def _mechanism_texts(res: Mapping[str, Any]) -> list[str]:
    """Where a record says how a fracture happened, when no code says it.

    The text and coding displays of the code, categories and evidence, the notes, and
    extensions (their url, e.g. a local `.../fragility-fracture` flag with valueBoolean true,
    or their string or coded value). The words that count are the `texts` of the conditions
    value set (fragility, low-trauma, fall from standing height, ...).
    """
    texts: list[str] = []

    def codeable(cc: Any) -> None:
        if isinstance(cc, dict):
            texts.append(cc.get("text"))
            texts.extend(c.get("display") for c in cc.get("coding") or [] if isinstance(c, dict))

    codeable(res.get("code"))
    for cat in res.get("category") or []:
        codeable(cat)
    for ev in res.get("evidence") or []:
        for cc in (ev or {}).get("code") or []:
            codeable(cc)
    texts += [n.get("text") for n in res.get("note") or [] if isinstance(n, dict)]
    for ext in res.get("extension") or []:
        if not isinstance(ext, dict):
            continue
        if ext.get("valueBoolean") is True:
            texts.append(str(ext.get("url", "")).rsplit("/", 1)[-1].replace("-", " "))
        texts.append(ext.get("valueString"))
        codeable(ext.get("valueCodeableConcept"))
    return [t for t in texts if isinstance(t, str)]


def _reference_low(holder: Mapping[str, Any]) -> tuple[float, str] | None:
    for rng in holder.get("referenceRange") or []:
        low = (rng or {}).get("low") or {}
        if isinstance(low.get("value"), (int, float)):
            return float(low["value"]), str(low.get("code") or low.get("unit") or "")
    return None


def _when_key(item: tuple) -> tuple:
    when, ref, _fields = item
    return (when, ref or "")


def _code_of(codeable: Any) -> str | None:
    if isinstance(codeable, dict):
        for coding in codeable.get("coding") or []:
            if isinstance(coding, dict) and coding.get("code"):
                return str(coding["code"])
    return None


# Products carry the route and formulation; ingredients and brands do not always.
_TTY_RANK = {
    "SCD": 0, "NDC": 0, "SBD": 1, "SBDC": 1, "SCDC": 1, "GPCK": 1, "BPCK": 1,
    "IN": 2, "PIN": 2, "SCT-PRODUCT": 2, "SCT-SUBSTANCE": 2, "BN": 3, "ATC": 4,
}


def _best_concept(concepts):
    """Several codings of one medication (product, ingredient, brand, ATC) name one drug.

    They agree on the ingredient in real records; the most specific coding (a product)
    is preferred, and the first route any coding states is kept.
    """
    ranked = sorted(concepts, key=lambda c: _TTY_RANK.get(c.get("tty"), 9))
    return ranked[0], next((c.get("route") for c in ranked if c.get("route")), None)


_ORAL_ROUTES = {"26643006", "PO", "oral"}


def _dosage_route(res: Mapping[str, Any]) -> str | None:
    for dosage in (res.get("dosage") or []) + (res.get("dosageInstruction") or []):
        for coding in ((dosage or {}).get("route") or {}).get("coding") or []:
            code = str((coding or {}).get("code", ""))
            return "oral" if code in _ORAL_ROUTES else "other"
    return None


def extract_facts(
    patient_ref: str,
    resources: Iterable[Mapping[str, Any]],
    as_of: dt.date,
    terminology: Terminology,
    unreadable: Iterable[str] = (),
) -> FactSet:
    """Every fact the rules read, for one patient's resources.

    `unreadable`: `Type/id` of this patient's resources that were left out because they could
    not be read (they fail FHIR R4 validation where reading them in part is not safe). What
    they said is unknown, so they must not pass for absent: a medication among them is a
    `med_issue` (it may be an aromatase inhibitor), and any of them makes a `record_unreadable`
    fact (the record may hold a risk factor that was not seen). A Patient among them is the
    missing Patient already handled (G29).
    """
    ex = _Extractor(terminology, as_of)
    unread = sorted({label for label in unreadable if not label.startswith("Patient/")})
    for label in unread:
        if label.split("/", 1)[0] in _MEDICATION_TYPES:
            ex.add("med_issue", [label], issue="unreadable")
    if unread:
        ex.add("record_unreadable", unread, count=len(unread))
    resources = list(resources)
    dxa_rows: list[dict] = []
    steroid_spans: list[tuple[dt.date, dt.date, str]] = []
    for res in resources:
        if res.get("resourceType") == "Patient":
            ex.patient(res)
            break
    for res in resources:
        rtype = res.get("resourceType")
        if rtype == "Observation":
            ex.observation(res, dxa_rows)
        elif rtype == "Condition":
            ex.condition(res)
        elif rtype == "FamilyMemberHistory":
            ex.family_history(res)
        elif rtype in _MEDICATION_TYPES:
            ex.medication(res, steroid_spans)
        elif rtype in _DXA_EVENT_TYPES:
            ex.dxa_event(res)
    ex.flush_latest()
    if ex.facts and not any(f["t"] == "patient" for f in ex.facts):
        # No usable Patient resource (absent, or dropped as invalid): the rules still see a
        # patient, of unknown age and sex, so that they take the safer branch (G29) instead
        # of skipping every rule that reads the patient.
        ex.add("patient", [], sex="unknown", record="missing")
    ex.derived_measurements([f["refs"][0] for f in ex.facts if f["t"] == "patient" and f["refs"]])
    ex.bmd_changes(dxa_rows)
    ex.steroid_exposure(steroid_spans)
    return FactSet(
        patient=patient_ref, as_of=as_of, facts=ex.facts, problems=ex.problems, dxa_dates=tuple(sorted(ex.dxa_dates))
    )
