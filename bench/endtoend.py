"""End to end against the test FHIR server: `fhir-aibl run --all` (REST) and `run --bulk`.

    python bench/endtoend.py [--patients 200 | --data fixtures] [--workers 1] [--paths rest,bulk]

Starts SEKMET (tests/fhir_server.py, on a free port of 127.0.0.1), loads it with synthetic
patients (fhir_aibl/synth.py, as PUT transactions: tests/fhir/loading.py) or, with
`--data fixtures`, with what the connector's integration tests load (the worked examples,
and the Synthea records and Jenny M of ../shared/data when present), then runs the command
as a user would, in a process of its own, for each path:

- rest: `fhir-aibl run --fhir-base URL --all --format json` (the patients on an aromatase
  inhibitor, found by the population searches, pulled one by one);
- bulk: `fhir-aibl run --fhir-base URL --bulk --format json --out TMP` (a system export
  of the rule types, downloaded, then assessed as `assess` does).

For each: patients assessed, wall seconds and patients per second, HTTP requests to the
server (from the command's own summary on stderr: REST pulls plus set-up, the export's
requests for Bulk) and per 1,000 patients, and the client's CPU time (user + system of the
command's process and its children, from wait4) per patient: in all, and net of the fixed
cost (the run less a `run --patient ID` of one of the patients, over the other patients:
what one more patient costs; the same one-patient REST run for both paths). The server is
another process and is not counted. Prints one JSON object on its last line. Nothing
asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
AS_OF = "2026-06-01"

_REST_REQUESTS = re.compile(r"round trips: pull [\d.]+ per patient \((\d+) requests.*?; setup (\d+)")
_BULK_REQUESTS = re.compile(r"exported \d+ files \(.*?\) in (\d+) requests")


def load_synthetic(base: str, patients: int) -> tuple[int, list[str]]:
    """Synthetic patients 0 .. patients-1 (seed 1) as one PUT transaction each: (resources loaded, Patient ids)."""
    import requests

    from fhir_aibl import synth
    from tests.fhir.loading import load_bundle

    session = requests.Session()
    loaded = 0
    ids = []
    for i in range(patients):
        resources = synth.patient_record(1, i)
        bundle = {"resourceType": "Bundle", "type": "collection",
                  "entry": [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in resources]}
        loaded += load_bundle(base, bundle, session, what=f"synthetic patient {i}")
        ids.append(next(r["id"] for r in resources if r["resourceType"] == "Patient"))
    return loaded, ids


def load_fixtures(base: str) -> tuple[int, bool]:
    from tests.fhir.conftest import seed_files
    from tests.fhir.loading import load_files

    files, shared = seed_files()
    return load_files(base, files), shared


def timed(argv: list[str]) -> dict:
    """Run argv; wall seconds, CPU seconds of it and its children (wait4), stdout and stderr."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT)
        _pid, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"code": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                "peak_mb": round(usage.ru_maxrss / 1024.0, 1), "stdout": out.read().decode(), "stderr": err.read().decode()}


def _argv(base: str, workers: int, *rest: str) -> list[str]:
    exe = str(Path(sys.executable).parent / "fhir-aibl")
    return [exe, "run", "--fhir-base", base, "--as-of", AS_OF, "--format", "json", "--workers", str(workers), *rest]


def fixed_cost(base: str, patient: str, repeat: int = 2) -> float:
    """CPU seconds of `run --patient ID` for one patient: the command's fixed cost (start, imports, rules,
    the R4 models, the CapabilityStatement) and that patient. Subtracted, what is left is per patient."""
    return min(timed(_argv(base, 1, "--patient", patient))["cpu_s"] for _ in range(max(2, repeat)))


