"""`fhir-aibl report`: the worklist and the population report from saved assessments.

    fhir-aibl report ASSESSMENTS... [--worklist PATH] [--report PATH.html] [--as-of DATE]

ASSESSMENTS: what `assess --format json` (or `run`, `run --bulk`) printed, a JSON array, or JSON
lines, one contract per line (what the Spark engine writes), as files, folders of them or "-"
for stdin (fhir_aibl/report/saved.py). Any population output thus gets the same worklist and
report as the command that made it would have written.

Exit status: 0 every assessment used; 1 some were rejected (each named with its file and line on
stderr; the others are used), or a file could not be written; 2 nothing could run (bad
arguments, pyarrow missing for a Parquet worklist, a file that cannot be read or a JSON array
that does not parse: nothing is written then).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import TextIO

from ..errors import AiblError
from .outputs import PopulationOutputs, add_output_arguments
from .saved import read_saved

EXIT_REPORT = """exit status:
  0  every assessment was used
  1  some assessment was rejected (each named with its file and line on stderr; the others are used),
     or a file could not be written
  2  nothing could run (bad arguments, pyarrow missing for a .parquet worklist, an input that cannot
     be read, a JSON array that does not parse): nothing is written"""


def add_arguments(parser: argparse.ArgumentParser, date_type) -> None:
    parser.add_argument(
        "paths", nargs="+", type=Path, metavar="ASSESSMENTS",
        help="saved assessments: the JSON array `assess --format json` prints, or JSON lines (one contract per "
        "line, as the Spark engine writes); files, folders of them, or - for stdin",
    )
    add_output_arguments(parser)
    parser.add_argument(
        "--as-of", type=date_type, default=None, metavar="YYYY-MM-DD",
        help="the date the report is as of, where DXA coverage ends (default: the latest as_of the assessments "
        "carry, as `--explain` writes it, else today)",
    )


def run(args: argparse.Namespace, *, stderr: TextIO | None = None) -> int:
    err = stderr or sys.stderr
    written = PopulationOutputs(args.worklist, args.report)
    if not written.wanted:
        print("fatal: nothing to write: give --worklist PATH, --report PATH.html or both", file=err)
        return 2
    if (problem := written.problem()) is not None:
        print(f"fatal: {problem}", file=err)
        return 2
    rejected = 0
    dates: set[str] = set()
    try:
        for item in read_saved(args.paths):
            if isinstance(item, AiblError):
                print(f"error: {item}", file=err)
                rejected += 1
                continue
            if isinstance(item.get("as_of"), str):
                dates.add(item["as_of"])
            written.add(item)
    except AiblError as exc:  # a file that cannot be read, an array that does not parse
        print(f"fatal: {exc}; nothing written", file=err)
        return 2
    as_of = args.as_of or _latest(dates) or dt.date.today()
    ok = written.write(as_of, err)
    return 1 if rejected or not ok else 0


def _latest(dates: set[str]) -> dt.date | None:
    found = []
    for text in dates:
        try:
            found.append(dt.date.fromisoformat(text))
        except ValueError:
            continue
    return max(found, default=None)
