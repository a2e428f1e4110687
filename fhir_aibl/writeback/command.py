"""`fhir-aibl write-back`: write a population's CarePlans back to a FHIR server, from any output.

    fhir-aibl write-back --fhir-base URL FROM... [--batch-size N] [--state DIR] [--recheck]
                         [--all-statuses] [--progress-every N] [the connection options of `run`]

FROM: files or folders of `assess --format json --explain` arrays, JSON lines of assessments,
`assess --format fhir` Bundles, or NDJSON of CarePlans and RiskAssessments (writeback/inputs.py).
The writes are decided as `run --write-back` decides them (idempotent by the CarePlan's business
identifier), sent in batches (writeback/batches.py) and recorded in a journal in `--state`
(writeback/journal.py), so that a rerun after an interruption resumes; one run at a time uses a
journal folder (a second is refused at once: folderlock.py). docs/write-back.md.

Exit status, as `run`: 0 every patient written or unchanged; 1 some input was refused or some
patient failed (the others are done); 2 nothing could run (bad options, the server unreachable,
credentials refused at the start) or the run stopped before every patient was attempted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path
from typing import TextIO

from ..errors import AiblError
from ..folderlock import FolderError, folder_lock
from ..fhir.command import _positive
from .batches import DEFAULT_BATCH, PopulationWriter, Progress, Tally

DEFAULT_STATE = Path("out/write-back")
log = logging.getLogger("fhir_aibl.fhir")
HELP = "write CarePlans back to a FHIR server from the output of a population run, in batches, resumably"
EXIT = """exit status:
  0  every patient given was written or found unchanged
  1  some input was refused, or some patient's write failed (the others are done; a rerun retries it)
  2  nothing could run (bad arguments or settings, server unreachable, credentials refused), or the run
     stopped before every patient was attempted (credentials refused mid-run, the server failing batch
     after batch)"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..fhir.command import add_connection_arguments

    parser.add_argument(
        "--fhir-base", required=True, metavar="URL", help="FHIR R4 base URL, e.g. https://ehr.example/fhir/R4"
    )
    parser.add_argument(
        "sources", nargs="+", type=Path, metavar="FROM",
        help="assessments (assess --format json --explain, or JSON lines), an assess --format fhir Bundle, "
        "NDJSON of CarePlans and RiskAssessments, or folders of them",
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--batch-size", type=_positive(int), default=DEFAULT_BATCH, metavar="N",
        help=f"patients per transaction (default: {DEFAULT_BATCH}; 1: one transaction a patient, as run --write-back)",
    )
    parser.add_argument(
        "--state", type=Path, default=DEFAULT_STATE, metavar="DIR",
        help=f"folder of the journal that makes a rerun resume (default: {DEFAULT_STATE})",
    )
    parser.add_argument(
        "--recheck", action="store_true",
        help="decide again for patients the journal shows done, asking the server (default: they are skipped)",
    )
    parser.add_argument(
        "--all-statuses", action="store_true",
        help="write back every patient given (default: only those on an aromatase inhibitor, active or planned)",
    )
    parser.add_argument(
        "--progress-every", type=_positive(int), default=100, metavar="N",
        help="a progress line on stderr every N patients, and at least every 10 s (default: 100)",
    )


def refusals(refused: list, shown: int = 5) -> list[str]:
    """An error line for each input refused; past `shown` of one reason in one file, a count."""
    lines: list[str] = []
    by_reason: dict[tuple[str, str], int] = {}
    for item in refused:
        key = (item.where.split(":", 1)[0].split("[", 1)[0], item.reason)
        by_reason[key] = by_reason.get(key, 0) + 1
        if by_reason[key] <= shown:
            lines.append(f"error: {item}")
    for (path, reason), count in by_reason.items():
        if count > shown:
            lines.append(f"error: {path}: {count - shown} more refused for the same reason ({reason})")
    return lines


