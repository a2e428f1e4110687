"""Assessment -> CDS Hooks 2.0 cards.

Which cards, and why:

- **No card** when the category is `not-applicable` (not on, or no longer on, an aromatase
  inhibitor): the service has nothing to say about AIBL then.
- **The assessment card** (`kind` assessment): the category, the risk factors, every
  recommendation with the rules and FHIR references behind it, the flags. Indicator
  `warning` for high and moderate risk, `info` for low and indeterminate. Suggestions:
  record the bone health plan (a RiskAssessment and a CarePlan, from `careplan.py`), and,
  when a DXA is recommended (`dxa-now`, `dxa-12m`, ...), a ServiceRequest for it (SNOMED CT
  312681000, from the recommendation catalogue) dated by the catalogue's timing.
  `selectionBehavior: any`: both may be taken.
- **The treatment card** (`kind` treatment), when a recommendation proposes an
  antiresorptive: one MedicationRequest suggestion per product the catalogue lists for it
  (denosumab, zoledronic acid, risedronate), minus every product an active safety block
  names (`safety.py`): a blocked drug is never suggested. `selectionBehavior: at-most-one`,
  because the products are alternatives. Its indicator is the assessment card's.
- **Safety cards** (`kind` safety), order-select only: one per draft MedicationRequest in
  `context.draftOrders` for a drug an active safety block names. These are the only
  `critical` cards: "critical" means the order being written conflicts with a
  contraindication the assessment found, not that the risk is high. They carry a
  suggestion to remove the draft order, and are never suppressed by feedback.

Every resource a suggestion creates is built with the fhir.resources R4B models (so it is
valid R4 before it leaves), is a draft, and names the rules and the ruleset behind it.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dateutil.relativedelta import relativedelta
from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.dosage import Dosage, DosageDoseAndRate
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.period import Period
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.servicerequest import ServiceRequest

from ..assessment import Assessment, Finding
from ..careplan import AI_STATUS_TEXT, CATEGORY_DISPLAY, Catalogue, ProductSpec, RecommendationEntry, build_resources, business_identifier
from ..errors import AiblError
from ..rulebook import Rulebook
from ..terminology import Terminology
from .fhirjson import as_json
from .safety import (
    ANTIRESORPTIVE_CLASSES,
    ActiveBlock,
    SafetyTable,
    active_blocks,
    blocks_for,
    medication_concepts,
    order_dose_mg,
    quantity_mg,
)
from .settings import Settings

SUMMARY_MAX = 140
SUGGESTION_SYSTEM = "urn:fhir-aibl:cds-suggestion"
TOPIC = {"system": "urn:fhir-aibl:cds-topic", "code": "aibl", "display": "Aromatase-inhibitor-associated bone loss"}

#: How bad a category is, for "unless the category worsens": an indeterminate category (the
#: DXA went missing or stale) ranks above low, because it means the reassurance of "low" no
#: longer holds.
CATEGORY_RANK = {"not-applicable": 0, "low": 1, "indeterminate": 2, "moderate": 3, "high": 4}
INDICATOR = {"high": "warning", "moderate": "warning", "low": "info", "indeterminate": "info"}

RISK_FACTOR_TEXT = {
    "age-over-65": "age over 65",
    "low-bmi": "low body-mass index (below 20)",
    "parental-hip-fracture": "parental hip fracture",
    "glucocorticoids": "oral glucocorticoids for more than 6 months",
    "smoking": "smoking (current or former)",
    "alcohol": "alcohol 3 or more units a day",
    "rheumatoid-arthritis": "rheumatoid arthritis",
    "hypogonadism-or-premature-menopause": "hypogonadism or premature menopause",
}
SITE_TEXT = {"LS": "lumbar spine", "TH": "total hip", "FN": "femoral neck", "FA": "forearm", "forearm": "forearm"}
#: Which recommendation the one-line summary names first: the most consequential action.
SUMMARY_PRIORITY = (
    # e2-monitor before potent-ar-osteoporosis: for a man on testosterone, reviewing the
    # anastrozole comes first (CLINICAL.md G27)
    "potent-ar", "e2-monitor", "potent-ar-osteoporosis", "switch-iv", "switch-iv-osteoporosis", "za-4mg-q6m", "oral-bp",
    "dmab-transition",
    "post-ai-continue", "dxa-now", "specialist", "complete-record",
    "dental-review", "secondary-causes", "dxa-12m", "dxa-12-24m", "dxa-24m",
)
_DOI = re.compile(r"doi:\s*(10\.\d{4,9}/[^\s;,]+[^\s;,.])", re.IGNORECASE)


@dataclass
class IssuedCard:
    card: dict[str, Any]
    kind: str  # assessment | treatment | safety
    suppressible: bool
    suggestion_ids: list[str] = field(default_factory=list)


def _summary(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1].rstrip() + "…"


def _code(text: str) -> str:
    return f"`{text}`"


def _refs(refs: Iterable[str]) -> str:
    refs = list(dict.fromkeys(refs))
    return ", ".join(_code(r) for r in refs) if refs else "none"


def _why(finding: Any, base: Iterable[str] = ()) -> str:
    """'*Why:* rules ...; evidence ...' for a finding, leaving out the rules of `base` (the
    category's or the AI status's chain, already shown above) so each line says what is its own."""
    if finding is None:
        return ""
    base = set(base)
    own = [r for r in finding.rules if r not in base]
    rules = ", ".join(own or finding.rules)
    also = " (after the rules above)" if own and len(own) < len(finding.rules) else ""
    return f"*Why:* rules {rules}{also}; evidence {_refs(finding.evidence)}."


def _json(resource: Any) -> dict:
    return as_json(resource)


def _uuid() -> str:
    return str(uuid.uuid4())


def _later(day: dt.date, value: float, unit: str) -> dt.date:
    whole = int(value)
    step = {"d": relativedelta(days=whole), "wk": relativedelta(weeks=whole), "mo": relativedelta(months=whole), "a": relativedelta(years=whole)}
    return day + step[unit]


def _by_priority(codes: Iterable[str]) -> list[str]:
    return sorted(codes, key=lambda c: (SUMMARY_PRIORITY.index(c) if c in SUMMARY_PRIORITY else 99, c))


class CardBuilder:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        safety: SafetyTable,
        terminology: Terminology,
        rulebook: Rulebook | None = None,
    ):
        self.settings = settings
        self.catalogue = catalogue
        self.safety = safety
        self.terminology = terminology
        self.rulebook = rulebook

    def _rule_text(self, finding: Finding) -> str | None:
        """The clinician text of the rule that produced a finding (the last of its chain that has one)."""
        if self.rulebook is None:
            return None
        for rule_id in reversed(finding.rules):
            try:
                detail = self.rulebook.rule(rule_id).detail
            except (KeyError, AiblError):
                continue
            if detail:
                return detail
        return None

    # -- public --------------------------------------------------------------------------
    def build(
        self,
        assessment: Assessment,
        *,
        draft_orders: Sequence[dict] = (),
        data_notes: Sequence[str] = (),
    ) -> list[IssuedCard]:
        if assessment.category == "not-applicable":
            return []
        blocks = active_blocks(self.safety, assessment, self._rule_text)
        cards: list[IssuedCard] = []
        for order in draft_orders:
            card = self._safety_card(assessment, order, blocks)
            if card is not None:
                cards.append(card)
        treatment, offered = self._treatment_card(assessment, blocks)
        cards.append(self._assessment_card(assessment, blocks, data_notes, offered))
        if treatment is not None:
            cards.append(treatment)
        return cards

    # -- shared parts ----------------------------------------------------------------------
    def _source(self) -> dict:
        source: dict[str, Any] = {"label": self.settings.source_label, "topic": dict(TOPIC)}
        if self.settings.source_url:
            source["url"] = self.settings.source_url
        return source

    def _links(self, codes: Iterable[str]) -> list[dict]:
        links = [{"label": link.label, "url": link.url, "type": "absolute"} for link in self.settings.links]
        seen = {link["url"] for link in links}
        for code in codes:
            entry = self.catalogue.recommendations.get(code) or self.catalogue.flags.get(code)
            for key in entry.citation if entry else ():
                text = self.catalogue.citations.get(key, "")
                match = _DOI.search(text)
                if not match:
                    continue
                url = f"https://doi.org/{match.group(1)}"
                if url not in seen:
                    seen.add(url)
                    label = text.split(".")[0]
                    links.append({"label": label[:100], "url": url, "type": "absolute"})
        return links

    def _override_reasons(self) -> list[dict]:
        return [reason.model_dump() for reason in self.settings.override_reasons]

    def _identifier(self, assessment: Assessment, *parts: str) -> Identifier:
        base = business_identifier(assessment).value
        return Identifier(system=SUGGESTION_SYSTEM, value="-".join((base, *parts)))

    def _provenance(self, assessment: Assessment, rules: Iterable[str]) -> str:
        return (
            f"Proposed by fhir-aibl (ruleset {assessment.ruleset.name}) for clinician review. "
            f"Rules: {', '.join(dict.fromkeys(rules)) or 'none recorded'}."
        )

    # -- the assessment card -----------------------------------------------------------------
    def _assessment_card(
        self, a: Assessment, blocks: list[ActiveBlock], data_notes: Sequence[str], offered: Sequence[str]
    ) -> IssuedCard:
        category = CATEGORY_DISPLAY[a.category]
        lead = next((c for c in SUMMARY_PRIORITY if c in a.recommendations), None) or next(iter(a.recommendations), None)
        status = "" if a.ai_status == "active" else f" (aromatase inhibitor {a.ai_status})"
        summary = f"AIBL bone-loss risk: {a.category}{status}"
        if lead:
            summary += f". {self.catalogue.recommendations[lead].title}"
        suggestions = [self._plan_suggestion(a)]
        dxa = self._dxa_suggestion(a)
        if dxa is not None:
            suggestions.append(dxa)
        card = {
            "uuid": _uuid(),
            "summary": _summary(summary),
            "indicator": INDICATOR[a.category],
            "detail": self._detail(a, category, blocks, data_notes, offered),
            "source": self._source(),
            "suggestions": suggestions,
            "selectionBehavior": "any",
            "overrideReasons": self._override_reasons(),
            "links": self._links([*a.recommendations, *a.flags]),
        }
        return IssuedCard(card, "assessment", suppressible=True, suggestion_ids=[s["uuid"] for s in suggestions])

    def _detail(
        self, a: Assessment, category: str, blocks: list[ActiveBlock], data_notes: Sequence[str], offered: Sequence[str]
    ) -> str:
        status = a.finding("ai-status", a.ai_status)
        status_rules = status.rules if status else ()
        lines = [
            f"**AIBL risk category: {category}** (aromatase inhibitor {AI_STATUS_TEXT[a.ai_status]}; "
            f"assessed as of {a.as_of.isoformat()})",
            "",
        ]
        cat = a.finding("category", a.category)
        cat_rules = cat.rules if cat else ()
        if cat is not None:
            lines += [f"*Why this category:* rules {', '.join(cat.rules)}; evidence {_refs(cat.evidence)}.", ""]
        if a.selected_t:
            t = a.selected_t[0]
            lines += [f"**T-score used:** {t.value:+.1f} at the {SITE_TEXT.get(t.site, t.site)} ({_refs(t.evidence)})", ""]
        else:
            lines += ["**T-score used:** none valid in the last 24 months", ""]
        if a.risk_factors:
            lines.append(f"**Risk factors ({len(a.risk_factors)}):**")
            for rf in a.risk_factors:
                lines.append(f"- {RISK_FACTOR_TEXT.get(rf, rf)}. {_why(a.finding('risk-factor', rf), status_rules)}")
        else:
            lines.append("**Risk factors:** none found")
        lines.append("")
        if a.recommendations:
            lines.append("**Recommendations:**")
            for code in _by_priority(a.recommendations):
                entry = self.catalogue.recommendations[code]
                why = _why(a.finding("recommendation", code), cat_rules)
                if code in offered:
                    # Its products are the suggestions of the treatment card, with the full text.
                    lines.append(f"- **{entry.title}** (`{code}`; options on the treatment card). {why}")
                else:
                    lines.append(f"- **{entry.title}** (`{code}`). {entry.text} {why}")
            lines.append("")
        if a.flags:
            lines.append("**Flags:**")
            for code in a.flags:
                entry = self.catalogue.flags.get(code)
                title, text, severity = (entry.title, entry.text, entry.severity) if entry else (code, "", "info")
                lines.append(f"- **{title}** (`{code}`, {severity}). {text} {_why(a.finding('flag', code), cat_rules)}")
            lines.append("")
        if blocks:
            lines.append("**Safety blocks (these drugs are not suggested):**")
            for item in blocks:
                lines.append(f"- `{item.id}`: {item.reason} {_why(item.finding, cat_rules)}")
            lines.append("")
        if data_notes:
            lines.append("**Data notes:**")
            lines += [f"- {note}" for note in data_notes]
            lines.append("")
        lines.append(f"*Ruleset `{a.ruleset.name}`. Proposals for clinician review: nothing has been ordered.*")
        return "\n".join(lines)

    def _plan_suggestion(self, a: Assessment) -> dict:
        risk, plan = build_resources(a, self.catalogue)
        plan_json = _json(plan)
        # The CarePlan points at its RiskAssessment by the urn:uuid of a transaction entry;
        # a suggestion creates resources one by one, so keep the logical reference
        # (type + business identifier) and drop the literal one nothing could resolve.
        for info in plan_json.get("supportingInfo", []):
            if str(info.get("reference", "")).startswith("urn:uuid:"):
                del info["reference"]
        return {
            "label": "Record the AIBL bone health plan (CarePlan and RiskAssessment)",
            "uuid": _uuid(),
            "isRecommended": True,
            "actions": [
                {
                    "type": "create",
                    "description": f"Record the AIBL risk assessment: {CATEGORY_DISPLAY[a.category]}",
                    "resource": _json(risk),
                },
                {
                    "type": "create",
                    "description": "Record the bone health care plan (draft, for clinician review)",
                    "resource": plan_json,
                },
            ],
        }

    def _dxa_suggestion(self, a: Assessment) -> dict | None:
        order = ("dxa-now", "dxa-12m", "dxa-12-24m", "dxa-24m")
        code = next((c for c in order if c in a.recommendations), None)
        if code is None:
            code = next((c for c in sorted(a.recommendations) if c.startswith("dxa-")), None)
        if code is None:
            return None
        entry = self.catalogue.recommendations[code]
        f = a.finding("recommendation", code)
        rules = f.rules if f else ()
        reasons = [r for r in (f.evidence if f else ()) if r.startswith(("Observation/", "Condition/"))]
        codings = [c.fhir() for c in entry.code] or [
            Coding(system="http://snomed.info/sct", code="312681000", display="Bone density scan")
        ]
        occurrence: dict[str, Any] = {}
        timing = entry.timing
        if timing is None or timing.value == 0:
            occurrence["occurrenceDateTime"] = a.as_of
        elif timing.max is not None:
            occurrence["occurrencePeriod"] = Period(
                start=_later(a.as_of, timing.value, timing.unit), end=_later(a.as_of, timing.max, timing.unit)
            )
        else:
            occurrence["occurrenceDateTime"] = _later(a.as_of, timing.value, timing.unit)
        request = ServiceRequest(
            identifier=[self._identifier(a, code)],
            status="draft",
            intent="order",
            code=CodeableConcept(coding=codings, text=entry.title),
            subject=Reference(reference=a.patient),
            reasonCode=[CodeableConcept(text=f"AIBL risk {a.category}: {entry.title}")],
            reasonReference=[Reference(reference=r) for r in dict.fromkeys(reasons)] or None,
            note=[Annotation(text=self._provenance(a, rules))],
            **occurrence,
        )
        return {
            "label": f"Order: {entry.title}",
            "uuid": _uuid(),
            "isRecommended": code == "dxa-now",
            "actions": [{"type": "create", "description": f"Order a bone density scan (DXA): {entry.title}", "resource": _json(request)}],
        }

    # -- the treatment card ----------------------------------------------------------------
    def _antiresorptive_products(self, entry: RecommendationEntry) -> list[ProductSpec]:
        out = []
        for product in entry.products:
            if product.code is None:
                continue
            concept = self.terminology.lookup("medications", product.code.system, product.code.code)
            if concept is not None and concept.get("class") in ANTIRESORPTIVE_CLASSES:
                out.append(product)
        return out

    def _treatment_card(self, a: Assessment, blocks: list[ActiveBlock]) -> tuple[IssuedCard | None, list[str]]:
        """The treatment card (or None) and the recommendations whose products it offers."""
        suggestions: list[dict] = []
        blocked_lines: list[str] = []
        offered_recs: list[str] = []
        products_offered: list[str] = []
        cat = a.finding("category", a.category)
        for code in _by_priority(a.recommendations):
            entry = self.catalogue.recommendations.get(code)
            if entry is None or entry.kind != "medication":
                continue
            products = self._antiresorptive_products(entry)
            if not products:
                continue
            f = a.finding("recommendation", code)
            for product in products:
                coding = product.code.model_dump()
                dose = quantity_mg(product.dose.value, product.dose.unit) if product.dose else None
                hits = blocks_for(blocks, self.terminology.match("medications", coding), coding, dose)
                if hits:
                    blocked_lines.append(
                        f"- {product.display} {product.dosage} is not offered: " + "; ".join(f"`{h.id}`: {h.reason}" for h in hits)
                    )
                    continue
                suggestions.append(self._medication_suggestion(a, code, entry, product, f.rules if f else ()))
                products_offered.append(product.display)
                if code not in offered_recs:
                    offered_recs.append(code)
        if not suggestions:
            return None, []
        check = " after the contraindication check" if "ci-check" in a.recommendations else ""
        lines = [f"**Antiresorptive options{check}** for AIBL risk {a.category}: choose at most one.", ""]
        for code in offered_recs:
            entry = self.catalogue.recommendations[code]
            why = _why(a.finding("recommendation", code), cat.rules if cat else ())
            lines.append(f"- **{entry.title}** (`{code}`). {entry.text} {why}")
        if "ci-check" in a.recommendations:
            ci = self.catalogue.recommendations.get("ci-check")
            if ci is not None:
                lines += ["", f"**{ci.title}:** {ci.text}"]
        if blocked_lines:
            lines += ["", "**Not offered (safety blocks):**", *blocked_lines]
        lines += ["", f"*Ruleset `{a.ruleset.name}`. Proposals for clinician review: nothing has been ordered.*"]
        names = " or ".join(dict.fromkeys(products_offered))
        card = {
            "uuid": _uuid(),
            "summary": _summary(f"AIBL risk {a.category}: antiresorptive options ({names})"),
            "indicator": INDICATOR[a.category],
            "detail": "\n".join(lines),
            "source": self._source(),
            "suggestions": suggestions,
            "selectionBehavior": "at-most-one",
            "overrideReasons": self._override_reasons(),
            "links": self._links(offered_recs),
        }
        return IssuedCard(card, "treatment", suppressible=True, suggestion_ids=[s["uuid"] for s in suggestions]), offered_recs

    def _medication_suggestion(
        self, a: Assessment, code: str, entry: RecommendationEntry, product: ProductSpec, rules: Sequence[str]
    ) -> dict:
        dose = [DosageDoseAndRate(doseQuantity=product.dose.fhir())] if product.dose else None
        request = MedicationRequest(
            identifier=[self._identifier(a, code, product.code.code)],
            status="draft",
            intent="order",
            medicationCodeableConcept=CodeableConcept(coding=[product.code.fhir()], text=product.display),
            subject=Reference(reference=a.patient),
            dosageInstruction=[Dosage(text=product.text, route=CodeableConcept(text=product.route), doseAndRate=dose)],
            reasonCode=[CodeableConcept(text=f"AIBL risk {a.category}: {entry.title}")],
            note=[Annotation(text=self._provenance(a, rules))],
        )
        check = " (after the contraindication check)" if "ci-check" in a.recommendations else ""
        return {
            "label": f"Order {product.display} {product.dosage} {product.route} {product.frequency}{check}",
            "uuid": _uuid(),
            "actions": [{"type": "create", "description": f"Draft order: {product.text}", "resource": _json(request)}],
        }

    # -- safety cards --------------------------------------------------------------------------
    def _safety_card(self, a: Assessment, order: dict, blocks: list[ActiveBlock]) -> IssuedCard | None:
        concepts = medication_concepts(self.terminology, order)
        hits = blocks_for(blocks, concepts, order.get("medicationCodeableConcept"), order_dose_mg(order))
        if not hits:
            return None
        drug = next((c.get("ingredient") for c in concepts if c.get("ingredient")), None) or (
            (order.get("medicationCodeableConcept") or {}).get("text") or "this drug"
        )
        drug = str(drug).replace("-", " ")
        lines = [f"**The draft order for {drug} conflicts with a contraindication found in the record.**", ""]
        for h in hits:
            lines.append(f"- `{h.id}`: {h.reason} {_why(h.finding)}")
        lines += ["", f"*Ruleset `{a.ruleset.name}`. AIBL risk category: {CATEGORY_DISPLAY[a.category]}.*"]
        suggestions = []
        rid = order.get("id")
        if isinstance(rid, str) and rid:
            suggestions.append(
                {
                    "label": f"Remove the draft {drug} order",
                    "uuid": _uuid(),
                    "isRecommended": True,
                    "actions": [
                        {"type": "delete", "description": f"Remove the draft {drug} order", "resourceId": f"MedicationRequest/{rid}"}
                    ],
                }
            )
        card: dict[str, Any] = {
            "uuid": _uuid(),
            "summary": _summary(f"Contraindicated: draft {drug} order ({hits[0].id})"),
            "indicator": "critical",
            "detail": "\n".join(lines),
            "source": self._source(),
            "overrideReasons": self._override_reasons(),
            "links": self._links(()),
        }
        if suggestions:
            card["suggestions"] = suggestions
            card["selectionBehavior"] = "any"
        return IssuedCard(card, "safety", suppressible=False, suggestion_ids=[s["uuid"] for s in suggestions])
