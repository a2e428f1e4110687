"""`fhir-aibl write-back` on the test FHIR server: requests per 1,000 patients and client CPU per patient.

    python bench/writeback.py [--patients 400] [--batch-size 25] [--compare]

Starts the test server (tests/fhir_server.py: SEKMET on 127.0.0.1), loads a synthetic
population (fhir_aibl/synth.py) as PUT transactions, assesses it (`fhir-aibl assess --format
json --explain`), then runs `fhir-aibl write-back` three times as a subprocess:

1. the first write (every patient on an aromatase inhibitor written);
2. again with a new state folder: the server is asked, nothing is written (idempotent);
3. again with the first state folder: the journal confirms everyone, the server is not asked.

For each: wall seconds, the client's CPU seconds (user + system of the subprocess), its CPU
per patient net of a run with no patient (start-up and imports), and its requests (from its
summary), per 1,000 patients. `--compare` does the first write again with `--batch-size 1`
on a second server (one transaction a patient, as `run --write-back`). Prints one JSON
object. Nothing here asserts a time: these are measurements.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AS_OF = dt.date(2026, 6, 1)
CLI = [sys.executable, "-m", "fhir_aibl.cli"]


def load(base: str, patients: int) -> None:
    import requests

    from fhir_aibl import synth
    from tests.fhir.loading import to_put_transaction

    session = requests.Session()
    for i in range(patients):
        resources = synth.patient_record(1, i)
        bundle = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}
        resp = session.post(base, json=to_put_transaction(bundle), headers={"Content-Type": "application/fhir+json"},
                            timeout=300)
        if resp.status_code != 200:
            raise RuntimeError(f"loading failed: HTTP {resp.status_code}: {resp.text[:300]}")


def records_folder(folder: Path, patients: int) -> Path:
    from fhir_aibl import synth

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(patients):
        resources = synth.patient_record(1, i)
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
        (folder / f"p{i:06d}.json").write_text(json.dumps(bundle))
    return folder


def timed(argv: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out = {"exit": proc.returncode, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)}
    found = re.search(r"patients found (\d+), written (\d+), unchanged (\d+)", proc.stderr)
    trips = re.search(r"\((\d+) requests", proc.stderr)
    setup = re.search(r"setup (\d+)", proc.stderr)
    if found:
        out.update(patients=int(found[1]), written=int(found[2]), unchanged=int(found[3]))
    if trips:
        out["requests"] = int(trips[1]) + (int(setup[1]) if setup else 0)
    if proc.returncode not in (0,):
        out["stderr"] = proc.stderr[-2000:]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=400, help="synthetic patients (default: 400)")
    parser.add_argument("--batch-size", type=int, default=25, help="patients per transaction (default: 25)")
    parser.add_argument("--compare", action="store_true", help="also the first write with --batch-size 1")
    args = parser.parse_args()

    from tests.fhir_server import sekmet_server

    result: dict = {"patients": args.patients, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="fhir-aibl-writeback-bench-") as tmp:
        tmp_path = Path(tmp)
        records = records_folder(tmp_path / "records", args.patients)
        explained = tmp_path / "explained.json"
        with explained.open("w") as fh:
            subprocess.run([*CLI, "assess", str(records), "--as-of", AS_OF.isoformat(), "--format", "json", "--explain"],
                           stdout=fh, stderr=subprocess.DEVNULL, check=False, cwd=ROOT)
        empty = tmp_path / "empty.json"
        empty.write_text("[]")
        servers = ["batched"] + (["one-a-patient"] if args.compare else [])
        for name in servers:
            with sekmet_server(tmp_path / f"server-{name}") as base:
                t0 = time.perf_counter()
                load(base, args.patients)
                result[f"load_s_{name}"] = round(time.perf_counter() - t0, 1)
                size = str(args.batch_size if name == "batched" else 1)
                common = ["write-back", "--fhir-base", base, "--batch-size", size]
                baseline = timed([*CLI, *common, str(empty), "--state", str(tmp_path / f"{name}-empty")])
                runs = {"first": timed([*CLI, *common, str(explained), "--state", str(tmp_path / f"{name}-a")])}
                if name == "batched":
                    runs["again, new state"] = timed([*CLI, *common, str(explained), "--state", str(tmp_path / "b")])
                    runs["again, same state"] = timed([*CLI, *common, str(explained), "--state", str(tmp_path / f"{name}-a")])
                for run in runs.values():
                    n = run.get("patients") or 0
                    if n:
                        run["requests_per_1000"] = round(run.get("requests", 0) * 1000 / n, 1)
                        run["cpu_ms_per_patient_net"] = round((run["cpu_s"] - baseline["cpu_s"]) * 1000 / n, 2)
                result[name] = {"startup_cpu_s": baseline["cpu_s"], **runs}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
