"""`fhir-aibl run`: assess patients on a FHIR server, and write CarePlans back.

    fhir-aibl run --fhir-base URL (--patient ID ... | --all | --group ID | --patients-file FILE)
                  [--as-of DATE] [--write-back]
                  [--format table|json] [--explain] [--profile NAME] [--worklist PATH] [--report PATH.html]
                  [--token-file FILE | --smart-client-id ID --smart-key FILE [--smart-token-url URL]]

Authentication: `--token-file`, else the environment variable FHIR_AIBL_TOKEN, else SMART
Backend Services with `--smart-*`, else none. A secret is never an argument.

Output: stdout carries the result, in the same JSON contract as `fhir-aibl assess`
(`--format json`) or its table; stderr carries the progress bar (population runs on a
terminal), warnings, the failures with their reasons and a summary: patients found,
assessed, written, unchanged, failed, and the round trips measured.

Exit status: 0 every patient found was assessed (and written or unchanged); 1 some
patient failed (the others are done), or was assessed from an incomplete record (no usable
Patient resource: age unknown, named under "problems" in the summary); 2 the run itself failed: nothing could run (bad
arguments or settings, the server unreachable, credentials refused, the capabilities
unreadable, no population search), or the run stopped before every patient was attempted
(credentials refused mid-run, the server away for several patients in a row). Whatever
the status, the output, the failures and the summary are printed, never a traceback;
docs/failure-behaviour.md says what each kind of fault gets.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from ..assess import Assessor
from ..resources import RULES_HELP
from ..errors import AiblError
from .auth import DEFAULT_SCOPE, TOKEN_ENV, auth_from_options
from .client import FhirClient
from .profiles import PROFILES, get_profile
from .runner import PatientOutcome, Runner, RunReport
from .settings import ClientSettings, RetrySettings

log = logging.getLogger("fhir_aibl.fhir")


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above zero: {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser, *, run: bool = True) -> None:
    """The options of `run`; with `run=False` (`fhir-aibl export`) no patient selection is required."""
    # No abbreviations: `--token SECRET` must be refused, not taken for `--token-file SECRET`.
    parser.allow_abbrev = False
    parser.add_argument(
        "--fhir-base", required=True, metavar="URL", help="FHIR R4 base URL, e.g. https://ehr.example/fhir/R4"
    )
    # Not required by argparse: --group, which may go with --bulk, is outside the group (run_selection_problem)
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--patient", nargs="+", metavar="ID", help="assess these patients (Patient ids)")
    who.add_argument(
        "--all",
        action="store_true",
        help="assess every patient with an active or intended aromatase-inhibitor medication "
        "(a search by code, and through the referenced Medication where the server allows it)",
    )
    who.add_argument("--patients-file", type=Path, metavar="FILE", default=None, help="assess the patients listed, one id per line")
    from ..bulk.command import add_bulk_arguments

    # --group (the members of a FHIR Group) is with the Bulk options: over REST on its own, or
    # exported at Group level with --bulk
    add_bulk_arguments(parser, who if run else None)
    if run:  # the population outputs: --all, --group, --patients-file and --bulk (fhir_aibl/report)
        from ..report.outputs import add_output_arguments

        add_output_arguments(parser)

    parser.add_argument("--as-of", type=_date, default=None, help="reference date (default: today)")
    parser.add_argument(
        "--write-back",
        action="store_true",
        help="write a CarePlan, RiskAssessment and Provenance per patient (idempotent)",
    )
    parser.add_argument(
        "--format", choices=("table", "json"), default="table",
        help="table: a table on stdout; json: one JSON array, one object per patient, as `assess` (default: table)",
    )
    parser.add_argument(
        "--explain", action="store_true", help="json: add as_of, ruleset and every finding's rules and evidence"
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--workers",
        type=_positive(int),
        default=None,
        metavar="N",
        help="patients in flight at once, each in a worker process of its own (default: 1); the same outcomes",
    )
    parser.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr for --all (default: auto, when stderr is a terminal)",
    )


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """How to reach the server and what to decide with: the profile, the rules, authentication,
    HTTP behaviour (`run`, `export`, and `write-back`, which has no patient selection)."""
    parser.allow_abbrev = False
    defaults = ClientSettings()
    retry = RetrySettings()
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="generic", help="server vendor profile (default: generic)"
    )
    parser.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE", help=RULES_HELP)
    auth = parser.add_argument_group("authentication (secrets come from files or the environment, never arguments)")
    auth.add_argument("--token-file", type=Path, default=None, help=f"file holding a bearer token (else ${TOKEN_ENV})")
    auth.add_argument("--smart-client-id", default=None, help="SMART Backend Services client id")
    auth.add_argument("--smart-key", type=Path, default=None, help="private key, PEM or JWKS file (RS384 or ES384)")
    auth.add_argument(
        "--smart-token-url", default=None, help="token endpoint (default: from [base]/.well-known/smart-configuration)"
    )
    auth.add_argument(
        "--smart-kid", default=None, help="key id to announce (default: the JWK's kid or the key thumbprint)"
    )
    auth.add_argument("--smart-scope", default=DEFAULT_SCOPE, help=f"scopes to ask for (default: {DEFAULT_SCOPE!r})")
    http = parser.add_argument_group("HTTP behaviour")
    http.add_argument(
        "--page-size", type=_positive(int), default=None, help="_count per search (default: the profile's)"
    )
    http.add_argument(
        "--timeout",
        type=_positive(float),
        default=defaults.read_timeout,
        help=f"read timeout, s (default: {defaults.read_timeout:g})",
    )
    http.add_argument(
        "--connect-timeout",
        type=_positive(float),
        default=defaults.connect_timeout,
        help=f"connect timeout, s (default: {defaults.connect_timeout:g})",
    )
    http.add_argument(
        "--attempts",
        type=_positive(int),
        default=retry.max_attempts,
        help=f"attempts per idempotent request (default: {retry.max_attempts})",
    )
    http.add_argument(
        "--backoff",
        type=_positive(float),
        default=retry.backoff_base,
        help=f"base of the exponential backoff between attempts, s (default: {retry.backoff_base:g})",
    )
    http.add_argument(
        "--retry-after-max",
        type=_positive(float),
        default=retry.retry_after_ceiling,
        help=f"longest Retry-After honoured, s (default: {retry.retry_after_ceiling:g})",
    )
    http.add_argument(
        "--max-pages",
        type=_positive(int),
        default=defaults.max_pages,
        help=f"pages per search (default: {defaults.max_pages})",
    )
    parser.add_argument(
        "--debug-phi",
        action="store_true",
        help="log every request URL (they carry patient ids) to stderr; off by default",
    )


class Progress:
    """A one-line progress bar on a stream (stderr), redrawn in place."""

    def __init__(self, stream: TextIO, width: int = 30):
        self.stream = stream
        self.width = width
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // total if total else self.width
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} patients")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()


def _print_report(args: argparse.Namespace, report: RunReport, *, out: TextIO, err: TextIO) -> None:
    assessments = sorted(report.assessments, key=lambda a: a.patient)
    if args.format == "json":
        data = [a.explained() if args.explain else a.contract() for a in assessments]
        print(json.dumps(data, indent=2), file=out)
    else:
        from ..cli import format_table

        print(format_table(assessments), file=out)
    for message in report.warnings:
        print(f"warning: {message}", file=err)
    for outcome in report.outcomes:
        for message in outcome.warnings:
            print(f"warning: {outcome.patient_ref}: {message}", file=err)
    for outcome in report.outcomes:
        if outcome.status == "written" and outcome.note:
            print(f"written: {outcome.patient_ref} ({outcome.note})", file=err)
    for outcome in report.failed:
        print(f"failed: {outcome.patient_ref}: {outcome.reason}", file=err)
    for outcome in report.with_problems:
        for message in outcome.problems:
            print(f"error: {outcome.patient_ref}: {message}", file=err)
    for line in summary(report, write_back=args.write_back):
        print(line, file=err)


def _settings(args: argparse.Namespace) -> ClientSettings:
    return ClientSettings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.timeout,
        retry=RetrySettings(
            max_attempts=args.attempts, backoff_base=args.backoff, retry_after_ceiling=args.retry_after_max
        ),
        max_pages=args.max_pages,
        debug_phi=args.debug_phi,
    )


def build_client(args: argparse.Namespace, *, session=None, environ=None) -> FhirClient:
    profile = get_profile(args.profile)
    if args.page_size:
        from dataclasses import replace

        profile = replace(profile, page_size=args.page_size)
    settings = _settings(args)
    auth = auth_from_options(
        token_file=args.token_file,
        smart_client_id=args.smart_client_id,
        smart_key=args.smart_key,
        smart_token_url=args.smart_token_url,
        smart_scope=args.smart_scope,
        smart_kid=args.smart_kid,
        fhir_base=args.fhir_base,
        environ=environ,
        session=session,
        timeout=(settings.connect_timeout, settings.read_timeout),
    )
    return FhirClient(args.fhir_base, settings=settings, profile=profile, auth=auth, session=session)


def _workers(args: argparse.Namespace, session) -> int:
    """--workers (default 1: one request at a time is what a hospital's server is least likely to
    throttle; more is the operator's choice); 1 with a `session` seam, which stays in this process."""
    if session is not None or args.workers is None:
        return 1
    return args.workers


def summary(report: RunReport, *, write_back: bool) -> list[str]:
    notes = Counter(o.note for o in report.outcomes if o.status == "written" and o.note)
    lines = [
        f"patients found {report.found}, assessed {report.count('assessed')}, written {report.count('written')}"
        + (f" ({', '.join(f'{n} {note}' for note, n in sorted(notes.items()))})" if notes else "")
        + f", unchanged {report.count('unchanged')}, failed {report.count('failed')}"
    ]
    if report.with_problems:
        lines.append(
            "problems (assessed, record incomplete): "
            + ", ".join(f"{o.patient_ref} ({'; '.join(o.problems)})" for o in report.with_problems)
        )
    pulled = [o for o in report.outcomes if o.pull_requests]
    if pulled:
        lines.append(
            f"round trips: pull {report.pulls_per_patient():.2f} per patient ({report.pull_requests} requests, "
            f"{len(pulled)} patients)"
            + (
                f"; write-back {report.writes_per_written():.2f} per patient written "
                f"({report.write_requests} requests, "
                f"{report.count('written')} written, {report.count('unchanged')} unchanged with none)"
                if write_back and report.count("written")
                else (f"; write-back none ({report.count('unchanged')} unchanged)" if write_back else "")
            )
            + f"; setup {report.setup_requests}"
        )
    # Patients whose medication could not be read, or was recognised by name only: counted here
    # as well as flagged, so that a run never passes over them in silence (docs/medications.md).
    unread = sum(1 for a in report.assessments if "medication-unresolved" in a.flags)
    by_text = sum(1 for a in report.assessments if "medication-by-text" in a.flags)
    if unread or by_text:
        lines.append(
            f"medications: {unread} patient(s) with a medication that could not be read (medication-unresolved), "
            f"{by_text} with an aromatase inhibitor recognised by name only (medication-by-text)"
        )
    return lines


def run_selection_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the choice of patients, if anything: exactly one of --patient, --all,
    --patients-file, --group, --bulk (which --group may accompany: a Group-level export)."""
    chosen = [name for name, given in (
        ("--patient", bool(args.patient)), ("--all", bool(args.all)),
        ("--patients-file", getattr(args, "patients_file", None) is not None), ("--bulk", bool(getattr(args, "bulk", False))),
    ) if given]
    if not chosen and args.group is None:
        return "choose the patients: --patient ID..., --all, --group ID, --patients-file FILE or --bulk"
    if args.group is not None and chosen and chosen != ["--bulk"]:
        return f"--group cannot be combined with {chosen[0]} (with --bulk it exports the Group)"
    return None


def _not_attempted(args: argparse.Namespace, why: str) -> RunReport:
    """The report of a run that could not start: each patient asked for, failed, not attempted."""
    report = RunReport(stopped=why)
    for pid in dict.fromkeys(args.patient or []):
        report.outcomes.append(PatientOutcome(patient_id=pid, status="failed", reason=f"not attempted: {why}"))
    return report


def run(
    args: argparse.Namespace,
    *,
    assessor: Assessor | None = None,
    session=None,
    environ=None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run the command. `assessor`: the process's shared Assessor (one is made when not given, or
    when --rules names another rule file); `session`, `environ`, `stdout`, `stderr` are seams.

    Whatever happens, the run ends with its output (the JSON of what was assessed), its
    failures, its summary and an exit status: 0 all done, 1 some patients failed, 2 the run
    itself failed (it could not start, or stopped before every patient was attempted)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    handler = None
    if args.debug_phi:
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("debug: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    progress = None
    client: FhirClient | None = None
    as_of = args.as_of or dt.date.today()
    try:
        problem = run_selection_problem(args)
        if problem:
            print(f"fatal: {problem}", file=err)
            return 2
        from ..report.outputs import PopulationOutputs

        written = PopulationOutputs(args.worklist, args.report)
        if (problem := written.problem()) is not None:
            print(f"fatal: {problem}", file=err)
            return 2
        if getattr(args, "bulk", False):
            from ..bulk.command import run_bulk

            return run_bulk(args, assessor=assessor, environ=environ, session=session, stdout=out, stderr=err)

        try:
            if assessor is None or args.rules is not None:
                assessor = Assessor(args.rules)
            catalogue = None
            if args.write_back:
                from ..careplan import load_catalogue

                catalogue = load_catalogue(assessor.paths.catalogue)
            client = build_client(args, session=session, environ=environ)
        except AiblError as exc:
            print(f"fatal: {exc}", file=err)
            report = _not_attempted(args, "the run could not start")

        else:
            population = args.all or args.group is not None or args.patients_file is not None
            show = args.progress == "always" or (args.progress == "auto" and population and err.isatty())
            progress = Progress(err) if show else None
            runner = Runner(
                client, assessor, as_of=as_of, write_back=args.write_back, catalogue=catalogue, on_progress=progress
            )
            workers = _workers(args, session)
            if workers > 1:
                from ..population.pulls import ParallelPatients

                runner.parallel = lambda ids: ParallelPatients(args, environ, as_of, ids, workers)
            try:
                if args.patients_file is not None:
                    from .population import read_patients_file

                    report = runner.run(read_patients_file(args.patients_file))
                elif args.group is not None:
                    report = runner.run(group=args.group)
                else:
                    report = runner.run(None if args.all else args.patient)
            except AiblError as exc:
                if progress:
                    progress.close()
                print(f"fatal: {exc}", file=err)
                report = _not_attempted(args, "the run could not start")
            except Exception as exc:  # noqa: BLE001 - the run ends with its report, never a traceback
                if progress:
                    progress.close()
                log.debug("unexpected error in the run", exc_info=True)
                print(f"fatal: unexpected error ({type(exc).__name__}: {str(exc)[:200]})", file=err)
                report = _not_attempted(args, "the run could not start")
            else:
                if progress:
                    progress.close()
                if report.stopped:
                    print(f"fatal: the run stopped before every patient was attempted: {report.stopped}", file=err)
        _print_report(args, report, out=out, err=err)
        print(
            f"ruleset {assessor.rulebook.name if assessor is not None else 'not loaded'}; as of {as_of}; "
            f"server {client.base_url if client is not None else args.fhir_base} "
            f"({client.profile.name if client is not None else args.profile})",
            file=err,
        )
        if report.stopped:
            if written.wanted:  # a part of the population would hide the patients not reached
                print("worklist and report not written: the run stopped before every patient was attempted", file=err)
            return 2
        for assessment in sorted(report.assessments, key=lambda a: a.patient) if written.wanted else ():
            written.add(assessment)
        unwritten = not written.write(as_of, err)
        return 1 if report.failed or report.with_problems or unwritten else 0
    finally:
        if handler is not None:
            log.removeHandler(handler)
