"""Assessment -> CDS Hooks 2.0 cards, one per decision, in the clinician layer of text.

Which cards, and why:

- **No card** when the category is `not-applicable` (not on, or no longer on, an aromatase
  inhibitor): the service has nothing to say about AIBL then.
- **The assessment card** (`kind` assessment): the category with the values that decided it
  (the T-score with its site and date, the risk factors in words), the actions, the drugs the
  safety checks rule out with the measured value and its date, and the data notes that change
  what to do. Indicator `warning` for high and moderate risk, `info` for low and
  indeterminate. Suggestions: record the bone health plan (a RiskAssessment and a CarePlan,
  from `careplan.py`), and, when a DXA is recommended, a ServiceRequest for it dated by the
  catalogue's timing. `selectionBehavior: any`: both may be taken.
- **The treatment card** (`kind` treatment), when a recommendation proposes an
  antiresorptive: why (with its citation), the checks before the first dose, and one
  MedicationRequest suggestion per product the catalogue lists, minus every product an active
  safety block names (`safety.py`): a blocked drug is never suggested. `selectionBehavior:
  at-most-one`, because the products are alternatives.
- **Safety cards** (`kind` safety), order-select only: one per draft MedicationRequest in
  `context.draftOrders` for a drug an active safety block names, with the measured value and
  its date and the label's limit. These are the only `critical` cards. They carry a suggestion
  to remove the draft order, and are never suppressed by feedback.

Every string a clinician reads comes from `clinician_text.py` (the catalogue's `clinician`
fields, the safety table's `display`/`reason`/`limit`): no rule ids, resource references,
catalogue codes or specification references, and no paragraph is repeated across the cards of
one answer. Reviewer material (rules, ruleset) travels in the suggested resources' structured
fields (`careplan.py`'s extensions) and in the write-back's Provenance; integration notes (prefetched resources
about another patient, resources that failed validation) go to the log, never to a card.

Every resource a suggestion creates is built with the fhir.resources R4B models (so it is
valid R4 before it leaves) and is a draft.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
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

from ..assessment import Assessment
from ..careplan import Catalogue, ProductSpec, RecommendationEntry, build_resources, business_identifier, rule_extensions
from ..clinician_text import CATEGORY_WORDS, ClinicianText, PatientValues, capitalised, fill, joined, split_notes
from ..facts import FactSet
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

log = logging.getLogger("fhir_aibl.cds")

SUMMARY_MAX = 140
#: The target length of the assessment card's detail (Markdown characters): readable without
#: scrolling in a 700 px card column. tests/cds/test_cards.py holds every worked example to it.
DETAIL_TARGET = 600
SUGGESTION_SYSTEM = "urn:fhir-aibl:cds-suggestion"
TOPIC = {"system": "urn:fhir-aibl:cds-topic", "code": "aibl", "display": "Aromatase-inhibitor-associated bone loss"}
#: Where fhir-aibl serve answers the SMART EHR launch of the bone-health view (fhir_aibl/view/routes.py).
SMART_LAUNCH_PATH = "/app/launch"
NOTE = "Proposed by the AIBL bone health service for clinician review; nothing has been ordered."

#: How bad a category is, for "unless the category worsens": an indeterminate category (the
#: DXA went missing or stale) ranks above low, because it means the reassurance of "low" no
#: longer holds.
CATEGORY_RANK = {"not-applicable": 0, "low": 1, "indeterminate": 2, "moderate": 3, "high": 4}
INDICATOR = {"high": "warning", "moderate": "warning", "low": "info", "indeterminate": "info"}

#: Which recommendation the one-line summary names first: the most consequential action.
SUMMARY_PRIORITY = (
    # e2-monitor before potent-ar-osteoporosis: for a man on testosterone, reviewing the
    # anastrozole comes first
    "potent-ar", "e2-monitor", "potent-ar-osteoporosis", "switch-iv", "switch-iv-osteoporosis", "za-4mg-q6m", "oral-bp",
    "dmab-transition", "post-ai-continue", "dxa-now", "dxa-obtain-result", "specialist", "complete-record",
    "dental-review", "secondary-causes", "post-ai", "adherence", "dxa-12m", "dxa-12-24m", "dxa-24m",
)
#: Advice for everyone on an aromatase inhibitor: one short line on the card, not a bullet each.
GENERAL = {"ca-vitd": "calcium and vitamin D", "exercise": "exercise", "btm-optional": None}
#: Checks before the first dose: on the treatment card when there is one, else on the main card.
CHECKS = ("ci-check", "dental-review")
#: Flags whose message is the safety line's (the drugs ruled out, with the value): not repeated.
SAFETY_FLAGS = frozenset({"crcl-below-35", "crcl-below-30", "denosumab-ckd-mbd", "hypocalcaemia", "vitamin-d-repletion"})
#: The service's validation note (app.py): the one integration note that also changes the decision.
_INVALID = re.compile(r"^(\d+) resource\(s\) failed FHIR R4 validation and were not used")
_PARTLY = re.compile(r"^(\d+) resource\(s\) failed FHIR R4 validation and were read without")
_REF = re.compile(r"\b[A-Z][A-Za-z]+/[A-Za-z0-9\-.]+(?:/_history/[A-Za-z0-9\-.]+)?")


@dataclass
class IssuedCard:
    card: dict[str, Any]
    kind: str  # assessment | treatment | safety
    suppressible: bool
    suggestion_ids: list[str] = field(default_factory=list)


def _summary(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SUMMARY_MAX else text[: SUMMARY_MAX - 1].rstrip() + "…"


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


def _sentence(text: str) -> str:
    return capitalised(text.strip())


@dataclass
class _Context:
    """One build: the assessment, its clinician text, its safety blocks."""

    assessment: Assessment
    text: ClinicianText
    blocks: list[ActiveBlock]

    def ruled_out(self, blocks: Iterable[ActiveBlock] | None = None) -> list[str]:
        """'alendronate and zoledronic acid 5 mg (creatinine clearance 32 mL/min on 12 Feb 2026)', one per deciding value."""
        groups: dict[str, list[str]] = {}
        for block in self.blocks if blocks is None else blocks:
            value = fill(block.reason, self.text.values.phrases()) if block.reason else ""
            words = block.drugs.words()
            names = groups.setdefault(value, [])
            if words not in names:
                names.append(words)
        return [f"{joined(names)} ({value})" if value else joined(names) for value, names in groups.items()]


class CardBuilder:
    def __init__(
        self,
        settings: Settings,
        catalogue: Catalogue,
        safety: SafetyTable,
        terminology: Terminology,
        rulebook: Rulebook | None = None,
        view_link: Callable[[Assessment], dict | None] | None = None,
    ):
        self.settings = settings
        self.catalogue = catalogue
        self.safety = safety
        self.terminology = terminology
        self.rulebook = rulebook
        #: The slot for a later view of the patient (a SMART app link): called per assessment,
        #: returns a CDS Hooks link ({label, url, type, appContext?}) or None.
        self.view_link = view_link if view_link is not None else self._smart_link

    # -- public --------------------------------------------------------------------------
    def build(
        self,
        assessment: Assessment,
        *,
        draft_orders: Sequence[dict] = (),
        data_notes: Sequence[str] = (),
        facts: FactSet | None = None,
        resources: Iterable[dict] | None = None,
    ) -> list[IssuedCard]:
        """The cards of one assessment. `data_notes` are integration notes (prefetch, validation):
        logged, never shown. `facts` and `resources` give the values and dates the text names."""
        values = PatientValues(assessment, facts, resources)
        notes, for_log = split_notes(facts.problems if facts else (), values)
        for note in data_notes:
            # Resources the rules would read that failed validation were not used: that changes
            # what the record says, so the clinician hears how many (never which, nor why).
            invalid = _INVALID.match(note)
            if invalid and "record-unreadable" not in assessment.flags:  # else the flag's own text says it
                n = int(invalid.group(1))
                notes.append(f"{n} result{'s' if n > 1 else ''} on record could not be read and "
                             f"{'were' if n > 1 else 'was'} not used: check the chart.")
            partly = _PARTLY.match(note)
            if partly:
                n = int(partly.group(1))
                notes.append(f"{n} entr{'ies' if n > 1 else 'y'} on record could be read only in part; "
                             f"the rest was used: check the chart.")
        self._log(assessment, [*data_notes, *for_log])
        if assessment.category == "not-applicable":
            # Not on an aromatase inhibitor as far as can be read; but a medication that could
            # not be read may be one: say so rather than stay silent.
            if "medication-unresolved" in assessment.flags:
                return [self._unread_medication_card(_Context(assessment, ClinicianText(self.catalogue, values), []))]
            return []
        blocks = active_blocks(self.safety, assessment)
        for block in blocks:
            if not block.known:
                log.warning("safety table names no drugs for the blocked agent %r: every antiresorptive is held", block.id)
        ctx = _Context(assessment, ClinicianText(self.catalogue, values), blocks)
        cards: list[IssuedCard] = []
        for order in draft_orders:
            card = self._safety_card(ctx, order)
            if card is not None:
                cards.append(card)
        treatment, offered, held = self._treatment_card(ctx)
        cards.append(self._assessment_card(ctx, notes, offered, held, treatment is not None))
        if treatment is not None:
            cards.append(treatment)
        return cards

    def _log(self, assessment: Assessment, notes: Sequence[str]) -> None:
        for note in notes:
            if self.settings.log_patient_data:
                log.warning("%s: %s", assessment.patient, note)
            else:  # the kind of resource, not which one
                log.warning("data note: %s", _REF.sub(lambda m: m.group(0).split("/")[0], note))

    # -- shared parts ----------------------------------------------------------------------
    def _smart_link(self, assessment: Assessment) -> dict | None:
        """The bone-health view as a SMART app (fhir_aibl/view): the EHR launches it with `iss` and
        `launch`. Without a configured public URL the path is made absolute per request
        (`fill_service_urls`)."""
        if assessment.category == "not-applicable" and not assessment.recommendations:
            return None
        base = (self.settings.public_base_url or "").rstrip("/")
        return {"label": "Open the bone-health view (DXA trend)", "url": f"{base}{SMART_LAUNCH_PATH}", "type": "smart"}

    def _source(self) -> dict:
        source: dict[str, Any] = {"label": self.settings.source_label, "topic": dict(TOPIC)}
        url = self.settings.source_url or (
            f"{self.settings.public_base_url.rstrip('/')}/about" if self.settings.public_base_url else None
        )
        if url:
            source["url"] = url
        return source

    def _links(self, ctx: _Context, codes: Iterable[str]) -> list[dict]:
        links = []
        view = self.view_link(ctx.assessment) if self.view_link else None
        if view:
            links.append(dict(view))
        links += [{"label": link.label, "url": link.url, "type": "absolute"} for link in self.settings.links]
        seen = {link["url"] for link in links}
        for cite in ctx.text.citations(codes):
            if cite.url and cite.url not in seen:
                seen.add(cite.url)
                links.append({"label": cite.text[:100], "url": cite.url, "type": "absolute"})
        return links

    def _override_reasons(self) -> list[dict]:
        return [reason.model_dump() for reason in self.settings.override_reasons]

    def _identifier(self, assessment: Assessment, *parts: str) -> Identifier:
        base = business_identifier(assessment).value
        return Identifier(system=SUGGESTION_SYSTEM, value="-".join((base, *parts)))

    def _unread_medication_card(self, ctx: _Context) -> IssuedCard:
        """A patient with no readable aromatase inhibitor, but a medication that could not be
        read: it may be one, so the clinician is told rather than shown nothing."""
        entry = self.catalogue.flags["medication-unresolved"]
        card = {
            "uuid": _uuid(),
            "summary": _summary(f"{entry.title}: check for an aromatase inhibitor"),
            "indicator": "warning",
            "detail": ctx.text.sentence("medication-unresolved"),
            "source": self._source(),
            "links": self._links(ctx, ["medication-unresolved"]),
        }
        return IssuedCard(card, "assessment", suppressible=True)

    # -- the assessment card -----------------------------------------------------------------
    def _assessment_card(
        self, ctx: _Context, notes: Sequence[str], offered: Sequence[str], held: Sequence[str], has_treatment: bool
    ) -> IssuedCard:
        a = ctx.assessment
        lead = next((c for c in SUMMARY_PRIORITY if c in a.recommendations), None)
        summary = CATEGORY_WORDS[a.category] + (
            " on an aromatase inhibitor" if a.ai_status == "active" else f", aromatase inhibitor {a.ai_status}"
        )
        if a.selected_t:
            summary += f" ({a.selected_t[0].score}-score {a.selected_t[0].value:.1f})"
        if lead:
            title = self.catalogue.recommendations[lead].title
            summary += ": " + (title[0].lower() + title[1:] if title[1:2].islower() else title)
        suggestions = [self._plan_suggestion(ctx)]
        dxa = self._dxa_suggestion(ctx)
        if dxa is not None:
            suggestions.append(dxa)
        card = {
            "uuid": _uuid(),
            "summary": _summary(summary),
            "indicator": INDICATOR[a.category],
            "detail": self._detail(ctx, notes, offered, held, has_treatment),
            "source": self._source(),
            "suggestions": suggestions,
            "selectionBehavior": "any",
            "overrideReasons": self._override_reasons(),
            # The citations of the drugs are on the treatment card; these are the rest.
            "links": self._links(ctx, [*(c for c in _by_priority(a.recommendations) if c not in offered), *a.flags]),
        }
        return IssuedCard(card, "assessment", suppressible=True, suggestion_ids=[s["uuid"] for s in suggestions])

    def _detail(
        self, ctx: _Context, notes: Sequence[str], offered: Sequence[str], held: Sequence[str], has_treatment: bool
    ) -> str:
        """The main card's detail: the fullest version that fits DETAIL_TARGET, shortening in
        steps (flag reasons, then flags' values in words) so that the deciding values and every
        action stay; the headline, the safety line and the data notes are never dropped."""
        text = None
        for level in range(3):
            text = self._detail_at(ctx, notes, offered, held, has_treatment, level)
            if len(text) <= DETAIL_TARGET:
                break
        return text

    def _detail_at(
        self, ctx: _Context, notes: Sequence[str], offered: Sequence[str], held: Sequence[str], has_treatment: bool, level: int
    ) -> str:
        a, text = ctx.assessment, ctx.text
        paragraphs = [text.values.headline()]
        bullets: list[str] = []
        general: list[str] = []
        for code in _by_priority(a.recommendations):
            entry = self.catalogue.recommendations[code]
            if code in GENERAL:
                if GENERAL[code]:
                    general.append(GENERAL[code])
                continue
            if has_treatment and code in CHECKS:
                continue  # on the treatment card, with the drugs they are for
            if code in offered:
                bullets.append(f"{entry.title}: choose on the next card.")
            elif code in held:
                bullets.append(f"{entry.title}: every option is ruled out for now (below)." if level == 0 else f"{entry.title}: ruled out for now.")
            else:
                bullets.append(text.action(code) if level == 0 else entry.title + ".")
        for code in a.flags:
            entry = self.catalogue.flags.get(code)
            if entry is None or entry.severity != "warning" or (code in SAFETY_FLAGS and ctx.blocks):
                continue
            bullets.append(text.sentence(code) if level < 2 else text.action(code))
        ruled_out = ctx.ruled_out()
        if ruled_out:
            bullets.append("**Ruled out by the safety checks:** " + "; ".join(ruled_out) + ".")
        bullets += notes
        if bullets:
            paragraphs.append("\n".join(f"- {b}" for b in dict.fromkeys(bullets)))
        if general:
            paragraphs.append(f"Also: {', '.join(general)}.")
        return "\n\n".join(paragraphs)

    def _plan_suggestion(self, ctx: _Context) -> dict:
        a = ctx.assessment
        risk, plan = build_resources(a, self.catalogue, values=ctx.text.values)
        plan_json = _json(plan)
        # The CarePlan points at its RiskAssessment by the urn:uuid of a transaction entry;
        # a suggestion creates resources one by one, so keep the logical reference
        # (type + business identifier) and drop the literal one nothing could resolve.
        for info in plan_json.get("supportingInfo", []):
            if str(info.get("reference", "")).startswith("urn:uuid:"):
                del info["reference"]
        return {
            "label": "Record the bone health plan",
            "uuid": _uuid(),
            "isRecommended": True,
            "actions": [
                {
                    "type": "create",
                    "description": f"Record the bone-loss risk assessment: {CATEGORY_WORDS[a.category]}",
                    "resource": _json(risk),
                },
                {
                    "type": "create",
                    "description": "Record the bone health care plan (draft, for clinician review)",
                    "resource": plan_json,
                },
            ],
        }

    def _dxa_suggestion(self, ctx: _Context) -> dict | None:
        a = ctx.assessment
        order = ("dxa-now", "dxa-12m", "dxa-12-24m", "dxa-24m")
        code = next((c for c in order if c in a.recommendations), None)
        if code is None:
            # not dxa-obtain-result: a DXA is already done or ordered, its report is obtained, not a new scan ordered
            code = next((c for c in sorted(a.recommendations) if c.startswith("dxa-") and c != "dxa-obtain-result"), None)
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
            extension=rule_extensions(a, rules),
            status="draft",
            intent="order",
            code=CodeableConcept(coding=codings, text=entry.title),
            subject=Reference(reference=a.patient),
            reasonCode=[CodeableConcept(text=_sentence(ctx.text.sentence(code)))],
            reasonReference=[Reference(reference=r) for r in dict.fromkeys(reasons)] or None,
            note=[Annotation(text=NOTE)],
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

    def _treatment_card(self, ctx: _Context) -> tuple[IssuedCard | None, list[str], list[str]]:
        """The treatment card (or None), the recommendations whose products it offers, and those
        whose every product the safety checks rule out."""
        a = ctx.assessment
        suggestions: list[dict] = []
        not_offered: list[ActiveBlock] = []
        offered_recs: list[str] = []
        held_recs: list[str] = []
        products_offered: list[str] = []
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
                hits = blocks_for(ctx.blocks, self.terminology.match("medications", coding), coding, dose)
                if hits:
                    not_offered.extend(h for h in hits if h not in not_offered)
                    continue
                suggestions.append(self._medication_suggestion(ctx, code, entry, product, f.rules if f else ()))
                products_offered.append(product.display)
                if code not in offered_recs:
                    offered_recs.append(code)
            if code not in offered_recs:
                held_recs.append(code)
        if not suggestions:
            return None, [], held_recs
        checks = [c for c in CHECKS if c in a.recommendations]
        names = joined(list(dict.fromkeys(products_offered)), "or")
        lines = [f"**Choose at most one: {names}**" + (", after the checks below." if checks else ".")]
        for code in offered_recs:
            why = ctx.text.why(code)
            if why:
                lines.append(_sentence(why) + (" " if why.endswith(".") else ". ") + self._cite(ctx, code))
        if checks:
            lines.append("\n".join(f"- {ctx.text.action(c)}" for c in checks))
        if not_offered:
            lines.append("Not offered: " + "; ".join(ctx.ruled_out(not_offered)) + ".")
        card = {
            "uuid": _uuid(),
            "summary": _summary(f"Bone protection, {CATEGORY_WORDS[a.category][0].lower()}{CATEGORY_WORDS[a.category][1:]}: {names}"),
            "indicator": INDICATOR[a.category],
            "detail": "\n\n".join(lines),
            "source": self._source(),
            "suggestions": suggestions,
            "selectionBehavior": "at-most-one",
            "overrideReasons": self._override_reasons(),
            "links": self._links(ctx, offered_recs),
        }
        issued = IssuedCard(card, "treatment", suppressible=True, suggestion_ids=[s["uuid"] for s in suggestions])
        return issued, offered_recs, held_recs

    def _cite(self, ctx: _Context, code: str) -> str:
        cites = ctx.text.citations([code])
        return f"({'; '.join(c.markdown() for c in cites[:2])})" if cites else ""

    def _medication_suggestion(
        self, ctx: _Context, code: str, entry: RecommendationEntry, product: ProductSpec, rules: Sequence[str]
    ) -> dict:
        a = ctx.assessment
        dose = [DosageDoseAndRate(doseQuantity=product.dose.fhir())] if product.dose else None
        request = MedicationRequest(
            identifier=[self._identifier(a, code, product.code.code)],
            extension=rule_extensions(a, rules),
            status="draft",
            intent="order",
            medicationCodeableConcept=CodeableConcept(coding=[product.code.fhir()], text=product.display),
            subject=Reference(reference=a.patient),
            dosageInstruction=[Dosage(text=product.text, route=CodeableConcept(text=product.route), doseAndRate=dose)],
            reasonCode=[CodeableConcept(text=f"{CATEGORY_WORDS[a.category]} on an aromatase inhibitor: {entry.title}")],
            note=[Annotation(text=NOTE)],
        )
        check = " (after the contraindication check)" if any(c in a.recommendations for c in CHECKS) else ""
        return {
            "label": f"Order {product.display} {product.dosage} {product.route} {product.frequency}{check}",
            "uuid": _uuid(),
            "actions": [{"type": "create", "description": f"Draft order: {product.text}", "resource": _json(request)}],
        }

    # -- safety cards --------------------------------------------------------------------------
    def _safety_card(self, ctx: _Context, order: dict) -> IssuedCard | None:
        concepts = medication_concepts(self.terminology, order)
        hits = blocks_for(ctx.blocks, concepts, order.get("medicationCodeableConcept"), order_dose_mg(order))
        if not hits:
            return None
        drug = next((c.get("ingredient") for c in concepts if c.get("ingredient")), None) or (
            (order.get("medicationCodeableConcept") or {}).get("text") or "this drug"
        )
        drug = str(drug).replace("-", " ")
        phrases = ctx.text.values.phrases()
        lines = [f"**Do not give {drug}: the record rules it out.**"]
        for h in hits:
            value = fill(h.reason, phrases) if h.reason else ""
            limit = h.drugs.limit or ""
            line = " ".join(x for x in (limit, f"This patient: {value}." if value else "") if x)
            if line and line not in lines:
                lines.append(line)
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
        first = fill(hits[0].reason, phrases) if hits[0].reason else ""
        card: dict[str, Any] = {
            "uuid": _uuid(),
            "summary": _summary(f"Contraindicated: draft {drug} order" + (f" ({first})" if first else "")),
            "indicator": "critical",
            "detail": "\n\n".join(lines),
            "source": self._source(),
            "overrideReasons": self._override_reasons(),
            "links": self._links(ctx, ()),
        }
        if suggestions:
            card["suggestions"] = suggestions
            card["selectionBehavior"] = "any"
        return IssuedCard(card, "safety", suppressible=False, suggestion_ids=[s["uuid"] for s in suggestions])


def fill_service_urls(cards: Iterable[dict], base_url: str) -> None:
    """Give every card without a source url the service's own about page (`base_url` + about),
    and make the SMART link to the bone-health view absolute when no public URL is configured."""
    base = base_url.rstrip("/")
    for card in cards:
        card.get("source", {}).setdefault("url", base + "/about")
        for link in card.get("links", ()):
            if link.get("type") == "smart" and link.get("url", "").startswith("/"):
                link["url"] = base + link["url"]
