"""The `fhir-aibl` command.

    fhir-aibl assess PATH... [--as-of DATE] [--format table|json|fhir|html] [--out DIR] [--rules DIR-or-FILE] [--mode M] [--explain]
    fhir-aibl run --fhir-base URL (--patient ID ... | --all) [--write-back] ...   (fhir_aibl/fhir/command.py)
    fhir-aibl serve [--host 127.0.0.1] [--port 8080] [--config FILE]              (fhir_aibl/cds/command.py)
    fhir-aibl synth --patients N --seed S --out DIR                                 (fhir_aibl/synth.py)
    fhir-aibl report ASSESSMENTS... [--worklist PATH] [--report PATH.html]          (fhir_aibl/report/command.py)
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
from .assess import Assessor, Result, assess_record, record_problems
from .assessment import Assessment
from .errors import AiblError, PatientMissingError
from .report.outputs import PopulationOutputs, add_output_arguments
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
  1  some patient failed, or was assessed without a usable Patient (every other patient done)
  2  the run itself failed: nothing could run (bad arguments or settings, server unreachable,
     credentials refused, capabilities unreadable, no population search on this server profile),
     or it stopped before every patient was attempted"""
EXIT_EXPORT = """exit status:
  0  the export was downloaded whole
  1  the export finished with errors (the manifest's error files, a file that could not be had)
  2  nothing could run (bad arguments or settings, server unreachable, credentials refused,
     the export refused or not finished before its deadline)"""
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return value



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
    assess.add_argument("--out", default=None, metavar="DIR",
                        help="with --format html: the folder for one page per patient and index.html; with --engine spark: "
                        "the folder for every output, any path Spark writes (no default: required)")
    assess.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE", help=RULES_HELP)
    assess.add_argument(
        "--mode", default="default",
        help="boundary mode of the ruleset: default (T = -1.5 exactly counts as low bone density) or hadji "
        "(strictly below -1.5) (default: default)",
    )
    assess.add_argument(
        "--explain", action="store_true", help="with --format json: add as_of, ruleset and the rules and evidence of every finding"
    )
    add_output_arguments(assess)
    assess.add_argument(
        "--workers",
        type=_positive,
        default=None,
        metavar="N",
        help="worker processes (default: one per core for inputs of 8 MB or more, else 1); same output for any N",
    )
    assess.add_argument(
        "--engine",
        choices=("local", "spark"),
        default="local",
        help="local: this machine (worker processes, --workers); spark: an Apache Spark cluster, PATHs any Spark reads "
        "(s3a://, abfss://, dbfs:/, hdfs://), every output written into --out (needs fhir-aibl[spark]; docs/spark.md) "
        "(default: local)",
    )
    assess.add_argument(
        "--spark-master",
        default=None,
        metavar="URL",
        help="with --engine spark: the Spark master, e.g. local[2] or spark://host:7077 (default: the one spark-submit "
        "gives, else local[*])",
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
    export = _sub(sub, "export", "export patients' data with FHIR Bulk Data ($export) into a folder", EXIT_EXPORT)
    fhir_command.add_arguments(export, run=False)
    from .writeback import command as writeback_command

    writeback_command.add_arguments(_sub(sub, "write-back", writeback_command.HELP, writeback_command.EXIT))
    serve = _sub(sub, "serve", "serve AIBL decision support to EHRs as a CDS Hooks 2.0 service", EXIT_SERVE)

    cds_command.add_arguments(serve)
    from .report import command as report_command

    report_command.add_arguments(
        _sub(sub, "report", "write the worklist and the population report from saved assessments",
             report_command.EXIT_REPORT),
        _date,
    )
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
        try:
            result = assess_record(assessor, item, as_of)
        except AiblError as exc:
            problems.append(exc)
            continue
        for note in result.facts.problems:
            _err(f"warning: {note}")
        # still assessed and printed, but the run must say the record is incomplete (exit 1)
        problems.extend(record_problems(result, item))
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


def with_careplans(
    assessor: Assessor, records: Iterable[PatientRecord | AiblError], as_of: dt.date, problems: list[AiblError]
) -> Iterator[tuple[Result, tuple[Any, Any]]]:
    """Each result with its (RiskAssessment, CarePlan), built while the patient's resources are at
    hand, so that the text names the patient's own values with their dates; the texts come from the
    ruleset's own catalogue (`Assessor.paths.catalogue`)."""
    from .careplan import build_resources, load_catalogue
    from .clinician_text import PatientValues

    catalogue = load_catalogue(assessor.paths.catalogue)
    for item in records:
        for result in iter_assessments(assessor, [item], as_of, problems):
            values = PatientValues(result.assessment, result.facts, item.resources)  # type: ignore[union-attr]
            yield result, build_resources(result.assessment, catalogue, values=values)


def fhir_bundle_json(pairs: Sequence[tuple[Any, Any]]) -> str:
    """The (RiskAssessment, CarePlan) pairs as a transaction Bundle."""
    from .careplan import transaction_bundle

    bundle = transaction_bundle(list(pairs))
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
    if args.engine == "spark":
        from .spark.command import run_command

        return run_command(args)
    if args.spark_master is not None:
        _err("error: --spark-master is for --engine spark")
        return 2
    as_of = args.as_of or dt.date.today()
    written = PopulationOutputs(args.worklist, args.report)
    if (problem := written.problem()) is not None:
        _err(f"fatal: {problem}")
        return 2
    assessor = Assessor(args.rules, mode=args.mode)
    if args.format == "html":
        return _assess_html(args, assessor, iter_records(args.paths, terminology=assessor.terminology), as_of, written)
    from .population import choose_workers

    workers = choose_workers(args.paths, args.workers)

    if args.format == "json":
        # Streamed: one patient's result at a time, so memory does not grow with the input.
        # The errors follow the output on stderr instead of preceding it; both streams hold
        # what they held before.
        problems: list[AiblError] = []
        if workers > 1:
            items = _population(args, assessor, as_of, workers, "explained" if args.explain else "contract", problems)
        else:
            results = iter_assessments(assessor, iter_records(args.paths, terminology=assessor.terminology), as_of, problems)
            items = (r.assessment.explained() if args.explain else r.assessment.contract() for r in results)
        write_json_array(written.tee(items) if written.wanted else items, sys.stdout)
        for problem in problems:
            _err(f"error: {problem}")
        return 1 if not written.write(as_of, sys.stderr) or problems else 0
    if workers > 1 and args.format != "fhir":
        problems = []
        assessments = list(_population(args, assessor, as_of, workers, "assessment", problems))
    elif args.format == "fhir":  # the CarePlans' text names the patient's values, from the facts and resources
        problems = []
        made = list(with_careplans(assessor, iter_records(args.paths, terminology=assessor.terminology), as_of, problems))
        assessments = [result.assessment for result, _pair in made]
    else:
        results_list, problems = run_assessments(assessor, iter_records(args.paths, terminology=assessor.terminology), as_of)
        assessments = [r.assessment for r in results_list]
    for problem in problems:
        _err(f"error: {problem}")
    if args.format == "fhir":
        print(fhir_bundle_json([pair for _result, pair in made]))
    else:
        print(format_table(assessments))
        incomplete = sum(isinstance(p, PatientMissingError) for p in problems)
        rejected = f"{len(problems) - incomplete} rejected" + (f", {incomplete} without a usable Patient" if incomplete else "")
        print(f"\n{len(assessments)} assessed, {rejected}; ruleset {assessor.rulebook.name}; as of {as_of}")
    for assessment in assessments if written.wanted else ():
        written.add(assessment)
    return 1 if not written.write(as_of, sys.stderr) or problems else 0


def _assess_html(
    args: argparse.Namespace, assessor: Assessor, records: Any, as_of: dt.date, written: PopulationOutputs
) -> int:
    from .view.site import write_site

    if args.out is None:
        _err("error: --format html needs --out DIR (the folder for the pages)")
        return 2
    problems: list[AiblError] = []
    pages = write_site(assessor, records, as_of, Path(args.out), problems, on_assessment=written.add if written.wanted else None)
    for problem in problems:
        _err(f"error: {problem}")
    print(f"{len(pages) - 1} patient pages and {pages[-1]} written; {len(problems)} rejected; as of {as_of}")
    return 1 if not written.write(as_of, sys.stderr) or problems else 0


def demo_paths(extra: Sequence[Path] = ()) -> list[Path]:
    """The worked examples shipped with the package, then any records given."""
    return [FIXTURES_DIR, *extra]


def _population(
    args: argparse.Namespace, assessor: Assessor, as_of: dt.date, workers: int, payload: str, problems: list[AiblError]
) -> Iterator[Any]:
    """The patients' payloads from worker processes (fhir_aibl/population): what one process gives, in its order."""
    from .population import assess_population, one_process_items

    return assess_population(
        args.paths,
        as_of=as_of,
        workers=workers,
        payload=payload,
        problems=problems,
        on_warning=lambda note: _err(f"warning: {note}"),
        rules_path=args.rules,
        mode=args.mode,
        one_process=lambda: one_process_items(args.paths, assessor, as_of, payload),
    )


def _demo_command(args: argparse.Namespace) -> int:
    assessor = Assessor(args.rules)
    paths = demo_paths(args.paths)
    problems: list[AiblError] = []
    made = list(with_careplans(assessor, iter_records(paths, terminology=assessor.terminology), args.as_of, problems))
    assessments = [result.assessment for result, _pair in made]
    print(f"fhir-aibl demo: {', '.join(str(p) for p in paths)}; as of {args.as_of}; ruleset {assessor.rulebook.name}\n")
    print(format_table(assessments))
    for problem in problems:
        _err(f"error: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    fhir_path = args.out / "careplans-bundle.json"
    fhir_path.write_text(fhir_bundle_json([pair for _result, pair in made]) + "\n")
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
        if args.command == "export":
            from .bulk.command import run_export

            return run_export(args)
        if args.command == "write-back":
            from .writeback import command as writeback_command

            return writeback_command.run(args)
        if args.command == "serve":
            from .cds import command as cds_command

            return cds_command.run(args)
        if args.command == "report":
            from .report import command as report_command

            return report_command.run(args)
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
