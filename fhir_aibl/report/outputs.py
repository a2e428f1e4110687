"""The population outputs of a command: the worklist (CSV or Parquet) and the HTML report, from its assessments.

    outputs = PopulationOutputs(args.worklist, args.report)
    if (problem := outputs.problem()): fatal(problem)       # before any work: pyarrow missing
    items = outputs.tee(items)                               # while the command writes its own output
    ok = outputs.write(as_of, err)                           # says what it wrote on err

Shared by `assess`, `run`, `run --bulk` and `report`, so that each writes the same files from
the same contracts.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from .population import Tally
from .render import write_report
from .worklist import Worklist, parquet_problem

WORKLIST_HELP = (
    "also write the bone-health worklist (patients on an aromatase inhibitor with a care gap, most urgent first): "
    "Parquet when PATH ends in .parquet (needs fhir-aibl[parquet]), else CSV (default: none)"
)
REPORT_HELP = (
    "also write the population report: one self-contained HTML page with the numbers, charts of categories, "
    "care gaps and DXA coverage over time, and the worklist's first rows (default: none)"
)


def add_output_arguments(parser: argparse.ArgumentParser | Any) -> None:
    parser.add_argument("--worklist", type=Path, default=None, metavar="PATH", help=WORKLIST_HELP)
    parser.add_argument("--report", type=Path, default=None, metavar="PATH.html", help=REPORT_HELP)


class PopulationOutputs:
    def __init__(self, worklist_path: Path | None, report_path: Path | None) -> None:
        self.worklist_path = worklist_path
        self.report_path = report_path
        self.worklist = Worklist() if worklist_path or report_path else None
        self.tally = Tally() if report_path else None

    @property
    def wanted(self) -> bool:
        return self.worklist is not None

    def problem(self) -> str | None:
        """What stops the outputs being written, known before any work (pyarrow missing for Parquet)."""
        return parquet_problem(self.worklist_path)

    def add(self, output: Any) -> None:
        if self.worklist is not None:
            self.worklist.add(output)
        if self.tally is not None:
            self.tally.add(output)

    def tee(self, outputs: Iterable[Any]) -> Iterator[Any]:
        for output in outputs:
            self.add(output)
            yield output

    def write(self, as_of: dt.date, err: TextIO) -> bool:
        """Write what was asked for; False (with an error on `err`) when a file cannot be written."""
        ok = True
        if self.worklist is not None and self.worklist_path is not None:
            try:
                count = self.worklist.write(self.worklist_path)
            except OSError as exc:
                print(f"error: cannot write the worklist {self.worklist_path}: {exc.strerror or exc}", file=err)
                ok = False
            else:
                print(f"worklist: {count} patients on an aromatase inhibitor with a care gap, in {self.worklist_path}",
                      file=err)
        if self.tally is not None and self.worklist is not None and self.report_path is not None:
            numbers = self.tally.numbers(as_of)
            try:
                write_report(self.report_path, numbers, self.worklist)
            except OSError as exc:
                print(f"error: cannot write the report {self.report_path}: {exc.strerror or exc}", file=err)
                ok = False
            else:
                print(f"report: {numbers.patients} patients, as of {as_of}, in {self.report_path}", file=err)
        return ok
