"""`fhir-aibl assess PATH... --engine spark --out DIR [--spark-master URL]`: the command line of the Spark engine.

Exit status as `assess`: 0 every input used; 1 some input rejected (every other patient
still assessed; each problem in DIR/problems, the first ones on stderr); 2 nothing could run
(PySpark or Java missing, Spark does not start, a ruleset that does not load, bad arguments,
outputs already in DIR).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

INSTALL = "the Spark engine needs PySpark and Java 17: install fhir-aibl[spark]"


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def session(master: str | None) -> tuple[Any, bool]:
    """The active SparkSession (spark-submit's, a notebook's, a test's), else a new one; and whether it is ours to stop."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    builder = SparkSession.builder.appName("fhir-aibl assess")
    if master:
        builder = builder.master(master)
    launched = "PYSPARK_GATEWAY_PORT" in os.environ  # spark-submit or a notebook started the JVM and gave its settings
    if not launched and (master is None or master.startswith("local")):
        # A local run from this command: the workers run this interpreter (the one fhir-aibl is
        # installed in), and nothing listens beyond this machine (no web UI, the loopback only).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (
            builder.config("spark.ui.enabled", "false")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.showConsoleProgress", "false")
        )
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark, True


def run_command(args: argparse.Namespace) -> int:
    """`assess --engine spark` with the parsed arguments of `assess`."""
    if args.out is None:
        _err("error: --engine spark needs --out DIR (the folder for the outputs; any path Spark can write)")
        return 2
    if args.workers is not None or args.worklist is not None or args.format != "table":
        _err("error: --engine spark writes every output into --out (assessments, CarePlans, RiskAssessments, "
             "problems, worklist.parquet); --format, --worklist and --workers do not apply")
        return 2
    if getattr(args, "report", None) is not None:
        _err("error: --engine spark writes no HTML report; make it from its assessments afterwards: "
             "fhir-aibl report OUT/assessments --report PATH.html")
        return 2
    try:
        import pyspark  # noqa: F401
    except ImportError:
        _err(f"fatal: {INSTALL}")
        return 2
    from ..assess import Assessor
    from . import job

    assessor = Assessor(args.rules, mode=args.mode)  # a ruleset that does not load stops here (exit 2)
    as_of = args.as_of or dt.date.today()
    out = str(args.out)
    try:
        spark, owned = session(args.spark_master)
    except Exception as exc:  # no Java, a master that cannot be reached
        _err(f"fatal: Spark did not start ({INSTALL}; JAVA_HOME set?): {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        return 2
    try:
        existing = job.existing_outputs(spark, out)
        if existing:
            _err(f"fatal: {out} already holds {', '.join(existing)}: choose a new folder (a run never writes over another)")
            return 2
        summary = job.run(
            spark, list(args.paths), out, as_of=as_of,
            rules_path=str(Path(args.rules).resolve()) if args.rules else None,
            mode=args.mode, explain=args.explain,
        )
    finally:
        if owned:
            spark.stop()
    for text in summary.printed:
        _err(text)
    shown = len(summary.printed)
    if summary.errors + summary.warnings > shown:
        _err(f"... {summary.errors + summary.warnings - shown} more in {out}/problems")
    _err(
        f"spark: {summary.files} files; {summary.assessed} assessed, {summary.errors} errors, {summary.warnings} warnings; "
        f"worklist: {summary.worklist} patients on an aromatase inhibitor with a care gap; "
        f"ruleset {assessor.rulebook.name}; as of {as_of}; outputs in {out}"
    )
    return 1 if summary.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fhir_aibl.spark` / `spark-submit .../fhir_aibl/spark/__main__.py`: `assess --engine spark` with these arguments."""
    from ..cli import main as cli_main

    return cli_main(["assess", *(sys.argv[1:] if argv is None else argv), "--engine", "spark"])
