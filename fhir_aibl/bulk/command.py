"""`fhir-aibl export` and `fhir-aibl run --bulk`: a FHIR Bulk Data export, and an assessment of it.

    fhir-aibl export --fhir-base URL [--group ID | --level system|patient] [--out DIR] [--since INSTANT | --incremental]
    fhir-aibl run --bulk --fhir-base URL [--group ID] [--out DIR] [--format table|json] [--workers N]
                 [--write-back] [--worklist PATH] [--report PATH.html] [--incremental [--full]]

Both take the connection options of `run` (authentication, timeouts, retries). `export`
writes NDJSON files and `state.json` into the output folder and prints where;
`run --bulk` exports, then assesses the files exactly as `fhir-aibl assess` assesses them
(the same output, in the same order), on `--workers` processes, and with `--write-back`
writes them back (bulk/writeback.py). With `--incremental` it exports only what changed since
the last complete run and merges it into the store in the output folder (bulk/incremental.py).
A run killed after its export was downloaded is resumed from that export by running it again.
One run at a time in an output folder: a second is refused at once (folderlock.py).

Exit status: 0 when everything was exported (and assessed, and written back); 1 when the
server reported errors in the manifest's error files, some input was rejected or a write
failed; 2 when nothing could run
(bad options, the server refused or failed the export, a download failed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import TextIO

from ..errors import AiblError
from ..folderlock import FolderError, folder_lock

DEFAULT_OUT = Path("out/bulk")


def add_bulk_arguments(parser: argparse.ArgumentParser, who: argparse._MutuallyExclusiveGroup | None) -> None:
    """The Bulk Data options; `who` is run's patient selection, which gets `--bulk`."""
    if who is not None:
        who.add_argument(
            "--bulk",
            action="store_true",
            help="export the population with FHIR Bulk Data ($export), then assess the files (docs/bulk.md)",
        )
    bulk = parser.add_argument_group("FHIR Bulk Data export (export, run --bulk)")
    bulk.add_argument(
        "--group", metavar="ID", default=None,
        help="the members of FHIR Group/ID (e.g. an oncology registry): run assesses them over REST, or with --bulk "
        "exports the Group (export: a Group-level export)",
    )
    bulk.add_argument(
        "--level",
        choices=("system", "patient"),
        default="system",
        help="without --group: [base]/$export (system, default) or [base]/Patient/$export",
    )
    bulk.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    bulk.add_argument("--since", default=None, metavar="INSTANT", help="_since: only what changed after this instant")
    bulk.add_argument(
        "--incremental",
        action="store_true",
        help="export: _since = the transaction time of the last complete export in --out (its state.json); "
        "run --bulk: only what changed since the last complete run, merged into the store in --out, and the whole "
        "population reported (default: off)",
    )
    bulk.add_argument(
        "--full",
        action="store_true",
        help="run --bulk --incremental: export everything and rebuild the store (an incremental export does not "
        "report deleted resources; a periodic full run forgets them) (default: off)",
    )
    bulk.add_argument(
        "--type-filter", action="append", default=[], metavar="QUERY",
        help="_typeFilter, e.g. Observation?status=final; repeat for several (default: none)"
    )
    bulk.add_argument(
        "--export-deadline", type=float, default=3600.0, metavar="S", help="give up waiting after S seconds (default: 3600)"
    )


def _level(args: argparse.Namespace) -> str:
    return "group" if args.group else args.level


def _export(args: argparse.Namespace, *, environ, session, err: TextIO, with_careplans: bool = False,
            run: bool = False, since_for=None):
    """Export as the options say; `run`: a `run --bulk`, which resumes from an export a run that did not
    finish downloaded completely, and asks for `since_for(client)` (its store's) rather than `--since`/`--incremental`."""
    from ..fhir.command import build_client
    from .client import BulkClient, PollSettings
    from .export import RULE_TYPES, export_to, pending_export

    client = build_client(args, session=session, environ=environ)
    types = RULE_TYPES + (("CarePlan",) if with_careplans else ())
    since = since_for(client) if since_for is not None else None
    if run:
        resumed = pending_export(args.out, level=_level(args), group=args.group, types=types,
                                 type_filters=tuple(args.type_filter), since=since)
        if resumed is not None:
            print(
                f"resuming: the export of {resumed.manifest.transaction_time} ({resumed.folder}) was downloaded "
                "by a run that did not finish; assessing it instead of exporting again",
                file=err,
            )
            resumed.client = client
            for message in resumed.errors:
                print(f"error: export: {message}", file=err)
            return resumed
    bulk = BulkClient(
        client.http,
        poll=PollSettings(deadline=args.export_deadline),
        on_progress=lambda text: None,
    )
    result = export_to(
        bulk,
        args.out,
        level=_level(args),
        group=args.group,
        types=types,
        since=since if run else args.since,
        incremental=args.incremental and not run,
        type_filters=tuple(args.type_filter),
        warn=lambda text: print(f"warning: {text}", file=err),
        run=run,
        # a nightly run's changes miss most types: only a full export says what the server leaves out
        warn_missing=not (run and since),
    )
    result.requests = client.http.stats.requests
    result.client = client
    for message in result.errors:
        print(f"error: export: {message}", file=err)
    return result


