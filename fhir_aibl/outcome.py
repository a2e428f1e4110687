"""One patient's outcome from that patient's resources: for engines that group patients themselves.

    outcome = assess_patient(lines, medications, as_of=dt.date(2026, 6, 1))
    outcome.assessment        # what `assess --format json` prints for the patient (the output contract)
    outcome.risk_assessment   # the RiskAssessment and CarePlan `assess --format fhir` builds, as JSON
    outcome.care_plan
    outcome.problems          # errors (AiblError), as `assess` reports them; outcome.warnings: data-quality notes

The public, stable entry point that Apache Spark's Python workers call (fhir_aibl/spark,
docs/spark.md), and that any other engine grouping a population by patient may call. The
record is built by the file reader's own second pass (`sources.patient_records`: grouping,
one `Type/id` kept "newest wins", medication references resolved, validation of what the
rules read), assessed by `assess.assess_record` and turned into FHIR by
`careplan.build_resources`, as `fhir-aibl assess` does; so the results cannot drift from it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .assess import Assessor, assess_record, record_problems
from .errors import AiblError, EvaluationError
from .references import MedicationIndex
from .sources import PatientRecord, RecordItem, patient_records

__all__ = ["PatientOutcome", "assess_patient", "assessor_for"]


@dataclass
class PatientOutcome:
    """What `assess` gives for one patient."""

    patient: str | None = None  #: "Patient/<id>"; None when nothing of the resources could be read
    assessment: dict | None = None  #: the output contract (with `explain`: plus as_of, ruleset, findings); None if not assessed
    risk_assessment: dict | None = None  #: the RiskAssessment as FHIR JSON
    care_plan: dict | None = None  #: the CarePlan as FHIR JSON
    problems: list[AiblError] = field(default_factory=list)  #: errors: rejected resources, no usable Patient, ...
    warnings: list[str] = field(default_factory=list)  #: data-quality notes (`assess` prints them as warnings)


_ASSESSORS: dict[tuple[str | None, str], Assessor] = {}
_CATALOGUES: dict[Path, Any] = {}


def assessor_for(rules_path: str | Path | None = None, mode: str = "default") -> Assessor:
    """This process's `Assessor` for a ruleset and boundary mode, built once (one durable_rules engine per process)."""
    key = (str(rules_path) if rules_path else None, mode)
    assessor = _ASSESSORS.get(key)
    if assessor is None:
        assessor = _ASSESSORS[key] = Assessor(Path(rules_path) if rules_path else None, mode=mode)
    return assessor


def _catalogue(assessor: Assessor) -> Any:
    from .careplan import load_catalogue

    path = assessor.paths.catalogue
    found = _CATALOGUES.get(path)
    if found is None:
        found = _CATALOGUES[path] = load_catalogue(path)
    return found


def assess_patient(
    resources: Iterable[RecordItem],
    medications: MedicationIndex | Iterable[dict | bytes | str] = (),
    *,
    as_of: dt.date,
    assessor: Assessor | None = None,
    explain: bool = False,
    created: dt.datetime | None = None,
    patient: str | None = None,
    source: str = "input",
) -> PatientOutcome:
    """One patient's outcome. Never raises for bad data: every problem is in `outcome.problems`.

    `resources`: the patient's resources in read order, each parsed, an NDJSON line, or
    `(file, line number, either)` so that problems name `file:line` (`sources.patient_records`).
    `medications`: the Medications and Substances they may reference (parsed or NDJSON lines,
    in read order), or a `sources.medication_index` of them built once for many patients.
    `assessor`: default `assessor_for()` (the shipped ruleset). `created`: the CarePlan's
    creation time (default: now). `patient` (an id): assess only that patient's record (the
    resources may hold others', e.g. a Bundle); without it the resources must name one patient.

    Raises ValueError if, without `patient`, the resources name several patients: grouping
    is the caller's, and two patients' data are never assessed as one.
    """
    from .careplan import build_resources
    from .clinician_text import PatientValues

    assessor = assessor or assessor_for()
    outcome = PatientOutcome(patient=f"Patient/{patient}" if patient else None)
    records: list[PatientRecord] = []
    for item in patient_records(resources, medications, terminology=assessor.terminology, source=source, patient=patient):
        if isinstance(item, PatientRecord):
            records.append(item)
        else:
            outcome.problems.append(item)
    if len(records) > 1:
        raise ValueError(f"resources of {len(records)} patients given as one: {', '.join(r.patient_ref for r in records)}")
    if not records:
        return outcome
    record = records[0]
    outcome.patient = record.patient_ref
    try:
        result = assess_record(assessor, record, as_of)
        risk, plan = build_resources(
            result.assessment, _catalogue(assessor), created=created,
            values=PatientValues(result.assessment, result.facts, record.resources),
        )
    except AiblError as exc:
        outcome.problems.append(exc)
        return outcome
    except Exception as exc:  # a fault of this patient's assessment must not stop the others
        outcome.problems.append(
            EvaluationError(f"assessment failed: {type(exc).__name__}: {exc}", resource=record.patient_ref)
        )
        return outcome
    outcome.warnings = [str(note) for note in result.facts.problems]
    outcome.problems.extend(record_problems(result, record))
    outcome.assessment = result.assessment.explained() if explain else result.assessment.contract()
    outcome.risk_assessment = json.loads(risk.model_dump_json(exclude_none=True))
    outcome.care_plan = json.loads(plan.model_dump_json(exclude_none=True))
    return outcome
