"""The connector section of bench/run.py: fhir_aibl.fhir against the real test FHIR server.

The server is the one the integration tests start (tests/fhir_server.py: SEKMET on
127.0.0.1, in a virtual environment of its own, built on first use). It is loaded with
synthetic patients (fhir_aibl/synth.py) as PUT transactions (tests/fhir/loading.py), then:

- pull: `Puller.pull` for each patient, timed; round trips are the HTTP requests the
  client made (`FhirClient.stats`), and the strategy the puller chose (batch, _revinclude,
  searches). The CapabilityStatement is read before the first pull and not counted: a run
  reads it once;
- write-back: `Runner(write_back=True)` over the same patients (pull, assess, write), the
  write requests per patient; then the same run again, which must find every CarePlan
  already there (idempotent) and write nothing.
"""

from __future__ import annotations

import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
AS_OF = dt.date(2026, 6, 1)


def measure(*, patients: int, log=print) -> dict:
    from endtoend import load_synthetic  # bench/endtoend.py

    from fhir_aibl.assess import RULES_DIR, Assessor
    from fhir_aibl.careplan import load_catalogue
    from fhir_aibl.fhir import FhirClient, Puller
    from fhir_aibl.fhir.runner import Runner
    from tests.fhir_server import SekmetUnavailable, sekmet_server

    with tempfile.TemporaryDirectory(prefix="fhir-aibl-connector-bench-") as tmp:
        server = sekmet_server(Path(tmp))
        try:
            base = server.__enter__()
        except SekmetUnavailable as exc:
            return {"status": "pending", "reason": f"test FHIR server unavailable: {exc}", "met": None}
        try:
            t0 = time.perf_counter()
            loaded, ids = load_synthetic(base, patients)
            load_seconds = time.perf_counter() - t0
            log(f"connector: {loaded} resources of {patients} patients loaded into {base} in {load_seconds:.1f}s")

            client = FhirClient(base)
            caps = client.capabilities()
            puller = Puller(client)
            pulls = []
            for pid in ids:
                t0 = time.perf_counter()
                pulled = puller.pull(pid)
                pulls.append({"seconds": time.perf_counter() - t0, "requests": pulled.requests,
                              "strategy": pulled.strategy, "resources": len(pulled.resources)})
            pull_seconds = sum(p["seconds"] for p in pulls)

            catalogue = load_catalogue(RULES_DIR / "recommendations.yaml")
            assessor = Assessor()
            now = dt.datetime(2026, 6, 1, 8, 0, tzinfo=dt.timezone.utc)
            t0 = time.perf_counter()
            first = Runner(client, assessor, as_of=AS_OF, write_back=True, catalogue=catalogue, now=lambda: now).run(ids)
            first_seconds = time.perf_counter() - t0
            second = Runner(client, assessor, as_of=AS_OF, write_back=True, catalogue=catalogue, now=lambda: now).run(ids)
        finally:
            server.__exit__(None, None, None)
    statuses = {s: first.count(s) for s in ("written", "unchanged", "assessed", "failed")}
    return {
        "status": "ok",
        "server": "SEKMET (tests/fhir_server.py)",
        "patients": patients,
        "resources_loaded": loaded,
        "batch_supported": caps.supports_batch(),
        "pull": {
            "strategies": sorted({p["strategy"] for p in pulls}),
            # The median: a type the server cannot search by patient is scanned once per run
            # (the first patient pays for it), which the mean would spread over everyone.
            "round_trips_per_patient": statistics.median(p["requests"] for p in pulls),
            "round_trips_mean": round(sum(p["requests"] for p in pulls) / len(pulls), 2),
            "round_trips_first_patient": pulls[0]["requests"],
            "max_round_trips": max(p["requests"] for p in pulls),
            "seconds_per_patient": round(pull_seconds / len(pulls), 4),
            "resources_per_patient": round(sum(p["resources"] for p in pulls) / len(pulls), 1),
        },
        "writeback": {
            "outcomes": statuses,
            "failures": [o.reason for o in first.failed][:3],
            "requests_per_patient": round(first.write_requests / max(1, statuses["written"]), 2),
            "pull_requests_per_patient": first.pulls_per_patient(),
            "seconds_per_patient_pull_assess_write": round(first_seconds / patients, 4),
            "second_run": {s: second.count(s) for s in ("written", "unchanged", "failed")},
            "second_run_write_requests": second.write_requests,
        },
    }