def summary(tally: Tally, found: int) -> list[str]:
    """In the words of `run --write-back`'s summary."""
    lines = [
        f"patients found {found}, written {tally.written}, unchanged {tally.unchanged}"
        + (f" ({tally.confirmed} confirmed by the journal)" if tally.confirmed else "")
        + f", failed {len(tally.failed)}"
    ]
    written = tally.written
    lines.append(
        "round trips: "
        + (
            f"write-back {tally.write_requests / written:.2f} per patient written ({tally.write_requests} requests, "
            f"{written} written, {tally.unchanged} unchanged"
            if written
            else f"write-back none ({tally.write_requests} requests, {tally.unchanged} unchanged"
        )
        + f", {tally.batches} batches); setup {tally.setup_requests}"
    )
    return lines


def run(args: argparse.Namespace, *, session=None, environ=None, stdout: TextIO | None = None,
        stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    handler = None
    if args.debug_phi:  # as `run`: every request URL (they carry patient ids) to stderr
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("debug: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    try:
        with folder_lock(args.state, "fhir-aibl write-back"):
            return _run(args, session=session, environ=environ, out=out, err=err)
    except FolderError as exc:
        print(f"fatal: {exc}", file=err, flush=True)
        return 2
    finally:
        if handler is not None:
            log.removeHandler(handler)


def _run(args: argparse.Namespace, *, session, environ, out: TextIO, err: TextIO) -> int:
    def say(text: str) -> None:
        print(text, file=err, flush=True)

    from ..careplan import catalogue_for
    from ..fhir.command import build_client
    from .inputs import read_inputs
    from .journal import Journal

    reading = read_inputs(args.sources)
    for line in refusals(reading.refused):
        say(line)
    seen: dict[str, str] = {}
    items = []
    off_ai = 0
    failed_input = bool(reading.refused)
    for item in reading.items:
        if item.patient in seen:
            say(f"error: {item.where}: {item.patient} was given before (at {seen[item.patient]}): "
                "this one is not written")
            failed_input = True
            continue
        seen[item.patient] = item.where
        if not item.on_ai and not args.all_statuses:
            off_ai += 1
            continue
        items.append(item)
    try:
        catalogue = catalogue_for(args.rules)
        client = build_client(args, session=session, environ=environ)
        journal = Journal(args.state, client.base_url)
        unreadable = journal.load()
        if unreadable:
            say(f"warning: {unreadable} line(s) of {journal.path} unreadable (cut short by a crash?): ignored")
        progress = Progress(say, every=args.progress_every)
        writer = PopulationWriter(client, catalogue, journal, batch_size=args.batch_size,
                                  now=dt.datetime.now(dt.timezone.utc), on_batch=progress, recheck=args.recheck)
    except AiblError as exc:
        say(f"fatal: {exc}")
        return 2
    try:
        tally = writer.run(items)
    except Exception as exc:  # noqa: BLE001 - the run ends with its summary, never a traceback
        log.debug("unexpected error in the write-back", exc_info=True)
        say(f"fatal: unexpected error ({type(exc).__name__}: {str(exc)[:200]})")
        tally = writer.tally
        tally.stopped = tally.stopped or "an unexpected error"
    finally:
        journal.close()
    progress(tally, final=True)
    for note in tally.notes:
        say(f"note: {note}")
    for patient, reason in tally.failed:
        say(f"failed: {patient}: {reason}")
    if tally.stopped:
        say(f"fatal: the run stopped before every patient was attempted: {tally.stopped}")
    for line in summary(tally, len(items)):
        say(line)
    say(
        f"read {reading.files} files: {len(reading.items)} patients, {len(reading.refused)} refused"
        + (f", {off_ai} not on an aromatase inhibitor (not written)" if off_ai else "")
        + f"; server {client.base_url} ({client.profile.name}); journal {journal.path}"
    )
    print(f"written {tally.written}, unchanged {tally.unchanged}, failed {len(tally.failed)}", file=out)
    if tally.stopped:
        return 2
    return 1 if tally.failed or failed_input else 0