def run_export(args: argparse.Namespace, *, environ=None, session=None, stdout: TextIO | None = None,
               stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        with folder_lock(args.out, "fhir-aibl export"):
            result = _export(args, environ=environ, session=session, err=err)
    except (AiblError, ValueError) as exc:
        print(f"fatal: {exc}", file=err)
        return 2
    print(f"exported {len(result.files)} files to {result.folder} in {result.requests} requests", file=out)
    for path in result.files:
        print(f"  {path.name}", file=out)
    print(
        f"transaction time {result.manifest.transaction_time}"
        + (f"; changes since {result.since}" if result.since else "")
        + f"; state in {args.out / 'state.json'}",
        file=out,
    )
    return 1 if result.errors else 0


def run_bulk(args: argparse.Namespace, *, assessor=None, environ=None, session=None, stdout: TextIO | None = None,
             stderr: TextIO | None = None) -> int:
    """Export, then assess the export's files as `fhir-aibl assess` does."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    if args.since:
        print("fatal: run --bulk assesses whole records; --since is for fhir-aibl export (see --incremental)", file=err)
        return 2
    if getattr(args, "full", False) and not args.incremental:
        print("fatal: --full goes with --incremental (a run --bulk without it always exports everything)", file=err)
        return 2
    opened: list = []  # the incremental store, closed (rolled back unless committed) whatever happens
    try:
        with folder_lock(args.out, "fhir-aibl run --bulk"):
            try:
                return _run_bulk(args, assessor, environ, session, out, err, opened)
            finally:
                for run in opened:
                    run.close()
    except FolderError as exc:
        print(f"fatal: {exc}", file=err)
        return 2


def _run_bulk(args, assessor, environ, session, out, err, opened) -> int:
    from ..assess import Assessor
    from ..cli import fewer_collections, format_table, write_json_array
    from ..population import assess_population, choose_workers, one_process_items
    from ..report.outputs import PopulationOutputs

    written = PopulationOutputs(args.worklist, args.report)
    if (problem := written.problem()) is not None:
        print(f"fatal: {problem}", file=err)
        return 2
    try:
        if assessor is None or args.rules is not None:
            assessor = Assessor(args.rules)
        from ..careplan import catalogue_for

        catalogue = catalogue_for(args.rules) if args.write_back else None
        incremental = None
        if args.incremental:
            from .incremental import Incremental, settings_of

            incremental = Incremental(args.out, full=getattr(args, "full", False), settings=settings_of(args, _level(args)))
            opened.append(incremental)
        # an incremental store always holds the CarePlans: a later --write-back needs them all
        result = _export(args, environ=environ, session=session, err=err,
                         with_careplans=args.write_back or incremental is not None, run=True,
                         since_for=(lambda client: incremental.since_for(client, args.group))
                         if incremental is not None else None)
        if incremental is not None:
            incremental.merge(result.files)
    except (AiblError, ValueError) as exc:
        print(f"fatal: {exc}", file=err)
        return 2
    as_of = args.as_of or dt.date.today()
    paths = [result.folder]
    if incremental is not None:
        paths = incremental.prepare(as_of.isoformat(), assessor.rulebook.name)
    writer = None
    if catalogue is not None:
        from .writeback import BulkWriter, careplans_by_patient

        try:
            existing = (incremental.careplans(result.client.base_url) if incremental is not None
                        else careplans_by_patient(result.files, result.client.base_url))
            writer = BulkWriter(result.client, catalogue, existing)
        except AiblError as exc:
            print(f"fatal: {exc}", file=err)
            return 2
    workers = choose_workers(paths, args.workers)
    payload = "explained" if args.explain else "contract"
    # what the workers send back: Assessments when they are written back or shown as a table
    wanted = payload if args.format == "json" and writer is None and incremental is None else "assessment"
    problems: list[AiblError] = []
    with fewer_collections():
        if workers > 1:
            items = assess_population(
                paths,
                as_of=as_of,
                workers=workers,
                payload=wanted,
                problems=problems,
                on_warning=lambda note: print(f"warning: {note}", file=err),
                rules_path=args.rules,
                one_process=lambda: one_process_items(paths, assessor, as_of, wanted),
                notice=lambda text: print(text, file=err),
            )
        else:
            items = (
                item.payload
                for item in _one_process(paths, assessor, as_of, wanted, problems, err)
                if item.payload is not None
            )
        if incremental is not None:  # everyone: the new assessments and the reused ones
            items = incremental.merged(items)
        if writer is not None:
            items = _written(items, writer)
        if written.wanted:
            items = written.tee(items)
        if args.format == "json" and wanted == "assessment":
            items = (a.explained() if args.explain else a.contract() for a in items)
        if args.format == "json":
            write_json_array(items, out)
        else:
            assessments = list(items)
            print(format_table(assessments), file=out)
    for problem in problems:
        print(f"error: {problem}", file=err)
    failed = not written.write(as_of, err)
    if writer is not None:
        report = writer.report
        for patient, reason in report.failed:
            print(f"failed: {patient}: {reason}", file=err)
        print(
            f"write-back: written {report.written}, unchanged {report.unchanged}, failed {len(report.failed)} "
            f"({report.requests} requests)",
            file=err,
        )
        failed = failed or bool(report.failed)
    if incremental is not None:
        print(incremental.summary(), file=err)
        if result.errors:  # the server could not export everything: the next run asks for these changes again
            print(f"incremental: not committed, as the export reported errors; the next run asks again for the "
                  f"changes since {incremental.since() or 'the beginning'}", file=err)
        else:
            incremental.commit(result.manifest.transaction_time)
    from .export import run_complete

    run_complete(args.out)
    print(
        f"exported {len(result.files)} files ({result.folder}) in {result.requests} requests; "
        f"assessed with ruleset {assessor.rulebook.name}; "
        f"as of {as_of}",
        file=err,
    )
    return 1 if problems or result.errors or failed else 0


def _written(assessments, writer):
    for assessment in assessments:
        writer.write(assessment)
        yield assessment


def _one_process(paths, assessor, as_of, payload, problems, err):
    from ..population import one_process_items

    for item in one_process_items(paths, assessor, as_of, payload):
        for note in item.warnings:
            print(f"warning: {note}", file=err)
        problems.extend(item.problems)
        yield item
