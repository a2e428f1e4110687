"""`assess --engine spark` (Spark local[2]) against `assess --workers 2` on one synthetic population.

    python bench/spark.py DIR [--master local[2]] [--workers 2] [--as-of 2026-06-01]

Runs `fhir-aibl assess DIR --format json --workers N`, then `fhir-aibl assess DIR --engine
spark --spark-master local[2] --out TMP`, checks that every patient's assessment (the output
contract) is the same in both, and prints one JSON object: wall seconds, the CPU seconds and
peak resident memory of every process of each run (the command; for Spark also its JVM, the
Python daemon and workers), read from /proc while it runs (bench/population.py `measure`).
Spark's time includes starting the JVM. Nothing here asserts a time: these are measurements.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from population import measure  # noqa: E402  (bench/population.py: the same sampling for both runs)


def _total(run: dict) -> dict:
    return {
        "cpu_s": round(run["command_cpu_s"] + sum(run["worker_cpu_s"]), 1),
        "peak_mb_sum": round(run["command_peak_mb"] + sum(run["worker_peak_mb"]), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--as-of", default="2026-06-01")
    args = parser.parse_args()
    exe = str(Path(sys.executable).parent / "fhir-aibl")
    common = [exe, "assess", str(args.data), "--as-of", args.as_of]
    with tempfile.TemporaryDirectory() as tmp:
        local = measure([*common, "--format", "json", "--workers", str(args.workers)], Path(tmp) / "local.json")
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the workers run this interpreter
        spark = measure([*common, "--engine", "spark", "--spark-master", args.master, "--out", f"{tmp}/spark"],
                        Path(tmp) / "spark.log")
        expected = {a["patient"]: a for a in json.loads((Path(tmp) / "local.json").read_text())}
        found = {}
        for path in glob.glob(f"{tmp}/spark/assessments/*.ndjson"):
            for line in open(path):
                item = json.loads(line)
                found[item["patient"]] = item
        same = found == expected
    print(
        json.dumps(
            {
                "patients": len(expected),
                "local": {"workers": args.workers, **local, **_total(local)},
                "spark": {"master": args.master, **spark, **_total(spark)},
                "identical_assessments": same,
                "wall_ratio_spark_over_local": round(spark["wall_s"] / local["wall_s"], 2),
                "cpu_ratio_spark_over_local": round(_total(spark)["cpu_s"] / _total(local)["cpu_s"], 2),
                "load_average": os.getloadavg(),
            }
        )
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
