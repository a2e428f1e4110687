"""Benchmark workers: each measurement runs in a process of its own, started by bench/run.py.

    python bench/workers.py engine [--patients 2000] [--evaluations 50000] [--seed 1]
    python bench/workers.py parse DIR
    python bench/workers.py assess DIR [--variant shipped|no-validation]
    python bench/workers.py cli DIR

Each prints one JSON object on its last line of stdout. A fresh process per measurement
makes peak memory (`ru_maxrss`) mean that measurement's peak, and keeps one measurement's
warm caches out of the next. Nothing here asserts a time: these are measurements.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

AS_OF = dt.date(2026, 6, 1)


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # Linux: kB


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return peak_rss_mb()  # pragma: no cover - not Linux


def one_core() -> int | None:
    """Pin this process to one CPU, so that "per core" means one core. Returns the CPU, or None."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return cpus[-1]
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return None


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- engine


def fact_pool(patients: int, seed: int):
    """Facts of `patients` synthetic patients, extracted once (the engine bench starts from facts)."""
    from fhir_aibl import synth
    from fhir_aibl.assess import Assessor
    from fhir_aibl.facts import extract_facts

    assessor = Assessor()
    pool = []
    for i in range(patients):
        resources = synth.patient_record(seed, i, AS_OF)
        pid = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        pool.append(extract_facts(f"Patient/{pid}", resources, AS_OF, assessor.terminology).facts)
    return assessor, pool


def engine(args: argparse.Namespace) -> dict:
    from fhir_aibl.assess import build_assessment

    cpu = one_core()
    t0 = time.perf_counter()
    assessor, pool = fact_pool(args.patients, args.seed)
    setup = time.perf_counter() - t0
    evaluate = assessor.engine.evaluate
    for facts in pool[: min(len(pool), 300)]:  # warm-up: caches, first-session paths
        evaluate(facts)
    n = args.evaluations
    t0 = time.perf_counter()
    for i in range(n):
        evaluate(pool[i % len(pool)])
    engine_s = time.perf_counter() - t0
    # engine + the Assessment built from it: what a caller of Assessor.assess gets from facts
    m = max(1, n // 5)
    t0 = time.perf_counter()
    for i in range(m):
        derivation = evaluate(pool[i % len(pool)])
        build_assessment("Patient/x", AS_OF, derivation, assessor.rulebook, assessor.ruleset_info)
    with_build_s = time.perf_counter() - t0
    return {
        "cpu": cpu,
        "patients_in_pool": len(pool),
        "facts_per_patient": round(sum(map(len, pool)) / len(pool), 1),
        "evaluations": n,
        "seconds": round(engine_s, 3),
        "evaluations_per_second": round(n / engine_s),
        "us_per_evaluation": round(engine_s / n * 1e6, 1),
        "with_assessment_per_second": round(m / with_build_s),
        "setup_seconds": round(setup, 2),
        "peak_rss_mb": peak_rss_mb(),
    }


# --------------------------------------------------------------------------- parse floor and assess


def ndjson_files(directory: Path) -> list[Path]:
    return sorted(p for p in Path(directory).rglob("*.ndjson"))


def parse(args: argparse.Namespace) -> dict:
    """The floor: read every line of every NDJSON file and parse it with orjson, nothing else."""
    import orjson

    one_core()
    loads = orjson.loads
    lines = 0
    size = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    for path in ndjson_files(args.dir):
        with path.open("rb") as fh:
            for line in fh:
                size += len(line)
                if line.strip():
                    loads(line)
                    lines += 1
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"lines": lines, "bytes": size, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "peak_rss_mb": peak_rss_mb()}


def assess(args: argparse.Namespace) -> dict:
    """The pipeline `fhir-aibl assess` runs, streamed: records in, one contract line out per patient.

    Variants: `shipped` is the reader as shipped (validates the resources the facts stage
    reads, with the assessor's value sets, as `fhir-aibl assess` does); `no-validation`
    validates nothing (the cost of everything else). Both under the command's collector
    thresholds (`cli.fewer_collections`).
    """
    import orjson

    from fhir_aibl.assess import Assessor
    from fhir_aibl.cli import fewer_collections
    from fhir_aibl.errors import AiblError
    from fhir_aibl.sources import PatientRecord, iter_records

    one_core()
    t0 = time.perf_counter()
    assessor = Assessor()
    setup = time.perf_counter() - t0
    patients = problems = resources = 0
    rss_samples = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    # the collector thresholds `fhir-aibl assess` runs under (cli.fewer_collections)
    with open(os.devnull, "wb") as sink, fewer_collections():
        records = iter_records([args.dir], validate=args.variant == "shipped", terminology=assessor.terminology)
        for item in records:
            if not isinstance(item, PatientRecord):
                problems += 1
                continue
            try:
                result = assessor.assess(item.patient_ref, item.resources, AS_OF)
            except AiblError:
                problems += 1
                continue
            sink.write(orjson.dumps(result.assessment.contract()) + b"\n")
            patients += 1
            resources += len(item.resources)
            if patients % 1000 == 0:
                rss_samples.append(round(rss_mb(), 1))
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {
        "variant": args.variant,
        "cpu_seconds": round(cpu, 3),
        "patients": patients,
        "relevant_resources": resources,
        "problems": problems,
        "seconds": round(seconds, 3),
        "patients_per_second": round(patients / seconds, 1) if seconds else None,
        "setup_seconds": round(setup, 2),
        "peak_rss_mb": peak_rss_mb(),
        "rss_every_1000_patients_mb": rss_samples[:: max(1, len(rss_samples) // 20)],
    }


def cli(args: argparse.Namespace) -> dict:
    """`fhir-aibl assess DIR --format json` as shipped, output to /dev/null."""
    from fhir_aibl.cli import main

    one_core()
    c0 = time.process_time()
    t0 = time.perf_counter()
    saved = sys.stdout
    with open(os.devnull, "w") as sink:
        sys.stdout = sink
        try:
            status = main(["assess", str(args.dir), "--as-of", AS_OF.isoformat(), "--format", "json"])
        finally:
            sys.stdout = saved
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    return {"status": status, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3), "peak_rss_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="worker", required=True)
    e = sub.add_parser("engine")
    e.add_argument("--patients", type=int, default=2000)
    e.add_argument("--evaluations", type=int, default=50_000)
    e.add_argument("--seed", type=int, default=1)
    p = sub.add_parser("parse")
    p.add_argument("dir", type=Path)
    a = sub.add_parser("assess")
    a.add_argument("dir", type=Path)
    a.add_argument("--variant", choices=("shipped", "no-validation"), default="shipped")
    c = sub.add_parser("cli")
    c.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    emit({"engine": engine, "parse": parse, "assess": assess, "cli": cli}[args.worker](args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
