"""The `fhir-aibl` command.

    fhir-aibl assess PATH... [--as-of DATE] [--format table|json|fhir|html] [--out DIR] [--rules DIR-or-FILE] [--mode M] [--explain]
    fhir-aibl run --fhir-base URL (--patient ID ... | --all) [--write-back] ...   (fhir_aibl/fhir/command.py)
    fhir-aibl serve [--host 127.0.0.1] [--port 8080] [--config FILE]              (fhir_aibl/cds/command.py)
    fhir-aibl synth --patients N --seed S --out DIR                                 (fhir_aibl/synth.py)
    fhir-aibl rules check|doc [--rules DIR-or-FILE]
    fhir-aibl demo [PATH...] [--as-of DATE] [--out DIR] [--rules DIR-or-FILE]

Exit status: 0 when every input was used; 1 when some input was rejected (each rejection
is printed to stderr, naming the file and the resource; every other patient is still
assessed); 2 when nothing could run (bad arguments, a rule file that does not load).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import __version__
from .assess import PATIENT_MISSING, Assessor, Result
from .assessment import Assessment
from .errors import AiblError, NoUsableDataError, PatientMissingError
from .resources import RULES_HELP, examples_dir
from .sources import PatientRecord, iter_records

#: The worked examples shipped with the package (the repository's fixtures/bundles).
FIXTURES_DIR = examples_dir() / "bundles"


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


EXIT_ASSESS = """exit status:
  0  every input was used
  1  some input was rejected (each rejection on stderr; every other patient is still assessed)
  2  nothing could run (bad arguments, a ruleset that does not load)"""
EXIT_CHECK = """exit status:
  0  no hole, conflict or dead rule in any mode checked
  1  the review found a problem (the report names the combination or the rule)
  2  nothing could run (bad arguments, a ruleset that does not load)"""
EXIT_DOC = """exit status:
  0  both files written
  2  nothing could run (bad arguments, a ruleset that does not load, the folder cannot be written)"""
EXIT_RUN = """exit status:
  0  every patient done
  1  some patient failed (every other patient done)
  2  nothing could run (bad arguments or settings, server unreachable, credentials refused at
     the start, no population search on this server profile)"""
EXIT_SERVE = """exit status:
  0  clean stop (Ctrl-C, SIGTERM)
  2  the service cannot start (a settings file that does not load or validate, a ruleset that
     does not load, the port in use)"""
EXIT_SYNTH = """exit status:
  0  the population was written
  2  nothing was written (bad arguments, NDJSON files already in DIR without --force)"""


def _sub(sub: Any, name: str, help: str, epilog: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name, help=help, description=help[0].upper() + help[1:] + ".", epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhir-aibl",
        description="Clinical decision support for aromatase-inhibitor-associated bone loss (AIBL) on FHIR R4. "
        "Decision support for clinician review: it orders nothing. `fhir-aibl COMMAND --help` describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"fhir-aibl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    assess = _sub(sub, "assess", "assess patients in FHIR Bundles, NDJSON files or directories", EXIT_ASSESS)
    assess.add_argument(
        "paths", nargs="+", metavar="PATH",
        help="a FHIR Bundle, a single resource, an NDJSON file (Bulk Data layout) or a folder of them; "
        "resources are grouped by patient",
    )
    assess.add_argument("--as-of", type=_date, default=None, metavar="YYYY-MM-DD",
                        help="reference date; data recorded after it is not used (default: today)")
    assess.add_argument(
        "--format", choices=("table", "json", "fhir", "html"), default="table",
        help="table: a table on stdout; json: one JSON array, one object per patient (the output contract); "
        "fhir: a transaction Bundle of CarePlans and RiskAssessments; html: the bone-health view, one page per "
        "patient plus index.html in --out (default: table)",
    )
    assess.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="with --format html: the folder for one page per patient and index.html (no default: required)")
    assess.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE", help=RULES_HELP)
    assess.add_argument(
        "--mode", default="default",
        help="boundary mode of the ruleset: default (T = -1.5 exactly counts as low bone density) or hadji "
        "(strictly below -1.5) (default: default)",
    )
    assess.add_argument(
        "--explain", action="store_true", help="with --format json: add as_of, ruleset and the rules and evidence of every finding"
    )

    rules = _sub(sub, "rules", "review the ruleset as a whole",
                 "exit status: see `fhir-aibl rules check --help` and `fhir-aibl rules doc --help`")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    check = _sub(rules_sub, "check", "enumerate the decision space; exit 1 on a hole, a conflict or a dead rule", EXIT_CHECK)
    check.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE", help=RULES_HELP)
    check.add_argument("--mode", action="append", default=None, metavar="MODE",
                       help="boundary mode to check; repeat for several (default: every mode of the ruleset)")
    doc = _sub(rules_sub, "doc", "write the ruleset as Markdown and HTML (rules.md, rules.html) for a clinical reviewer", EXIT_DOC)
    doc.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE", help=RULES_HELP)
    doc.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                     help="folder to write rules.md and rules.html into, created if missing; the project's own copies "
                     "are in docs/ (default: the current folder)")

    from .cds import command as cds_command
    from .fhir import command as fhir_command

    run = _sub(sub, "run", "assess patients on a FHIR server, optionally writing CarePlans back", EXIT_RUN)
    fhir_command.add_arguments(run)
    serve = _sub(sub, "serve", "serve AIBL decision support to EHRs as a CDS Hooks 2.0 service", EXIT_SERVE)
    cds_command.add_arguments(serve)
    from . import synth

    synth.add_arguments(_sub(sub, "synth", "write a synthetic population (Bulk Data NDJSON) for benchmarks", EXIT_SYNTH))

    demo = _sub(sub, "demo", "assess the built-in worked examples (and any PATH given)", EXIT_ASSESS)
    demo.add_argument("paths", nargs="*", metavar="PATH",
                      help="more records to assess beside the worked examples, as for assess (default: none)")
    demo.add_argument("--as-of", type=_date, default=dt.date(2026, 6, 1), metavar="YYYY-MM-DD",
                      help="reference date (default: 2026-06-01, that of the worked examples)")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), metavar="DIR",
                      help="folder for careplans-bundle.json and assessments.json, created if missing (default: out/demo)")
    demo.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE", help=RULES_HELP)
    return parser


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def run_assessments(
    assessor: Assessor, records: Iterable[PatientRecord | AiblError], as_of: dt.date
) -> tuple[list[Result], list[AiblError]]:
    """Assess every record; a failure is reported for its patient and the rest carry on."""
    problems: list[AiblError] = []
    results = list(iter_assessments(assessor, records, as_of, problems))
    return results, problems


def iter_assessments(
    assessor: Assessor, records: Iterable[PatientRecord | AiblError], as_of: dt.date, problems: list[AiblError]
) -> Iterator[Result]:
    """`run_assessments` one result at a time: problems are appended to `problems` as they are met."""
    for item in records:
        if isinstance(item, AiblError):
            problems.append(item)
            continue
        source = ", ".join(item.sources)
        try:
            result = assessor.assess(item.patient_ref, item.resources, as_of)
        except AiblError as exc:
            exc.source = exc.source or source
            exc.resource = exc.resource or item.patient_ref
            problems.append(exc)
            continue
        if not result.facts.facts:
            problems.append(
                NoUsableDataError(
                    "nothing to assess: no Patient and no recognised Observation, medication or Condition",
                    source=source,
                    resource=item.patient_ref,
                )
            )
            continue
        for note in result.facts.problems:
            _err(f"warning: {note}")
        if result.patient_missing:
            # Still assessed and printed, but the run must say the record is incomplete (exit 1).
            problems.append(PatientMissingError(PATIENT_MISSING, source=source, resource=item.patient_ref))
        yield result


def write_json_array(items: Iterable[Any], out: TextIO) -> None:
    """`print(json.dumps(list(items), indent=2))`, written as the items come, so none is held.

    The bytes are the same: json.dumps indents an array's items by one level and their
    contents by the same steps, and it escapes every newline inside a string.
    """
    first = True
    for item in items:
        out.write("[\n" if first else ",\n")
        out.write("\n".join("  " + line for line in json.dumps(item, indent=2).split("\n")))
        first = False
    out.write("[]\n" if first else "\n]\n")


def format_table(assessments: Sequence[Assessment]) -> str:
    headers = ("patient", "AI", "category", "T/Z (site)", "risk factors", "recommendations", "flags")
    rows = []
    for a in assessments:
        first = a.selected_t[0] if a.selected_t else None
        t = f"{first.score} {first.value:+.1f} ({first.site})" if first else "-"
        rows.append(
            (
                a.patient,
                a.ai_status,
                a.category,
                t,
                ", ".join(a.risk_factors) or "-",
                ", ".join(a.recommendations) or "-",
                ", ".join(a.flags) or "-",
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def fhir_bundle_json(results: Sequence[Result | Assessment], catalogue_path: Path | None = None) -> str:
    """The assessments as a transaction Bundle, with the texts of the ruleset's own catalogue
    (`Assessor.paths.catalogue`; None: the shipped one). Given the `Result`s, the texts name the
    patient's own values (from the facts); given bare assessments, only what the assessment says."""
    from .careplan import build_resources, load_catalogue, transaction_bundle
    from .clinician_text import PatientValues
    from .resources import ruleset_paths

    catalogue = load_catalogue(catalogue_path or ruleset_paths().catalogue)
    pairs = [
        build_resources(r.assessment, catalogue, values=PatientValues(r.assessment, r.facts))
        if isinstance(r, Result)
        else build_resources(r, catalogue)
        for r in results
    ]
    bundle = transaction_bundle(pairs)
    return json.dumps(json.loads(bundle.model_dump_json(exclude_none=True)), indent=2)


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often while the block runs.

    Reading allocates millions of short-lived JSON containers (two parses of every line)
    that never form cycles: reference counting frees them. At the default threshold
    (a collection every 700 net allocations) the collector scans them tens of thousands of
    times for nothing, about 15% of `assess` (bench/workers.py cli). Cycles are still
    collected, just in larger batches; the previous thresholds are restored afterwards.
    bench/workers.py measures the `assess` pipeline under it too, as the command runs it.
    """
    saved = gc.get_threshold()
    gc.set_threshold(20_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*saved)


def _assess_command(args: argparse.Namespace) -> int:
    with fewer_collections():
        return _assess(args)


def _assess(args: argparse.Namespace) -> int:
    as_of = args.as_of or dt.date.today()
    assessor = Assessor(args.rules, mode=args.mode)
    records = iter_records(args.paths, terminology=assessor.terminology)
    if args.format == "html":
        return _assess_html(args, assessor, records, as_of)
    if args.format == "json":
        # Streamed: one patient's result at a time, so memory does not grow with the input.
        # The errors follow the output on stderr instead of preceding it; both streams hold
        # what they held before.
        problems: list[AiblError] = []
        results = iter_assessments(assessor, records, as_of, problems)
        write_json_array((r.assessment.explained() if args.explain else r.assessment.contract() for r in results), sys.stdout)
        for problem in problems:
            _err(f"error: {problem}")
        return 1 if problems else 0
    results_list, problems = run_assessments(assessor, records, as_of)
    assessments = [r.assessment for r in results_list]
    for problem in problems:
        _err(f"error: {problem}")
    if args.format == "fhir":
        print(fhir_bundle_json(results_list, assessor.paths.catalogue))
    else:
        print(format_table(assessments))
        incomplete = sum(isinstance(p, PatientMissingError) for p in problems)
        rejected = f"{len(problems) - incomplete} rejected" + (f", {incomplete} without a usable Patient" if incomplete else "")
        print(f"\n{len(assessments)} assessed, {rejected}; ruleset {assessor.rulebook.name}; as of {as_of}")
    return 1 if problems else 0


def _assess_html(args: argparse.Namespace, assessor: Assessor, records: Any, as_of: dt.date) -> int:
    from .view.site import write_site

    if args.out is None:
        _err("error: --format html needs --out DIR (the folder for the pages)")
        return 2
    problems: list[AiblError] = []
    pages = write_site(assessor, records, as_of, args.out, problems)
    for problem in problems:
        _err(f"error: {problem}")
    print(f"{len(pages) - 1} patient pages and {pages[-1]} written; {len(problems)} rejected; as of {as_of}")
    return 1 if problems else 0


def demo_paths(extra: Sequence[Path] = ()) -> list[Path]:
    """The worked examples shipped with the package, then any records given."""
    return [FIXTURES_DIR, *extra]


def _demo_command(args: argparse.Namespace) -> int:
    assessor = Assessor(args.rules)
    paths = demo_paths(args.paths)
    results, problems = run_assessments(assessor, iter_records(paths, terminology=assessor.terminology), args.as_of)
    assessments = [r.assessment for r in results]
    print(f"fhir-aibl demo: {', '.join(str(p) for p in paths)}; as of {args.as_of}; ruleset {assessor.rulebook.name}\n")
    print(format_table(assessments))
    for problem in problems:
        _err(f"error: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    fhir_path = args.out / "careplans-bundle.json"
    fhir_path.write_text(fhir_bundle_json(results, assessor.paths.catalogue) + "\n")
    json_path = args.out / "assessments.json"
    json_path.write_text(json.dumps([a.explained() for a in assessments], indent=2) + "\n")
    print(f"\n{len(assessments)} patients assessed, {len(problems)} inputs rejected.")
    print(f"FHIR transaction Bundle (CarePlan + RiskAssessment per patient): {fhir_path}")
    print(f"Assessments with rules and evidence: {json_path}")
    return 1 if problems else 0


def _rules_command(args: argparse.Namespace) -> int:
    from .rulecheck import check, format_report
    from .ruledoc import write_docs

    if args.rules_command == "doc":
        assessor = Assessor(args.rules)
        try:
            md, html_path = write_docs(assessor, args.out)
        except OSError as exc:
            _err(f"fatal: cannot write into {args.out}: {exc.strerror or exc}")
            return 2
        print(f"wrote {md} and {html_path}")
        return 0
    modes = args.mode or list(Assessor(args.rules).rulebook.modes)
    failed = False
    for mode in modes:
        report = check(Assessor(args.rules, mode=mode))
        print(format_report(report))
        failed |= not report.ok
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "assess":
            return _assess_command(args)
        if args.command == "rules":
            return _rules_command(args)
        if args.command == "run":
            from .fhir import command as fhir_command

            return fhir_command.run(args)
        if args.command == "serve":
            from .cds import command as cds_command

            return cds_command.run(args)
        if args.command == "synth":
            from . import synth

            return synth.run(args)
        return _demo_command(args)
    except AiblError as exc:  # rules that do not load, and the like: nothing can run
        _err(f"fatal: {exc}")
        return 2
    except BrokenPipeError:  # `fhir-aibl assess ... | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
