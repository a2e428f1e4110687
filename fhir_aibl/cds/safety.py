"""Safety blocks: what the assessment blocks, as drugs the cards can recognise (`safety.yaml`).

The rules decide what is contraindicated: the stage-7 gates of `rules/aibl.yaml` (docs/clinical-specification.md
K1) emit `blocked` findings naming an agent (`alendronate`, `zoledronic-acid-5mg`,
`all-antiresorptives`, ...) with the rules and evidence behind them. This module only
translates those agent names into drugs (`agents:` in the table: classes, ingredients or exact
codes of the `medications` value set, optionally a dose), so that

- a blocked drug is never offered as a MedicationRequest suggestion, and
- a draft order for a blocked drug (order-select) becomes a `critical` card.

Drugs are recognised through the value set, so a product, brand or ATC code of a blocked
ingredient is caught as well as the ingredient. An agent the table does not know blocks every
antiresorptive (safe side) and says so on the card: a new gate in the rules can never be
silently ignored here. `blocks:` adds blocks keyed on other findings (a flag or a
recommendation), for gates expressed that way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..assessment import Assessment, Finding
from ..errors import RulesError
from ..terminology import Concept, Terminology

DEFAULT_TABLE = Path(__file__).resolve().parent / "safety.yaml"
#: drug classes an "antiresorptive" suggestion can carry (medications value set)
ANTIRESORPTIVE_CLASSES = frozenset({"bisphosphonate", "denosumab"})
_UNITS_TO_MG = {"mg": 1.0, "g": 1000.0, "ug": 0.001, "mcg": 0.001}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeRef(_Model):
    system: str
    code: str


class Drugs(_Model):
    """A set of drugs: any of the classes, ingredients or exact codes; optionally only at these doses."""

    classes: tuple[str, ...] = ()
    ingredients: tuple[str, ...] = ()
    codes: tuple[CodeRef, ...] = ()
    dose_mg_min: float | None = Field(default=None, description="only doses of at least this many mg")
    dose_mg_max: float | None = Field(default=None, description="only doses of at most this many mg")
    display: str | None = Field(default=None, description="the drugs in words, for a clinician")
    reason: str | None = Field(default=None, description="the deciding value: a clinician_text placeholder such as {crcl}")
    limit: str | None = Field(default=None, description="the label's limit in one plain sentence")

    def words(self) -> str:
        """The drugs in words: `display`, else the ingredients and classes."""
        if self.display:
            return self.display
        names = [i.replace("-", " ") for i in self.ingredients] + [f"every {c}" for c in self.classes]
        return ", ".join(names) or "the drugs named by this check"


class Trigger(_Model):
    kind: Literal["flag", "recommendation", "blocked"]
    code: str


class Block(_Model):
    id: str
    when: tuple[Trigger, ...] = Field(min_length=1)
    blocks: Drugs
    reason: str = Field(min_length=1)


class SafetyTable(_Model):
    agents: dict[str, Drugs] = Field(default_factory=dict)
    blocks: tuple[Block, ...] = ()


UNKNOWN_AGENT = Drugs(
    classes=tuple(sorted(ANTIRESORPTIVE_CLASSES)),
    display="every bisphosphonate and denosumab",
    limit="A safety check found a problem this service cannot yet match to drugs: check kidney function, "
    "calcium and vitamin D before prescribing any antiresorptive.",
)


def load_safety_table(path: str | Path | None = None) -> SafetyTable:
    path = Path(path or DEFAULT_TABLE)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RulesError(f"cannot read the safety table: {exc}", source=str(path)) from exc
    try:
        table = SafetyTable.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise RulesError(f"invalid safety table: {problems}", source=str(path)) from exc
    ids = [b.id for b in table.blocks]
    if len(ids) != len(set(ids)):
        raise RulesError("safety table block ids must be unique", source=str(path))
    return table


@dataclass(frozen=True)
class ActiveBlock:
    """A block that applies to this assessment: what it blocks, why, and the finding behind it.

    `id` (the agent or block id) and `finding` (rules, evidence) are reviewer material; `reason`
    (a clinician_text template: the deciding value) and `drugs.words()`/`drugs.limit` are what a
    clinician reads. `known` is False for an agent the table does not name.
    """

    id: str
    drugs: Drugs
    reason: str
    finding: Finding
    known: bool = True


def active_blocks(table: SafetyTable, assessment: Assessment) -> list[ActiveBlock]:
    """Every block of this assessment: its `blocked` findings, then the table's other blocks."""
    out: list[ActiveBlock] = []
    for finding in assessment.findings_of("blocked"):
        drugs = table.agents.get(finding.code)
        if drugs is None:
            out.append(ActiveBlock(finding.code, UNKNOWN_AGENT, "", finding, known=False))
        else:
            out.append(ActiveBlock(finding.code, drugs, drugs.reason or "", finding))
    for block in table.blocks:
        for trigger in block.when:
            finding = assessment.finding(trigger.kind, trigger.code)
            if finding is not None:
                # A table block's reason is a whole sentence (no measured value): it is the limit.
                drugs = block.blocks if block.blocks.limit else block.blocks.model_copy(update={"limit": block.reason})
                out.append(ActiveBlock(block.id, drugs, block.blocks.reason or "", finding))
                break
    return out


