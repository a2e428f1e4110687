"""What `fhir-aibl write-back` reads: any population output, its shape detected per file.

Shapes (a folder is read as every `.json`, `.ndjson` and `.jsonl` file under it, in name order):

- a JSON array of assessments, as `fhir-aibl assess --format json --explain` prints it;
- JSON lines of assessments, one object per line (what the Spark engine writes as
  `assessments/*.json` parts);
- a FHIR Bundle of CarePlans and RiskAssessments, as `fhir-aibl assess --format fhir` prints
  it (pretty-printed or on one line);
- NDJSON of CarePlan and RiskAssessment resources (ready for Bulk import), in one file or
  split by type over several: each CarePlan is paired with the RiskAssessment of the same
  fhir-aibl identifier, wherever in the input it is.

An assessment must carry its ruleset and findings (`--explain`): the CarePlan is built from
them (the safety checks of a medication, the rules and data behind each activity, the
ruleset it names). A bare contract (the eight fields of `--format json` without
`--explain`) is refused with that reason: a CarePlan built from it would drop what the
safety gates said.

Anything else is refused with the file and line (or element) it is at, and the rest is
read. Nothing here talks to a server.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhir.resources.R4B.identifier import Identifier
from pydantic import ValidationError

from ..assessment import Assessment, RulesetInfo
from ..careplan import CATEGORY_SYSTEM, IDENTIFIER_SYSTEM, RULESET_SYSTEM, business_identifier, full_url
from ..fhir.writeback import identifier_of
from ..jsoninput import loads

#: Files a folder is read for; anything else in it (Parquet, _SUCCESS, .crc) is left alone.
SUFFIXES = (".json", ".ndjson", ".jsonl")
#: The RiskAssessment method's display, as careplan.py writes it.
_METHOD = re.compile(r"^(?P<id>\S+) version (?P<version>\S+) \(content (?P<hash>[0-9a-f]+), boundary mode (?P<mode>[\w-]+)\)$")


@dataclass(frozen=True)
class Source:
    """What the Provenance of given resources names (an Assessment's `patient`, `ruleset`, `evidence`)."""

    patient: str
    ruleset: RulesetInfo
    evidence: tuple[str, ...]


@dataclass
class Item:
    """One patient's write: an assessment to build the CarePlan from, or the resources built."""

    patient: str  #: Patient/<id>
    identifier: str  #: the fhir-aibl business identifier of the CarePlan
    where: str  #: file:line
    on_ai: bool  #: on an aromatase inhibitor (active or planned)
    assessment: Assessment | None = None
    risk: dict | None = None
    plan: dict | None = None
    source: Source | None = None


@dataclass
class Refused:
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass
class Reading:
    """Everything read: the items in input order, and what was refused."""

    items: list[Item] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    files: int = 0


def files_of(paths: Iterable[Path]) -> Iterator[Path | Refused]:
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix in SUFFIXES and not p.name.startswith((".", "_"))
            )
            if not found:
                yield Refused(str(path), "a folder with no .json, .ndjson or .jsonl file")
            yield from found
        elif path.is_file():
            yield path
        else:
            yield Refused(str(path), "no such file or folder")


def read_inputs(paths: Iterable[Path]) -> Reading:
    """Read every input; pair CarePlans with their RiskAssessments across files."""
    reading = Reading()
    halves: dict[str, dict[str, tuple[dict, str]]] = {}
    for path in files_of(paths):
        if isinstance(path, Refused):
            reading.refused.append(path)
            continue
        reading.files += 1
        for where, value in _values(path, reading.refused):
            _take(value, where, reading, halves)
    for ident, parts in halves.items():
        for rtype, (_resource, where) in parts.items():
            other = "RiskAssessment" if rtype == "CarePlan" else "CarePlan"
            reading.refused.append(Refused(where, f"a {rtype} whose {other} (identifier {ident}) is not in the input"))
    return reading


