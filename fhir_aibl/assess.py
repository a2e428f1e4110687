"""One patient's resources -> Assessment: facts, then the engine, then the output contract.

`Assessor` holds what is loaded once per process (value sets, the rulebook, the
engine) and is safe to share between threads: fact extraction is pure and the
engine serialises its own calls.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .assessment import RISK_FACTOR_ORDER, Assessment, Finding, RulesetInfo, SelectedT
from .engine import Derivation, Engine
from .errors import AiblError, EvaluationError, NoUsableDataError, PatientMissingError
from .facts import FactSet, extract_facts
from .resources import RulesetPaths, ruleset_paths, shipped_rules_dir
from .rulebook import Rulebook, load_rulebook
from .sources import PatientRecord
from .terminology import Terminology

RULES_DIR = shipped_rules_dir()
DEFAULT_RULES = RULES_DIR / "aibl.yaml"


def default_rules_path() -> Path:
    """The shipped rule file (package data: `rules/aibl.yaml` of the repository)."""
    return DEFAULT_RULES


@dataclass
class Result:
    assessment: Assessment
    facts: FactSet

    @property
    def patient_missing(self) -> bool:
        """No usable Patient resource: assessed with age and sex unknown (rule AGE-UNKNOWN)."""
        return any(f["t"] == "patient" and f.get("record") == "missing" for f in self.facts.facts)


PATIENT_MISSING = (
    "no usable Patient resource (absent, not found, or invalid): assessed with age and sex unknown, "
    "flagged age-unknown, never low"
)


class Assessor:
    def __init__(self, rules_path: Path | None = None, valuesets_dir: Path | None = None, mode: str = "default"):
        # rules_path: a rule file or a folder holding aibl.yaml; its value sets and catalogue
        # are beside it (fhir_aibl.resources.ruleset_paths); None: the shipped ruleset.
        self.paths: RulesetPaths = ruleset_paths(rules_path)
        rules_path = self.paths.rules
        self.terminology = Terminology.load(valuesets_dir or self.paths.valuesets)
        # The content hash covers the rule file, the value sets and the clinician-facing
        # catalogue, so that any change to what a patient is told changes the ruleset name.
        catalogue = self.paths.catalogue
        extra = self.terminology.content_hash + (hashlib.sha256(catalogue.read_bytes()).hexdigest() if catalogue.exists() else "")
        self.rulebook: Rulebook = load_rulebook(rules_path, extra_hash=extra, mode=mode)
        self.engine = Engine(self.rulebook)
        self.ruleset_info = RulesetInfo(
            name=self.rulebook.name,
            id=self.rulebook.id,
            version=self.rulebook.version,
            content_hash=self.rulebook.content_hash,
            boundary_mode=self.rulebook.boundary_mode,
        )

    def assess(
        self, patient_ref: str, resources: Iterable[Mapping[str, Any]], as_of: dt.date, unreadable: Iterable[str] = ()
    ) -> Result:
        """`unreadable`: `Type/id` of the patient's resources left out as unreadable (facts.extract_facts)."""
        facts = extract_facts(patient_ref, resources, as_of, self.terminology, unreadable)
        derivation = self.engine.evaluate(facts.facts)
        assessment = build_assessment(patient_ref, as_of, derivation, self.rulebook, self.ruleset_info, facts.dxa_dates)
        return Result(assessment, facts)


def assess_record(assessor: Assessor, record: PatientRecord, as_of: dt.date) -> Result:
    """One reader record, assessed; an `AiblError` names the record's files and patient.

    A record with nothing the rules can read is a `NoUsableDataError`, not an assessment.
    The one definition of what a run does with a record, whichever process runs it.
    """
    source = ", ".join(record.sources)
    try:
        result = assessor.assess(record.patient_ref, record.resources, as_of, record.unreadable)
    except AiblError as exc:
        exc.source = exc.source or source
        exc.resource = exc.resource or record.patient_ref
        raise
    if not result.facts.facts:
        raise NoUsableDataError(
            "nothing to assess: no Patient and no recognised Observation, medication or Condition",
            source=source,
            resource=record.patient_ref,
        )
    return result


def record_problems(result: Result, record: PatientRecord) -> list[AiblError]:
    """What a run must report of an assessed record although it was assessed: a record without a
    usable Patient (age unknown) is printed and named as an error (exit 1), whichever process ran it."""
    if result.patient_missing:
        return [PatientMissingError(PATIENT_MISSING, source=", ".join(record.sources), resource=record.patient_ref)]
    return []


def _in_stage_order(rulebook: Rulebook, rule_ids: list[str]) -> list[str]:
    return sorted(rule_ids, key=lambda r: (rulebook.rule(r).stage, r))


_FIELD = re.compile(r"\{([a-z_]+)\}")