def medication_concepts(terminology: Terminology, resource_or_codeable: Any) -> list[Concept]:
    """The medications value set concepts of a MedicationRequest (code or contained Medication) or CodeableConcept."""
    codeable: Any = resource_or_codeable
    if isinstance(resource_or_codeable, Mapping) and "resourceType" in resource_or_codeable:
        res = resource_or_codeable
        codeable = res.get("medicationCodeableConcept")
        if not codeable:
            reference = res.get("medicationReference")
            ref = str(reference.get("reference") or "").lstrip("#") if isinstance(reference, Mapping) else ""
            contained_list = res.get("contained") if isinstance(res.get("contained"), list) else []
            for contained in contained_list:
                if isinstance(contained, dict) and contained.get("resourceType") == "Medication" and contained.get("id") == ref:
                    parts = contained.get("ingredient") if isinstance(contained.get("ingredient"), list) else []
                    ingredients = [i.get("itemCodeableConcept") for i in parts if isinstance(i, dict)]
                    codeable = [contained.get("code")] + [i for i in ingredients if i]
    # Unvalidated input (draft orders): only codings with a text system and code are looked up.
    codings = [
        c for c in _codings(codeable) if isinstance(c.get("system"), str) and isinstance(c.get("code"), (str, int))
    ]
    return terminology.match("medications", [dict(c) for c in codings])


def order_dose_mg(order: Mapping[str, Any]) -> float | None:
    """The dose of a MedicationRequest in mg, if it states one in a mass unit."""
    # Draft orders are not validated and real ones bend the shape (the specification's own
    # order-select example has doseAndRate as an object): read defensively.
    for dosage in _as_list(order.get("dosageInstruction")):
        for rate in _as_list(dosage.get("doseAndRate")):
            quantity = rate.get("doseQuantity")
            if not isinstance(quantity, Mapping):
                continue
            value, unit = quantity.get("value"), str(quantity.get("code") or quantity.get("unit") or "").lower()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and unit in _UNITS_TO_MG:
                return float(value) * _UNITS_TO_MG[unit]
    return None


def _as_list(value: Any) -> list[Mapping[str, Any]]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, Mapping)]


def quantity_mg(value: float | None, unit: str | None) -> float | None:
    if value is None or (unit or "").lower() not in _UNITS_TO_MG:
        return None
    return float(value) * _UNITS_TO_MG[(unit or "").lower()]


def _codings(codeable: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(codeable, Mapping):
        if "coding" in codeable:
            return [c for c in codeable.get("coding") or [] if isinstance(c, Mapping)]
        return [codeable]
    if isinstance(codeable, list):
        return [c for item in codeable for c in _codings(item)]
    return []


def blocks_for(
    active: Iterable[ActiveBlock], concepts: Iterable[Concept], codeable: Any = None, dose_mg: float | None = None
) -> list[ActiveBlock]:
    """The active blocks that name this drug (by class, ingredient or exact code, at this dose)."""
    concepts = list(concepts)
    codes = {(c.get("system"), str(c.get("code"))) for c in _codings(codeable)}
    hits: list[ActiveBlock] = []
    for item in active:
        drugs = item.drugs
        named = (
            any(c.get("class") in drugs.classes for c in concepts)
            or any(c.get("ingredient") in drugs.ingredients for c in concepts)
            or any((ref.system, ref.code) in codes for ref in drugs.codes)
        )
        if not named:
            continue
        # A drug whose dose is not stated is named whatever the range: the safe side.
        if dose_mg is not None and (
            (drugs.dose_mg_min is not None and dose_mg < drugs.dose_mg_min)
            or (drugs.dose_mg_max is not None and dose_mg > drugs.dose_mg_max)
        ):
            continue
        hits.append(item)
    return hits
