"""`fhir-aibl run`: assess patients on a FHIR server, and write CarePlans back.

    fhir-aibl run --fhir-base URL (--patient ID ... | --all) [--as-of DATE] [--write-back]
                  [--format table|json] [--explain] [--profile NAME]
                  [--token-file FILE | --smart-client-id ID --smart-key FILE [--smart-token-url URL]]

Authentication: `--token-file`, else the environment variable FHIR_AIBL_TOKEN, else SMART
Backend Services with `--smart-*`, else none. A secret is never an argument.

Output: stdout carries the result, in the same JSON contract as `fhir-aibl assess`
(`--format json`) or its table; stderr carries the progress bar (population runs on a
terminal), warnings, the failures with their reasons and a summary: patients found,
assessed, written, unchanged, failed, and the round trips measured.

Exit status: 0 every patient found was assessed (and written or unchanged); 1 some
patient failed (the others are done); 2 nothing could run (bad arguments or settings,
the server unreachable, credentials refused, no population search).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path
from typing import TextIO

from ..assess import RULES_DIR, Assessor
from ..errors import AiblError
from .auth import DEFAULT_SCOPE, TOKEN_ENV, auth_from_options
from .client import FhirClient
from .profiles import PROFILES, get_profile
from .runner import Runner, RunReport
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
    defaults = ClientSettings()
    retry = RetrySettings()
    parser.add_argument(
        "--fhir-base", required=True, metavar="URL", help="FHIR R4 base URL, e.g. https://ehr.example/fhir/R4"
    )
    who = parser.add_mutually_exclusive_group(required=run)
    who.add_argument("--patient", nargs="+", metavar="ID", help="assess these patients (Patient ids)")
    who.add_argument(
        "--all",
        action="store_true",
        help="assess every patient with an active or intended aromatase-inhibitor medication",
    )
    from ..bulk.command import add_bulk_arguments

    add_bulk_arguments(parser, who if run else None)
    parser.add_argument("--as-of", type=_date, default=None, help="reference date (default: today)")
    parser.add_argument(
        "--write-back",
        action="store_true",
        help="write a CarePlan, RiskAssessment and Provenance per patient (idempotent)",
    )
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument(
        "--explain", action="store_true", help="json: add as_of, ruleset and every finding's rules and evidence"
    )
    parser.add_argument(
        "--profile", choices=sorted(PROFILES), default="generic", help="server vendor profile (default: generic)"
    )
    parser.add_argument("--rules", type=Path, default=None, help="rule file (default: rules/aibl.yaml)")
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


def _settings(args: argparse.Namespace) -> ClientSettings:
    return ClientSettings(
        connect_timeout=args.connect_timeout,
        read_timeout=args.timeout,
        retry=RetrySettings(max_attempts=args.attempts, retry_after_ceiling=args.retry_after_max),
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
    lines = [
        f"patients found {report.found}, assessed {report.count('assessed')}, written {report.count('written')}, "
        f"unchanged {report.count('unchanged')}, failed {report.count('failed')}"
    ]
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
    return lines


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
    when --rules names another rule file); `session`, `environ`, `stdout`, `stderr` are seams."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    handler = None
    if args.debug_phi:
        handler = logging.StreamHandler(err)
        handler.setFormatter(logging.Formatter("debug: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
    progress = None
    try:
        if getattr(args, "bulk", False):
            from ..bulk.command import run_bulk

            return run_bulk(args, assessor=assessor, environ=environ, session=session, stdout=out, stderr=err)
        as_of = args.as_of or dt.date.today()
        try:
            if assessor is None or args.rules is not None:
                assessor = Assessor(args.rules)
            catalogue = None
            if args.write_back:
                from ..careplan import load_catalogue

                catalogue = load_catalogue((args.rules.parent if args.rules else RULES_DIR) / "recommendations.yaml")
            client = build_client(args, session=session, environ=environ)
        except AiblError as exc:
            print(f"fatal: {exc}", file=err)
            return 2
        show = args.progress == "always" or (args.progress == "auto" and args.all and err.isatty())
        progress = Progress(err) if show else None
        runner = Runner(
            client, assessor, as_of=as_of, write_back=args.write_back, catalogue=catalogue, on_progress=progress
        )
        workers = _workers(args, session)
        if workers > 1:
            from ..population.pulls import ParallelPatients

            runner.parallel = lambda ids: ParallelPatients(args, environ, as_of, ids, workers)
        try:
            report = runner.run(None if args.all else args.patient)
        except AiblError as exc:
            if progress:
                progress.close()
            print(f"fatal: {exc}", file=err)
            return 2
        if progress:
            progress.close()
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
        for outcome in report.failed:
            print(f"failed: {outcome.patient_ref}: {outcome.reason}", file=err)
        for line in summary(report, write_back=args.write_back):
            print(line, file=err)
        print(
            f"ruleset {assessor.rulebook.name}; as of {as_of}; server {client.base_url} ({client.profile.name})",
            file=err,
        )
        return 1 if report.failed else 0
    finally:
        if handler is not None:
            log.removeHandler(handler)