def _filled(text: str, fields: Mapping[str, Any]) -> str:
    """A rule's clinician text with `{field}` replaced by that field of the fact the rule asserted (a date, a value)."""

    def value(match: re.Match) -> str:
        found = fields.get(match.group(1))
        if found is None:
            return match.group(0)
        if isinstance(found, float) and found.is_integer():
            return str(int(found))
        return str(found)

    return _FIELD.sub(value, text)


def _detail(rulebook: Rulebook, rule_ids: list[str], fields: Mapping[str, Any] | None = None) -> str | None:
    texts = [rulebook.rule(r).detail for r in rule_ids if rulebook.rule(r).detail]
    if fields:
        texts = [_filled(t, fields) for t in texts]
    return " ".join(texts) if texts else None


def _value_and_date(fact: Mapping[str, Any]) -> dict[str, Any]:
    """The number and the date a flag or a risk tool is about, where its fact carries them."""
    out: dict[str, Any] = {}
    value = fact.get("value")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        out["value"] = float(value)
    when = fact.get("date")
    if isinstance(when, str):
        try:
            out["date"] = dt.date.fromisoformat(when)
        except ValueError:
            pass
    return out


def build_assessment(
    patient_ref: str,
    as_of: dt.date,
    derivation: Derivation,
    rulebook: Rulebook,
    info: RulesetInfo,
    dxa_dates: Iterable[dt.date] = (),
) -> Assessment:
    outputs = rulebook.outputs
    findings: list[Finding] = []
    values: dict[str, list[str]] = {}
    for name, spec in outputs.items():
        if name in ("selected_t", "selected_z"):
            continue
        codes = []
        for derived in derivation.of_type(spec["fact"]):
            code = str(derived.fact.get(spec.get("field", "code")))
            # the whole chain of rules behind the item, in the order they ran
            rules = _in_stage_order(rulebook, derivation.rules_behind(derived.key))
            extra: dict[str, Any] = {}
            if name == "audit":
                extra["detail"] = f"{derived.fact.get('resource')} ignored: {derived.fact.get('reason')}"
            else:
                extra["detail"] = _detail(rulebook, rules, derived.fact)
            if spec["kind"] in ("flag", "risk-tool"):
                extra.update(_value_and_date(derived.fact))
            findings.append(
                Finding(
                    kind=spec["kind"],
                    code=code,
                    rules=tuple(rules),
                    evidence=tuple(derivation.evidence_for(derived.key)),
                    **extra,
                )
            )
            codes.append(code)
        values[name] = codes

    def single(name: str) -> str:
        found = sorted(set(values.get(name, [])))
        if len(found) == 1:
            return found[0]
        if not found and "default" in outputs[name]:
            return str(outputs[name]["default"])
        # A rulebook that gives no category or two is wrong; never guess one for a patient.
        raise EvaluationError(f"rules produced {len(found)} values for {name} ({', '.join(found) or 'none'})")

    selected = []
    for score, sel_spec in (("T", outputs.get("selected_t")), ("Z", outputs.get("selected_z"))):
        if not sel_spec:
            continue
        for derived in derivation.of_type(sel_spec["fact"]):
            selected.append(
                SelectedT(
                    # the score actually read: a substituted score (G24) says which one stood in
                    score=str(derived.fact.get("score") or score),
                    site=str(derived.fact["site"]),
                    value=float(derived.fact["value"]),
                    evidence=tuple(derivation.evidence_for(derived.key)),
                )
            )
            findings.append(
                Finding(
                    kind=sel_spec["kind"],
                    code=f"{derived.fact['site']}:{derived.fact['value']}",
                    rules=tuple(_in_stage_order(rulebook, derivation.rules_behind(derived.key))),
                    evidence=tuple(derivation.evidence_for(derived.key)),
                )
            )
    # Every resource a fired rule used, whether or not what it derived is an output.
    evidence = derivation.all_evidence()
    rank = {code: i for i, code in enumerate(RISK_FACTOR_ORDER)}
    findings.sort(key=lambda f: (f.kind, f.code))
    return Assessment(
        patient=patient_ref,
        ai_status=single("ai_status"),
        category=single("category"),
        risk_factors=tuple(sorted(set(values.get("risk_factors", [])), key=lambda c: (rank.get(c, 99), c))),
        recommendations=tuple(sorted(set(values.get("recommendations", [])))),
        flags=tuple(sorted(set(values.get("flags", [])))),
        rules=tuple(sorted(set(derivation.fired))),
        evidence=tuple(evidence),
        dxa_dates=tuple(sorted(set(dxa_dates))),
        as_of=as_of,
        ruleset=info,
        findings=tuple(findings),
        selected_t=tuple(sorted(selected, key=lambda s: (s.value, s.site))),
    )