def run_path(path: str, base: str, workers: int, tmp: Path, outputs: dict, repeat: int = 1) -> tuple[dict, float]:
    """The command on one path, `repeat` times: the least CPU and wall time (a shared machine only adds)."""
    argv = _argv(base, workers, *(["--all"] if path == "rest" else ["--bulk", "--out", str(tmp / "bulk")]))
    runs = []
    for _ in range(max(1, repeat)):
        got = timed(argv)
        if got["code"] not in (0, 1):
            raise RuntimeError(f"{' '.join(argv[1:])} exited {got['code']}: {got['stderr'][-600:]}")
        runs.append(got)
    got = dict(runs[-1], cpu_s=min(r["cpu_s"] for r in runs), wall_s=min(r["wall_s"] for r in runs))
    assessed = json.loads(got["stdout"] or "[]")
    outputs[path] = {a["patient"]: a for a in assessed}
    patients = len(assessed)
    found = (_REST_REQUESTS if path == "rest" else _BULK_REQUESTS).search(got["stderr"])
    requests = (int(found[1]) + int(found[2]) if path == "rest" else int(found[1])) if found else None
    return {
        "command": "fhir-aibl " + " ".join(a if not a.startswith(str(tmp)) else "TMP" for a in argv[1:]),
        "exit": got["code"],
        "patients": patients,
        "wall_s": round(got["wall_s"], 2),
        "patients_per_second": round(patients / got["wall_s"], 1) if got["wall_s"] else None,
        "requests": requests,
        "requests_per_1000_patients": round(requests * 1000 / patients, 1) if requests and patients else None,
        "client_cpu_s": round(got["cpu_s"], 2),
        "client_cpu_ms_per_patient": round(got["cpu_s"] * 1000 / patients, 2) if patients else None,
        "client_peak_mb": got["peak_mb"],
    }, got["cpu_s"]


def measure(*, patients: int | None, data: str, workers: int, paths: list[str], repeat: int = 1, log=print) -> dict:
    from tests.fhir_server import SekmetUnavailable, sekmet_server

    with tempfile.TemporaryDirectory(prefix="fhir-aibl-e2e-bench-") as tmp:
        server = sekmet_server(Path(tmp), extra_config={"validation": {"inbound": "off"}})
        try:
            base = server.__enter__()
        except SekmetUnavailable as exc:
            return {"status": "pending", "reason": f"test FHIR server unavailable: {exc}"}
        try:
            t0 = time.perf_counter()
            if data == "fixtures":
                loaded, shared = load_fixtures(base)
                what = "worked examples" + (", Synthea records and Jenny M" if shared else " (../shared/data absent)")
            else:
                loaded, _ids = load_synthetic(base, patients or 0)
                what = f"{patients} synthetic patients (fhir-aibl synth, seed 1)"
            log(f"end-to-end: {loaded} resources ({what}) loaded in {time.perf_counter() - t0:.1f}s")
            result: dict = {"status": "ok", "server": "SEKMET (tests/fhir_server.py)", "data": what,
                            "resources_loaded": loaded, "workers": workers, "repeat": repeat}
            outputs: dict = {}
            cpu: dict = {}
            for path in paths:
                log(f"end-to-end: {path}")
                result[path], cpu[path] = run_path(path, base, workers, Path(tmp), outputs, repeat)
            some = next((p for out in outputs.values() for p in out), None)
            if some is not None:
                # the marginal cost of a patient: the run less a one-patient run, over the other patients
                fixed = result["fixed_cost_cpu_s"] = round(fixed_cost(base, some.split("/", 1)[1], repeat), 3)
                for path in paths:
                    n = result[path]["patients"]
                    net = round((cpu[path] - fixed) * 1000 / (n - 1), 2) if n > 1 else None
                    result[path]["client_cpu_ms_per_patient_net"] = net
            if "rest" in outputs and "bulk" in outputs:
                # REST assesses the patients on an aromatase inhibitor, Bulk everyone: the same answer for each
                rest, bulk = outputs["rest"], outputs["bulk"]
                result["rest_patients_in_bulk"] = sum(1 for p in rest if p in bulk)
                differ = [p for p, a in rest.items() if bulk.get(p) != a]
                result["identical_results"] = not differ
                # what a clinician acts on: the category, the AI status and the recommendations
                result["same_category_and_recommendations"] = all(
                    all((bulk.get(p) or {}).get(k) == a.get(k) for k in ("ai_status", "category", "recommendations"))
                    for p, a in rest.items()
                )
                result["differing"] = [
                    {"patient": p, "fields": sorted(k for k in rest[p] if (bulk.get(p) or {}).get(k) != rest[p][k])}
                    for p in differ[:5]
                ]
        finally:
            server.__exit__(None, None, None)
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=200, help="synthetic patients to load (default: 200)")
    parser.add_argument("--data", choices=("synthetic", "fixtures"), default="synthetic",
                        help="synthetic patients, or what the connector tests load (default: synthetic)")
    parser.add_argument("--workers", type=int, default=1, help="run --workers (default: 1)")
    parser.add_argument("--paths", default="rest,bulk", help="rest, bulk or both (default: rest,bulk)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each command; the least CPU time counts (default: 1)")
    args = parser.parse_args()
    result = measure(patients=args.patients, data=args.data, workers=args.workers,
                     paths=[p for p in args.paths.split(",") if p], repeat=args.repeat,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result), flush=True)
    return 0 if result.get("status") == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