def _values(path: Path, refused: list[Refused]) -> Iterator[tuple[str, Any]]:
    """(where, JSON value) of a file: the whole document, its array's elements, or its lines."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        refused.append(Refused(str(path), f"cannot read: {exc.strerror or exc}"))
        return
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.lstrip()
    if not text:
        refused.append(Refused(str(path), "empty"))
        return
    first_line = text.split(b"\n", 1)[0].strip()
    one_line_object = first_line.startswith(b"{") and _parses(first_line)
    if not one_line_object:  # a document over several lines: an array or a Bundle
        try:
            value = loads(data)
        except ValueError as exc:
            # JSON lines whose first line is damaged are still JSON lines: the others are read
            if not any(line.strip().startswith(b"{") and _parses(line) for line in data.split(b"\n")[1:]):
                refused.append(Refused(str(path), f"not JSON, nor JSON lines: {exc}"))
                return
        else:
            if isinstance(value, list):
                for i, element in enumerate(value):
                    yield f"{path}[{i}]", element
            else:
                yield str(path), value
            return
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{number}", loads(line)
        except ValueError as exc:
            refused.append(Refused(f"{path}:{number}", f"not JSON: {exc}"))


def _parses(line: bytes) -> bool:
    try:
        loads(line)
    except ValueError:
        return False
    return True


def _take(value: Any, where: str, reading: Reading, halves: dict[str, dict[str, tuple[dict, str]]]) -> None:
    if not isinstance(value, dict):
        reading.refused.append(Refused(where, "neither an assessment nor a FHIR resource"))
        return
    rtype = value.get("resourceType")
    if rtype == "Bundle":
        for i, entry in enumerate(value.get("entry") or []):
            resource = entry.get("resource") if isinstance(entry, dict) else None
            _take(resource, f"{where} entry {i}", reading, halves)
        return
    if rtype in ("CarePlan", "RiskAssessment"):
        ident = identifier_of(value)
        if ident is None:
            reading.refused.append(Refused(where, f"a {rtype} without a fhir-aibl identifier: not written by fhir-aibl"))
            return
        parts = halves.setdefault(ident, {})
        if rtype in parts:
            reading.refused.append(Refused(where, f"a second {rtype} with identifier {ident} (first at {parts[rtype][1]})"))
            return
        parts[rtype] = (value, where)
        if len(parts) == 2:
            del halves[ident]
            item = _pair(parts["RiskAssessment"], parts["CarePlan"], ident)
            (reading.refused if isinstance(item, Refused) else reading.items).append(item)
        return
    if rtype is not None:
        reading.refused.append(Refused(where, f"a {rtype}: only CarePlans and RiskAssessments are written back"))
        return
    if "patient" in value and "category" in value:
        item = _assessment(value, where)
        (reading.refused if isinstance(item, Refused) else reading.items).append(item)
        return
    reading.refused.append(Refused(where, "neither an assessment nor a FHIR resource"))


def _assessment(value: dict, where: str) -> Item | Refused:
    if "ruleset" not in value or "findings" not in value:
        return Refused(
            where,
            "an assessment without its ruleset and findings: write it with `--explain` "
            "(a CarePlan built without them would drop the safety checks behind its recommendations)",
        )
    try:
        assessment = Assessment.model_validate(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[:3]
        return Refused(where, "not a valid assessment: " + "; ".join(
            "/".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in first))
    return Item(
        patient=assessment.patient,
        identifier=str(business_identifier(assessment).value),
        where=where,
        on_ai=assessment.ai_status in ("active", "planned"),
        assessment=assessment,
    )


def _pair(risk_at: tuple[dict, str], plan_at: tuple[dict, str], ident: str) -> Item | Refused:
    (risk, risk_where), (plan, where) = risk_at, plan_at
    patient = str((plan.get("subject") or {}).get("reference") or "")
    if not patient.startswith("Patient/") or str((risk.get("subject") or {}).get("reference") or "") != patient:
        return Refused(where, f"the CarePlan and its RiskAssessment ({risk_where}) are not about one Patient")
    category = None
    for prediction in risk.get("prediction") or []:
        for coding in ((prediction or {}).get("qualitativeRisk") or {}).get("coding") or []:
            if (coding or {}).get("system") == CATEGORY_SYSTEM:
                category = coding.get("code")
    if category is None:
        return Refused(risk_where, "a RiskAssessment without its AIBL category")
    ruleset = None
    for coding in (risk.get("method") or {}).get("coding") or []:
        match = _METHOD.match(str((coding or {}).get("display") or ""))
        if (coding or {}).get("system") == RULESET_SYSTEM and match:
            ruleset = RulesetInfo(
                name=str(coding.get("code")), id=match["id"], version=match["version"],
                content_hash=match["hash"], boundary_mode=match["mode"],
            )
    if ruleset is None:
        return Refused(risk_where, "a RiskAssessment that does not name the ruleset that decided it")
    evidence = tuple(
        str(ref["reference"]) for ref in risk.get("basis") or [] if isinstance(ref, dict) and ref.get("reference")
    )
    # the server owns meta; an id from the file is replaced by the write's own, and a reference
    # to the RiskAssessment by its id in the file becomes the one the write resolves
    plan = {k: v for k, v in plan.items() if k not in ("meta", "id")}
    if risk.get("id"):
        urn = full_url("RiskAssessment", Identifier(system=IDENTIFIER_SYSTEM, value=ident))
        plan["supportingInfo"] = [
            {**info, "reference": urn}
            if isinstance(info, dict) and info.get("reference") == f"RiskAssessment/{risk['id']}"
            else info
            for info in plan.get("supportingInfo") or []
        ] or None
        if plan["supportingInfo"] is None:
            del plan["supportingInfo"]
    risk = {k: v for k, v in risk.items() if k not in ("meta", "id")}
    return Item(
        patient=patient,
        identifier=ident,
        where=where,
        # a category "not applicable" is given exactly when no aromatase inhibitor is taken or planned
        on_ai=category != "not-applicable",
        risk=risk,
        plan=plan,
        source=Source(patient=patient, ruleset=ruleset, evidence=evidence),
    )
