"""What Spark's Python workers run: key a line by patient; assess one partition's patients.

Nothing here imports pyspark: these functions receive plain Python values (the rows of an
RDD) and return plain Python values, so they are tested and reused without Spark. Each
worker process keeps one `Assessor` (one durable_rules engine; `outcome.assessor_for`) and
one medication index per run, built on first use and reused by every task the process runs
(Spark reuses its Python workers: `spark.python.worker.reuse`, on by default).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import AiblError
from ..outcome import PatientOutcome, assess_patient, assessor_for
from ..report.worklist import row_of
from ..sources import DROP, key_line, medication_index

#: Row kinds of the outcome RDD (the first field of each row); each is written to its own folder.
ASSESSMENT, CAREPLAN, RISK, PROBLEM, WORKLIST = "assessment", "CarePlan", "RiskAssessment", "problem", "worklist"


@dataclass(frozen=True)
class RunSettings:
    """What every task needs of the run (pickled into the tasks)."""

    as_of: dt.date
    rules_path: str | None
    mode: str
    explain: bool
    created: dt.datetime
    token: str  #: names this run's medication index in a worker's cache


#: The shuffle key of the rows that are reading problems (no patient id is empty).
READING = ""


def seq_of(file_index: int, line: int) -> int:
    """Read order of a line, as the file reader reads: files in order, lines in order."""
    return (file_index << 32) | line


def partition_of(key: tuple[str, int], partitions: int) -> int:
    """The shuffle partition of a (patient id, read order) key: by patient alone, the same in every process."""
    return zlib.crc32(key[0].encode("utf-8", "surrogatepass")) % partitions


def problem_row(problem: AiblError | str, *, patient: str | None = None) -> tuple[str, str]:
    """A problem as one JSON line: an error (`AiblError`) or a warning (a data-quality note)."""
    if isinstance(problem, AiblError):
        data = {"severity": "error", "code": problem.code, "source": problem.source, "resource": problem.resource,
                "message": problem.message, "text": f"error: {problem}"}
    else:
        data = {"severity": "warning", "patient": patient, "message": problem, "text": f"warning: {problem}"}
    return PROBLEM, json.dumps(data, ensure_ascii=False)


def key(row: tuple[int, int, str, bytes]) -> tuple | None:
    """(file index, line number, file name, line) -> (read order, file name, line number, line, kind,
    patient id, `Type/id`, the `KeyedLine` of a "bundle" or "problem" line, else None).

    A flat tuple, because every row is pickled between the JVM and the Python workers; a blank
    line, or a line of a type no rule reads, is dropped here (the file reader skips them too).
    """
    file_index, lineno, name, line = row
    if not line or line.isspace():
        return None
    # Spark's lines come without their newline; the file reader parses a line with it, and a
    # parser's message ("unexpected end of data: line 2 column 1") names where it ended
    keyed = key_line(line + b"\n", f"{name}:{lineno}")
    if keyed.kind == "skipped":
        return None
    extra = keyed if keyed.kind in ("bundle", "problem") else None
    return seq_of(file_index, lineno), name, lineno, line, keyed.kind, keyed.patient, keyed.key, extra


_INDEXES: dict[str, Any] = {}


def _medications(settings: RunSettings, medications: Any) -> Any:
    index = _INDEXES.get(settings.token)
    if index is None:
        _INDEXES.clear()  # one run's index at a time
        assessor = assessor_for(settings.rules_path, settings.mode)
        index = _INDEXES[settings.token] = medication_index(medications.value, assessor.terminology)
    return index


def assess_partition(
    rows: Iterable[tuple[tuple[str, int], tuple[str, int, bytes]]],
    settings: RunSettings,
    medications: Any,
    decisions: Any,
) -> Iterator[tuple[str, str]]:
    """((patient id, read order), (file, line, raw line)) rows sorted by key -> (kind, text) rows.

    `medications` and `decisions` are Spark broadcasts (anything with `.value`): the run's
    Medications in read order, and {read order: position or DROP} for the resources filed
    under two patients (`sources.decide_duplicates`).
    """
    index = _medications(settings, medications)
    decided: dict[int, int] = decisions.value
    assessor = assessor_for(settings.rules_path, settings.mode)
    for pid, group in itertools.groupby(rows, key=lambda r: r[0][0]):
        if pid == READING:  # the lines refused as they were read, in read order
            for _key, (kind, text) in group:
                yield kind, text
            continue
        items = []
        for (_pid, seq), (name, lineno, raw) in group:
            decision = decided.get(seq) if decided else None
            if decision == DROP:
                continue
            items.append((seq if decision is None else decision, name, lineno, raw))
        items.sort(key=lambda i: i[0])
        outcome = assess_patient(
            [(name, lineno, raw) for _seq, name, lineno, raw in items], index, as_of=settings.as_of,
            assessor=assessor, explain=settings.explain, created=settings.created, patient=pid,
        )
        yield from outcome_rows(outcome)


def outcome_rows(outcome: PatientOutcome) -> Iterator[tuple[str, str]]:
    """One patient's outcome as (kind, JSON text) rows: the lines of the output folders."""
    compact = {"separators": (",", ":"), "ensure_ascii": False}
    for note in outcome.warnings:
        yield problem_row(note, patient=outcome.patient)
    for problem in outcome.problems:
        yield problem_row(problem)
    if outcome.assessment is None:
        return
    yield ASSESSMENT, json.dumps(outcome.assessment, ensure_ascii=False)
    if outcome.risk_assessment is not None and outcome.care_plan is not None:
        yield RISK, json.dumps(outcome.risk_assessment, **compact)
        yield CAREPLAN, json.dumps(outcome.care_plan, **compact)
    row = row_of(outcome.assessment)
    if row is not None:
        yield WORKLIST, json.dumps(row.csv(), ensure_ascii=False)  # the CSV worklist's columns, as text
