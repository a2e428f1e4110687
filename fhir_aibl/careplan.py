"""Assessment -> RiskAssessment + CarePlan (FHIR R4 via fhir.resources R4B models), and the
transaction Bundle that writes them back.

Pure: no I/O except `load_catalogue`, which reads the recommendation catalogue
(`rules/recommendations.yaml`), the clinician-reviewed text of every recommendation and
flag. The resources are built with the R4B models, so they are validated before they
leave; they are proposals (CarePlan status draft, intent proposal), never orders.

Write-back is idempotent by construction. Conditional create (`ifNoneExist`) is not
race-safe on several servers (DESIGN.md, known traps), so it is only half the answer:
the other half is a business identifier that is a pure function of what was decided,
so a retry, a re-run on another day with unchanged data, or two workers racing on the
same patient all carry the same identifier and a duplicate can be found and removed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.bundle import Bundle, BundleEntry, BundleEntryRequest
from fhir.resources.R4B.careplan import CarePlan, CarePlanActivity, CarePlanActivityDetail
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.extension import Extension
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.riskassessment import RiskAssessment, RiskAssessmentPrediction
from fhir.resources.R4B.timing import Timing, TimingRepeat
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .assessment import Assessment
from .clinician_text import CATEGORY_WORDS, ClinicianText, PatientValues
from .errors import RulesError

IDENTIFIER_SYSTEM = "urn:fhir-aibl:careplan"
RULESET_SYSTEM = "urn:fhir-aibl:ruleset"
CATEGORY_SYSTEM = "urn:fhir-aibl:aibl-risk-category"
RECOMMENDATION_SYSTEM = "urn:fhir-aibl:recommendation"
#: Reviewer material on a resource, out of the clinician's text: the ids of the rules that
#: decided it (one valueString, space-separated: one extension per rule costs a model each on
#: the CDS hot path), and the ruleset and catalogue that decided (valueString).
RULE_EXTENSION = "urn:fhir-aibl:rules"
RULESET_EXTENSION = "urn:fhir-aibl:ruleset"
US_CORE_CAREPLAN_CATEGORY = "http://hl7.org/fhir/us/core/CodeSystem/careplan-category"
UCUM = "http://unitsofmeasure.org"

CATEGORY_DISPLAY = {
    "high": "High risk",
    "moderate": "Moderate risk",
    "low": "Low risk",
    "indeterminate": "Indeterminate (no valid bone density)",
    "not-applicable": "Not applicable (not on an aromatase inhibitor)",
}
AI_STATUS_TEXT = {
    "active": "being taken",
    "planned": "planned, not started",
    "stopped": "stopped",
    "none": "none on record",
}
# CarePlan.activity.detail.kind (R4 value set care-plan-activity-kind). A referral is a
# ServiceRequest in FHIR; advice has no request resource, so no kind.
DETAIL_KIND = {
    "procedure": "ServiceRequest",
    "monitoring": "ServiceRequest",
    "referral": "ServiceRequest",
    "medication": "MedicationRequest",
}
# CarePlan.activity.detail.reasonReference may only point to these types (R4).
_REASON_TYPES = ("Condition/", "Observation/", "DiagnosticReport/", "DocumentReference/")


# -- the catalogue ---------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class CodingSpec(_Model):
    system: str
    code: str
    display: str | None = None

    def fhir(self) -> Coding:
        return Coding(system=self.system, code=self.code, display=self.display)


class QuantitySpec(_Model):
    value: float
    unit: str = Field(description="UCUM code, e.g. mg")

    def fhir(self) -> Quantity:
        return Quantity(value=self.value, unit=self.unit, system=UCUM, code=self.unit)


class TimingSpec(_Model):
    value: float = Field(ge=0, description="interval; 0 means now")
    unit: Literal["d", "wk", "mo", "a"] = "mo"
    max: float | None = Field(default=None, description="upper end of a range (periodMax)")
    text: str | None = None

    @model_validator(mode="after")
    def _range(self) -> "TimingSpec":
        if self.max is not None and (self.value == 0 or self.max < self.value):
            raise ValueError("max needs a non-zero value and must not be below it")
        return self

    def fhir(self) -> Timing:
        code = CodeableConcept(text=self.text) if self.text else None
        if self.value == 0:  # "now": one occurrence, as soon as possible
            return Timing(repeat=TimingRepeat(count=1), code=code or CodeableConcept(text="now"))
        repeat = TimingRepeat(frequency=1, period=self.value, periodMax=self.max, periodUnit=self.unit)
        return Timing(repeat=repeat, code=code)


class ProductSpec(_Model):
    code: CodingSpec | None = None
    display: str
    dosage: str
    route: str
    frequency: str
    note: str | None = None
    dose: QuantitySpec | None = None
    daily_amount: QuantitySpec | None = None

    @property
    def text(self) -> str:
        text = f"{self.display} {self.dosage} {self.route} {self.frequency}"
        return f"{text} ({self.note})" if self.note else text


def _as_tuple(value: Any) -> Any:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)):
        return (value,)
    return value


class ClinicianSpec(_Model):
    """What a clinician reads for an entry: the action, and why (with {placeholders} for the patient's values)."""

    action: str = Field(min_length=1)
    why: str = ""


class ReferenceSpec(_Model):
    """A citation as a clinician sees it: author, journal, year, and a link (DOI) where there is one."""

    text: str = Field(min_length=1)
    url: str | None = None


class _Entry(_Model):
    title: str = Field(min_length=1)
    text: str = Field(min_length=1)
    clinician: ClinicianSpec | None = None
    citation: tuple[str, ...] = Field(min_length=1)
    implements: tuple[str, ...] = ()

    @field_validator("citation", "implements", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_tuple(value)


class RecommendationEntry(_Entry):
    kind: Literal["procedure", "medication", "monitoring", "advice", "referral"]
    code: tuple[CodingSpec, ...] = ()
    timing: TimingSpec | None = None
    products: tuple[ProductSpec, ...] = ()
    product_choice: Literal["one-of", "all"] = "one-of"

    @field_validator("code", mode="before")
    @classmethod
    def _listify_code(cls, value: Any) -> Any:
        return _as_tuple(value)

    @model_validator(mode="after")
    def _consistent(self) -> "RecommendationEntry":
        if self.products and self.kind != "medication":
            raise ValueError("products are only for kind medication")
        return self


class FlagEntry(_Entry):
    severity: Literal["info", "warning"]


class Catalogue(_Model):
    """The recommendation catalogue, validated. `content_hash` is set by `load_catalogue`."""

    id: str
    version: str
    title: str = ""
    citations: dict[str, str]
    references: dict[str, ReferenceSpec] = Field(default_factory=dict)
    recommendations: dict[str, RecommendationEntry]
    flags: dict[str, FlagEntry]
    content_hash: str = ""

    @model_validator(mode="after")
    def _citations_known(self) -> "Catalogue":
        entries: list[tuple[str, _Entry]] = [*self.recommendations.items(), *self.flags.items()]
        for code, entry in entries:
            unknown = [c for c in entry.citation if c not in self.citations]
            if unknown:
                raise ValueError(f"{code}: unknown citation key(s) {', '.join(unknown)}")
        return self

    def missing(self, *, recommendations: Iterable[str] = (), flags: Iterable[str] = ()) -> list[str]:
        """Codes without an entry, as `recommendation <code>` / `flag <code>`."""
        out = [f"recommendation {c}" for c in recommendations if c not in self.recommendations]
        out += [f"flag {c}" for c in flags if c not in self.flags]
        return out

    def require(self, *, recommendations: Iterable[str] = (), flags: Iterable[str] = ()) -> None:
        """Raise RulesError naming every code the catalogue has no entry for."""
        missing = self.missing(recommendations=recommendations, flags=flags)
        if missing:
            raise RulesError(f"recommendation catalogue {self.id} {self.version} has no entry for: {', '.join(missing)}")


def load_catalogue(path: str | Path) -> Catalogue:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RulesError(f"cannot read recommendation catalogue: {exc}", source=str(path)) from exc
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RulesError(f"not valid YAML: {exc}", source=str(path)) from exc
    if not isinstance(doc, dict):
        raise RulesError("a recommendation catalogue is a mapping", source=str(path))
    doc["content_hash"] = hashlib.sha256(raw).hexdigest()[:12]
    try:
        return Catalogue.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise RulesError(f"invalid recommendation catalogue: {problems}", source=str(path)) from exc


# -- identity -------------------------------------------------------------------------------


def _identity_content(assessment: Assessment) -> dict:
    # What was decided, for whom, by which rules: nothing else. Not `as_of` and not the
    # CarePlan's `created`: re-running on another day with unchanged data must give the same
    # identifier, so that the conditional create finds the existing resources and the write
    # is a no-op (and, since conditional create is not race-safe on several servers, so that
    # duplicates from a race or a retry share one identifier and can be found). Lists are
    # sorted: their order carries no meaning. Evidence carries resource versions, so changed
    # data gives a new identifier, and so does a changed rule file (its hash is in the name).
    return {
        "patient": assessment.patient,
        "ruleset": assessment.ruleset.name,
        "boundary_mode": assessment.ruleset.boundary_mode,
        "ai_status": assessment.ai_status,
        "category": assessment.category,
        "risk_factors": sorted(assessment.risk_factors),
        "recommendations": sorted(assessment.recommendations),
        "flags": sorted(assessment.flags),
        "evidence": sorted(assessment.evidence),
    }


def business_identifier(assessment: Assessment) -> Identifier:
    """The deterministic identifier of an assessment's CarePlan and RiskAssessment."""
    canonical = json.dumps(_identity_content(assessment), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return Identifier(system=IDENTIFIER_SYSTEM, value=hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32])


def full_url(resource_type: str, identifier: Identifier) -> str:
    """`urn:uuid:` of a resource in a transaction: uuid5 of its type and business identifier.

    Both resources of one assessment carry the same identifier, so the type is part of the
    name; the result is stable, so a CarePlan built alone already points at the right entry.
    """
    name = f"{resource_type}?identifier={identifier.system}|{identifier.value}"
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"


def _search(identifier: Identifier) -> str:
    return f"identifier={identifier.system}|{identifier.value}"


# -- the resources ----------------------------------------------------------------------------


def _day(value: dt.date) -> str:
    return f"{value.day} {value:%b %Y}"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _refs(references: Iterable[str]) -> list[Reference] | None:
    out = [Reference(reference=r) for r in _unique(references)]
    return out or None  # FHIR forbids empty arrays


def _flag_note(code: str, text: ClinicianText) -> Annotation:
    return Annotation(text=text.sentence(code))


#: Recorded FRAX probabilities, as RiskAssessment predictions (the tool's own outcome).
_FRAX_OUTCOMES = {
    "frax-mof": "Major osteoporotic fracture within 10 years (FRAX, as recorded)",
    "frax-hip": "Hip fracture within 10 years (FRAX, as recorded)",
}


def _risk_tool_notes(assessment: Assessment) -> list[Annotation]:
    """Every recorded risk tool in plain words, with its value and date (shown, never a category)."""
    return [Annotation(text=f.detail) for f in assessment.findings_of("risk-tool") if f.detail]


def _frax_predictions(assessment: Assessment) -> list[RiskAssessmentPrediction]:
    out = []
    for finding in assessment.findings_of("risk-tool"):
        outcome = _FRAX_OUTCOMES.get(finding.code)
        if outcome is None or finding.value is None:
            continue
        when = f" on {finding.date.isoformat()}" if finding.date else ""
        out.append(
            RiskAssessmentPrediction(
                outcome=CodeableConcept(text=outcome),
                probabilityDecimal=round(finding.value / 100.0, 4),
                whenRange={"high": {"value": 10, "unit": "years", "system": "http://unitsofmeasure.org", "code": "a"}},
                rationale=(
                    f"FRAX {finding.value:g}% recorded{when}; shown for information. It does not set the "
                    "AIBL risk category: FRAX does not capture the bone loss an aromatase inhibitor causes."
                ),
            )
        )
    return out


def rule_extensions(assessment: Assessment, rules: Iterable[str], *, ruleset: bool = True) -> list[Extension] | None:
    """The rules (and, unless the enclosing resource says it, the ruleset) behind a resource or
    element, as extensions: reviewer material, not text."""
    rules = _unique(rules)
    out = [Extension(url=RULE_EXTENSION, valueString=" ".join(rules))] if rules else []
    if ruleset:
        out.append(Extension(url=RULESET_EXTENSION, valueString=assessment.ruleset.name))
    return out or None


def _rationale_rules(assessment: Assessment) -> list[str]:
    rules: list[str] = []
    for kind, code in [("category", assessment.category), *(("risk-factor", rf) for rf in assessment.risk_factors)]:
        finding = assessment.finding(kind, code)
        if finding:
            rules.extend(finding.rules)
    return _unique(rules) or list(assessment.rules)


def _risk_assessment(assessment: Assessment, catalogue: Catalogue, identifier: Identifier, text: ClinicianText) -> RiskAssessment:
    rs = assessment.ruleset
    rationale = text.values.headline().replace("**", "")
    mitigation = None
    if assessment.recommendations:
        mitigation = " ".join(text.action(c) for c in assessment.recommendations)
    return RiskAssessment(
        identifier=[identifier],
        extension=rule_extensions(assessment, _rationale_rules(assessment), ruleset=False),  # method names it
        status="final",
        subject=Reference(reference=assessment.patient),
        occurrenceDateTime=assessment.as_of,
        code=CodeableConcept(text="Aromatase-inhibitor-associated bone loss (AIBL) risk category"),
        method=CodeableConcept(
            coding=[
                Coding(
                    system=RULESET_SYSTEM,
                    code=rs.name,
                    display=f"{rs.id} version {rs.version} (content {rs.content_hash}, boundary mode {rs.boundary_mode})",
                )
            ],
            text=f"AIBL bone health rules, version {rs.version}",
        ),
        basis=_refs(assessment.evidence),
        prediction=[
            RiskAssessmentPrediction(
                outcome=CodeableConcept(text="Bone loss and fragility fracture on aromatase inhibitor therapy"),
                qualitativeRisk=CodeableConcept(
                    coding=[
                        Coding(
                            system=CATEGORY_SYSTEM,
                            code=assessment.category,
                            display=CATEGORY_DISPLAY[assessment.category],
                        )
                    ],
                    text=CATEGORY_DISPLAY[assessment.category],
                ),
                rationale=rationale,
            ),
            *_frax_predictions(assessment),
        ],
        mitigation=mitigation,
        note=[_flag_note(f, text) for f in assessment.flags] + _risk_tool_notes(assessment) or None,
    )


def _product(entry: RecommendationEntry) -> dict[str, Any]:
    if not entry.products:
        return {}
    joiner = " or " if entry.product_choice == "one-of" else " and "
    codings = [p.code.fhir() for p in entry.products if p.code]
    out: dict[str, Any] = {
        "productCodeableConcept": CodeableConcept(
            coding=codings or None, text=joiner.join(p.text for p in entry.products)
        )
    }
    if len(entry.products) == 1:  # an amount only means something for one product
        only = entry.products[0]
        if only.dose:
            out["quantity"] = only.dose.fhir()
        if only.daily_amount:
            out["dailyAmount"] = only.daily_amount.fhir()
    return out


def _activity(assessment: Assessment, code: str, entry: RecommendationEntry, text: ClinicianText) -> CarePlanActivity:
    finding = assessment.finding("recommendation", code)
    rules = finding.rules if finding else ()
    evidence = finding.evidence if finding else ()
    description = text.cited(code)
    # The catalogue's standard codes first; the fhir-aibl code last, so that a reader (a CDS
    # card, a later run) can tell which recommendation an activity is without parsing text.
    codings = [c.fhir() for c in entry.code]
    codings.append(Coding(system=RECOMMENDATION_SYSTEM, code=code, display=entry.title))
    reasons = [r for r in evidence if r.startswith(_REASON_TYPES)]
    status = "not-started"
    blocks = assessment.findings_of("blocked") if entry.kind == "medication" else []
    if blocks:
        # A safety gate never silently drops a drug: the activity says what is blocked, why,
        # and what to do instead (the gate rule's text), and waits when every agent is held.
        description += " Safety checks: " + text.blocked_sentence(blocks)
        if any(b.code == "all-antiresorptives" for b in blocks):
            status = "on-hold"
    detail = CarePlanActivityDetail(
        extension=rule_extensions(assessment, rules, ruleset=False),  # the CarePlan names it
        kind=DETAIL_KIND.get(entry.kind),
        code=CodeableConcept(coding=codings, text=entry.title),
        status=status,
        description=description.strip(),
        reasonReference=_refs(reasons),
        scheduledTiming=entry.timing.fhir() if entry.timing else None,
        **_product(entry),
    )
    return CarePlanActivity(detail=detail)


def _care_plan(
    assessment: Assessment,
    catalogue: Catalogue,
    identifier: Identifier,
    created: dt.datetime,
    text: ClinicianText,
) -> CarePlan:
    category = CATEGORY_DISPLAY[assessment.category]
    indications = [
        ref
        for finding in assessment.findings_of("indication")
        for ref in finding.evidence
        if ref.startswith("Condition/")
    ]
    risk_ref = Reference(
        reference=full_url("RiskAssessment", identifier),
        type="RiskAssessment",
        identifier=identifier,
        display=f"AIBL risk assessment: {category}",
    )
    supporting = [risk_ref, *(_refs(assessment.evidence) or [])]
    description = (
        f"Aromatase-inhibitor-associated bone loss, assessed on {_day(assessment.as_of)}. "
        + text.values.headline().replace("**", "")
        + " Proposed for clinician review; nothing here has been ordered."
    )
    rs = assessment.ruleset
    catalogue_name = f"{catalogue.id} {catalogue.version}" + (f" ({catalogue.content_hash})" if catalogue.content_hash else "")
    extensions = [
        Extension(url=RULESET_EXTENSION, valueString=f"{rs.name} (boundary mode {rs.boundary_mode})"),
        Extension(url=RULESET_EXTENSION, valueString=f"catalogue {catalogue_name}"),
    ]
    notes = [_flag_note(f, text) for f in assessment.flags] + _risk_tool_notes(assessment)
    activities = [_activity(assessment, c, catalogue.recommendations[c], text) for c in assessment.recommendations]
    return CarePlan(
        identifier=[identifier],
        extension=extensions,
        status="draft",
        intent="proposal",
        category=[
            CodeableConcept(
                coding=[
                    Coding(
                        system=US_CORE_CAREPLAN_CATEGORY,
                        code="assess-plan",
                        display="Assessment and Plan of Treatment",
                    )
                ]
            )
        ],
        title=f"Bone health plan on an aromatase inhibitor: {CATEGORY_WORDS[assessment.category]}",
        description=description,
        subject=Reference(reference=assessment.patient),
        created=created,
        addresses=_refs(indications),
        supportingInfo=supporting,
        activity=activities or None,
        note=notes or None,
    )


def build_resources(
    assessment: Assessment,
    catalogue: Catalogue,
    *,
    created: dt.datetime | None = None,
    values: PatientValues | None = None,
) -> tuple[RiskAssessment, CarePlan]:
    """The RiskAssessment and CarePlan of one assessment.

    `created` (default: now, UTC) is the CarePlan's creation time; it never enters the
    identifier. `values` (the patient's values and their dates, from the facts and resources)
    fill the clinician text; without them the text names what the assessment itself holds. Raises RulesError if the catalogue has no entry for a code the assessment uses.
    """
    catalogue.require(recommendations=assessment.recommendations, flags=assessment.flags)
    if created is None:
        created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    elif created.tzinfo is None:  # FHIR dateTime with a time needs a zone
        created = created.replace(tzinfo=dt.timezone.utc)
    identifier = business_identifier(assessment)
    text = ClinicianText(catalogue, values if values is not None else PatientValues(assessment))
    risk = _risk_assessment(assessment, catalogue, identifier, text)
    plan = _care_plan(assessment, catalogue, identifier, created, text)
    return risk, plan


# -- write-back ------------------------------------------------------------------------------


def _entry(resource: RiskAssessment | CarePlan) -> BundleEntry:
    resource_type = resource.get_resource_type()
    identifiers = [i for i in (resource.identifier or []) if i.system == IDENTIFIER_SYSTEM and i.value]
    if not identifiers:
        raise ValueError(f"{resource_type} has no {IDENTIFIER_SYSTEM} identifier: build it with build_resources")
    identifier = identifiers[0]
    return BundleEntry(
        fullUrl=full_url(resource_type, identifier),
        resource=resource,
        request=BundleEntryRequest(method="POST", url=resource_type, ifNoneExist=_search(identifier)),
    )


def transaction_bundle(pairs: Iterable[tuple[RiskAssessment, CarePlan]]) -> Bundle:
    """One transaction for many patients: per assessment a conditional create of the
    RiskAssessment and of the CarePlan (`ifNoneExist: identifier=<system>|<value>`), so that
    posting the same result twice creates nothing. The CarePlan's supportingInfo points at
    the RiskAssessment's `urn:uuid`, which the server resolves to the created or the matched
    resource. A pair given twice is written once (a Bundle's fullUrls must be unique).

    Serialise with `bundle.model_dump_json()` (fhir.resources 8 drops None by default;
    `.json()` is deprecated there).
    """
    entries: list[BundleEntry] = []
    seen: set[str] = set()
    for risk, plan in pairs:
        for resource in (risk, plan):
            entry = _entry(resource)
            if entry.fullUrl in seen:
                continue
            seen.add(entry.fullUrl)
            entries.append(entry)
    return Bundle(type="transaction", entry=entries or None)


def catalogue_for(rules_path: Path | None) -> Catalogue:
    """The recommendation catalogue beside a rule file (default: the shipped one)."""
    from .assess import RULES_DIR

    return load_catalogue((Path(rules_path).parent if rules_path else RULES_DIR) / "recommendations.yaml")
