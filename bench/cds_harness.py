"""The CDS section of bench/run.py: the service on uvicorn, load from another process.

What runs, on this machine's loopback only:
- the service as it is deployed: `python -m fhir_aibl.cds.command` (the `fhir-aibl serve`
  command: uvicorn, `--workers N` worker processes behind one port) with a settings file
  that trusts one issuer whose public key is a JWKS file made here (ES384), and `as_of`
  fixed at 2026-06-01;
- the load: bench/cds_load.py in a process of its own, signing one JWT per request;
- with one worker on a machine with two or more CPUs, the service is pinned to one CPU and
  the load generator to another, so that the generator's work never lands on the service's
  core; with several workers the service may use every CPU and the generator shares them
  (on a 2-core machine its work then counts against the service's latency);
- the service's CPU is that of its whole process tree (the supervisor and every worker).

The request is the patient-view hook with every prefetch key filled
(`fhir_aibl.cds.patient_view_request`) for the synthetic patient (fhir_aibl/synth.py)
whose prefetch is closest to 150 resources.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
ISS = "https://ehr.bench.example"
TARGET_RESOURCES = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_split() -> tuple[set[int] | None, set[int] | None]:
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[-1]}, {cpus[0]}  # service, load generator


def _pinned(cpus: set[int] | None):
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of a process and its live descendants (Linux /proc; 0.0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:  # pragma: no cover - not Linux, or gone
        return 0.0
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # pragma: no cover
        children = []
    return own + sum(_process_cpu_seconds(c) for c in children)


def sample_request() -> tuple[dict, int, str]:
    """A patient-view request for the synthetic patient whose prefetch is closest to 150 resources."""
    from fhir_aibl import synth
    from fhir_aibl.cds import patient_view_request

    best = None
    for i in range(120):
        resources = synth.patient_record(1, i)
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
        request = patient_view_request(bundle)
        count = sum(
            (1 if isinstance(v, dict) and v.get("resourceType") != "Bundle" else len((v or {}).get("entry") or []))
            for v in request["prefetch"].values()
        )
        if best is None or abs(count - TARGET_RESOURCES) < abs(best[1] - TARGET_RESOURCES):
            best = (request, count, request["context"]["patientId"])
        if count == TARGET_RESOURCES:
            break
    assert best is not None
    return best


def measure(*, rates: list[int], seconds: float, warmup: float, workers: int = 1, log=print) -> dict:
    from joserfc.jwk import ECKey

    service_cpus, load_cpus = _cpu_split() if workers == 1 else (None, None)
    with tempfile.TemporaryDirectory(prefix="fhir-aibl-cds-bench-") as tmp:
        tmpdir = Path(tmp)
        key = ECKey.generate_key("P-384", parameters={"kid": "bench-es384"}, private=True)
        (tmpdir / "client-key.json").write_text(json.dumps(key.as_dict(private=True)))
        (tmpdir / "jwks.json").write_text(json.dumps({"keys": [key.as_dict(private=False)]}))
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        config = {
            "public_base_url": base,
            "as_of": "2026-06-01",
            "jwt": {"issuers": [{"iss": ISS, "jwks_file": str(tmpdir / "jwks.json")}]},
            "feedback": {"database": str(tmpdir / "feedback.sqlite3")},
        }
        (tmpdir / "settings.json").write_text(json.dumps(config))
        request, prefetch_resources, _pid = sample_request()
        (tmpdir / "request.json").write_text(json.dumps(request))
        url = f"{base}/cds-services/aibl-patient-view"
        server_log = (tmpdir / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "fhir_aibl.cds.command", "--host", "127.0.0.1", "--port", str(port),
             "--config", str(tmpdir / "settings.json"), "--log-level", "warning", "--workers", str(workers)],
            cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT, preexec_fn=_pinned(service_cpus),
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if requests.get(f"{base}/health/ready", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    server_log.flush()
                    raise RuntimeError(f"the CDS service did not start: {(tmpdir / 'server.log').read_text()[-600:]}")
                time.sleep(0.2)
            log(f"cds: service up on {base} ({workers} worker(s)); prefetch of {prefetch_resources} resources; rates {rates} x {seconds}s")
            cpu_before = _process_cpu_seconds(server.pid)
            proc = subprocess.run(
                [sys.executable, str(BENCH / "cds_load.py"), "--url", url, "--request", str(tmpdir / "request.json"),
                 "--key", str(tmpdir / "client-key.json"), "--iss", ISS, "--rates", ",".join(map(str, rates)),
                 "--seconds", str(seconds), "--warmup", str(warmup)],
                cwd=ROOT, capture_output=True, text=True, timeout=len(rates) * (seconds + warmup + 60) + 120,
                preexec_fn=_pinned(load_cpus),
            )
            if proc.returncode != 0:
                raise RuntimeError(f"load generator failed: {proc.stderr[-800:]}")
            results = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
            cpu_used = _process_cpu_seconds(server.pid) - cpu_before
            sent = sum(round(rate * (seconds + warmup)) for rate in rates)
            # One request after the load, checked: the answer is a set of cards, not an error page.
            from joserfc import jwt

            now = int(time.time())
            token = jwt.encode({"alg": "ES384", "kid": key.kid},
                               {"iss": ISS, "sub": "bench", "aud": url, "iat": now, "exp": now + 300, "jti": f"check-{now}"}, key,
                               algorithms=["ES384"])
            check = requests.post(url, json={**request, "hookInstance": "bench-check"},
                                  headers={"Authorization": f"Bearer {token}"}, timeout=30)
            cards = len(check.json().get("cards", [])) if check.status_code == 200 else None
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            server_log.close()
    return {
        "status": "ok",
        "hook": "patient-view",
        "workers": workers,
        "prefetch_resources": prefetch_resources,
        "check": {"status": check.status_code, "cards": cards},
        # the service process's own CPU (user + system) over every request of the load, warm-ups included
        "service_cpu_ms_per_request": round(cpu_used / sent * 1000, 2) if sent else None,
        "service_cpus": sorted(service_cpus) if service_cpus else None,
        "load_cpus": sorted(load_cpus) if load_cpus else None,
        "rates": results,
    }
