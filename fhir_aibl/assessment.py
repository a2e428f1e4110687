"""The assessment of one patient: the output contract of docs/clinical-specification.md section 0.

`Assessment.contract()` gives exactly the contract fields (what
`fhir-aibl assess --format json` prints): the eight of the specification, then `dxa_dates`
(added for the population report, docs/report.md: the dates of the usable DXA results on record). The model carries more beside them,
for the CarePlan, the cards and a reviewer: the reference date, the ruleset that
decided, the selected T-score and, for every output item, the rule ids that
produced it and the FHIR references those rules used (`findings`).
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

AIStatus = Literal["active", "planned", "stopped", "none"]
Category = Literal["high", "moderate", "low", "indeterminate", "not-applicable"]

# The order in which the contract lists risk factors (docs/clinical-specification.md RF0).
RISK_FACTOR_ORDER = (
    "age-over-65",
    "low-bmi",
    "parental-hip-fracture",
    "glucocorticoids",
    "smoking",
    "alcohol",
    "rheumatoid-arthritis",
    "hypogonadism-or-premature-menopause",
)

#: Data flags about how the patient's medications were read (docs/medications.md). Raised
#: whatever the AI status, so a patient whose drug cannot be read is never silently "none".
MEDICATION_FLAGS = (
    "medication-unresolved",  # a medicationReference resolved to nothing readable, or a medication entry left
    # out as unreadable (ai_status stays as read)
    "medication-by-text",  # an aromatase inhibitor recognised only by its name: assessed as on it
)

CONTRACT_FIELDS = (
    "patient",
    "ai_status",
    "category",
    "risk_factors",
    "recommendations",
    "flags",
    "rules",
    "evidence",
    # Added after the eight above (additive: none of them changed): the dates of the patient's
    # usable DXA results on record, YYYY-MM-DD, ascending; what the population report's DXA
    # coverage over time is drawn from (docs/report.md).
    "dxa_dates",
)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RulesetInfo(_Frozen):
    """Which rules decided: every output carries this."""

    name: str = Field(description="durable_rules ruleset name: id, version and content hash")
    id: str
    version: str
    content_hash: str = Field(description="sha256 of the rule file and its value sets, first 12 hex digits")
    boundary_mode: str = "default"


class Finding(_Frozen):
    """One output item and why it is there."""

    kind: str = Field(description="ai-status, category, risk-factor, recommendation, flag, risk-tool, selected-t, indication, audit")
    code: str
    rules: tuple[str, ...] = Field(description="ids of the rules that asserted it")
    evidence: tuple[str, ...] = Field(description="FHIR references, with _history/<version> where known")
    detail: str | None = Field(default=None, description="a sentence for a clinician, where the rule file gives one")
    value: float | None = Field(default=None, description="flags and risk tools: the number the item is about (a FRAX probability in percent, a score)")
    date: dt.date | None = Field(default=None, description="flags and risk tools: the date the item is about (the DXA on record, the risk tool's result)")


class SelectedT(_Frozen):
    """The score rule B1 selected: the lowest valid axial T-score (else forearm), or Z-score where B1 uses Z."""

    score: Literal["T", "Z"] = "T"
    site: str
    value: float
    evidence: tuple[str, ...]


class Assessment(_Frozen):
    patient: str = Field(description="Patient/<id>")
    ai_status: AIStatus
    category: Category
    risk_factors: tuple[str, ...]
    recommendations: tuple[str, ...]
    flags: tuple[str, ...]
    rules: tuple[str, ...]
    evidence: tuple[str, ...]
    dxa_dates: tuple[dt.date, ...] = Field(
        default=(), description="the dates of the usable DXA results on record (on or before as_of), ascending"
    )
    # Beyond the contract.
    as_of: dt.date
    ruleset: RulesetInfo
    findings: tuple[Finding, ...] = ()
    selected_t: tuple[SelectedT, ...] = ()

    def contract(self) -> dict:
        """Exactly the fields of the output contract, JSON-ready."""
        data = self.model_dump(mode="json", include=set(CONTRACT_FIELDS))
        return {name: data[name] for name in CONTRACT_FIELDS}

    def explained(self) -> dict:
        """The contract plus the reference date, the ruleset and every finding."""
        data = self.contract()
        data["as_of"] = self.as_of.isoformat()
        data["ruleset"] = self.ruleset.model_dump(mode="json")
        data["selected_t"] = [s.model_dump(mode="json") for s in self.selected_t]
        data["findings"] = [f.model_dump(mode="json", exclude_none=True) for f in self.findings]
        return data

    def findings_of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def finding(self, kind: str, code: str) -> Finding | None:
        for f in self.findings:
            if f.kind == kind and f.code == code:
                return f
        return None
