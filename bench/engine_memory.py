"""Memory over many engine evaluations in one process: it must stay flat.

    python bench/engine_memory.py [--evaluations 200000] [--every 20000] [--pool simple|synthetic] [--json FILE]

Evaluates varied fact sets (each its own durable_rules session, deleted after use) and
builds the Assessment of each, and prints resident memory at checkpoints, the evaluation
rate, and the drift: RSS at the end minus RSS after the first checkpoint (warm-up), in MB.
`--pool synthetic` takes the fact sets of synthetic patients (fhir_aibl/synth.py), which
reach more rules than the small hand-made ones. bench/run.py runs it for a million
evaluations ("drift"). No timing is asserted anywhere; this is a measurement.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_aibl.assess import Assessor, build_assessment  # noqa: E402

AS_OF = dt.date(2026, 6, 1)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fact_set(rng: random.Random, i: int) -> list[dict]:
    facts = [
        {"t": "patient", "sex": "female", "age": rng.randint(40, 90), "refs": [f"Patient/{i}"]},
        {"t": "ai_med", "ingredient": "anastrozole", "status": rng.choice(["active", "active", "intended", "stopped"]),
         "ended": False, "future_start": False, "refs": [f"MedicationStatement/{i}"]},
        {"t": "bmi", "value": rng.choice([18.5, 24.0, 31.0]), "age_months": 2.0, "refs": [f"Observation/b{i}"]},
        {"t": "smoking", "status": rng.choice(["never", "former", "current"]), "source": "observation", "refs": [f"Observation/s{i}"]},
    ]
    for site in rng.sample(["LS", "TH", "FN"], rng.randint(0, 3)):
        facts.append({"t": "dxa", "measure": "T", "site": site, "value": round(rng.uniform(-3.5, 1.0), 1),
                      "age_months": rng.choice([3.0, 14.0, 30.0]), "refs": [f"Observation/{site}{i}"]})
    return facts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--evaluations", type=int, default=200_000)
    parser.add_argument("--every", type=int, default=20_000)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--pool", choices=("simple", "synthetic"), default="simple")
    parser.add_argument("--patients", type=int, default=1000, help="fact sets in the pool (default: 1000)")
    args = parser.parse_args()
    if args.pool == "synthetic":
        from workers import fact_pool  # bench/workers.py, beside this file

        assessor, pool = fact_pool(args.patients, 1)
    else:
        assessor = Assessor()
        rng = random.Random(1)
        pool = [fact_set(rng, i) for i in range(args.patients)]
    checkpoints = []
    start = time.perf_counter()
    for n in range(1, args.evaluations + 1):
        derivation = assessor.engine.evaluate(pool[n % len(pool)])
        build_assessment(f"Patient/{n}", AS_OF, derivation, assessor.rulebook, assessor.ruleset_info)
        if n % args.every == 0:
            checkpoints.append({"evaluations": n, "rss_mb": round(rss_mb(), 1), "seconds": round(time.perf_counter() - start, 1)})
            print(json.dumps(checkpoints[-1]), flush=True)
    elapsed = time.perf_counter() - start
    summary = {
        "pool": args.pool,
        "evaluations": args.evaluations,
        "evaluations_per_second": round(args.evaluations / elapsed),
        "rss_first_checkpoint_mb": checkpoints[0]["rss_mb"],
        "rss_last_mb": checkpoints[-1]["rss_mb"],
        "drift_mb": round(checkpoints[-1]["rss_mb"] - checkpoints[0]["rss_mb"], 1),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"checkpoints": checkpoints, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
