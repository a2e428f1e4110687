#!/usr/bin/env python3
"""Latency of `aibl-patient-view` with full prefetch: p50/p90/p99 over the fixture records.

    python scripts/cds_latency.py [--requests 520] [--concurrency 1] [--mode inprocess|loopback] [--signed] [--bench-record]

- `inprocess`: the app called through httpx's ASGI transport (no sockets): the service's own
  cost (parsing, patient filter, validation, assessment, cards, SQLite record).
- `loopback`: uvicorn on 127.0.0.1 and a requests.Session client: adds HTTP and JSON on the wire.
- `--signed`: every request carries a fresh ES384 JWT (key pinned by file, no network), so
  the verification is measured too.
- `--concurrency N`: N requests in flight at once (in process only); latency is per request.
- `--bench-record`: every request is the one bench/run.py's CDS section sends (the synthetic
  patient whose prefetch is closest to 150 resources, a 108 kB body), not the fixture records;
  the process's CPU time per request is printed too (with `--mode inprocess` it includes the
  in-process client's share).

A short measurement for the README, not the load benchmark (that lives in bench/).
Requests cycle through fixtures/bundles/V*.json; the first round is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir_aibl.cds import create_app, patient_view_request, settings_for_tests  # noqa: E402

SERVICE = "aibl-patient-view"


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def build(tmp: Path, signed: bool, base: str):
    overrides: dict = {"as_of": "2026-06-01", "allow_unsigned": not signed, "public_base_url": base}
    signer = None
    if signed:
        from joserfc import jwt
        from joserfc.jwk import ECKey, KeySet

        key = ECKey.generate_key("P-384", parameters={"kid": "bench", "alg": "ES384"})
        (tmp / "jwks.json").write_text(json.dumps(KeySet([key]).as_dict(private=False)))
        overrides["jwt"] = {"issuers": [{"iss": "https://ehr.bench", "jwks_file": str(tmp / "jwks.json")}]}
        aud = f"{base}/cds-services/{SERVICE}"

        def signer() -> dict:
            now = int(time.time())
            claims = {"iss": "https://ehr.bench", "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
            return {"Authorization": "Bearer " + jwt.encode({"alg": "ES384", "kid": "bench"}, claims, key, algorithms=["ES384"])}

    app = create_app(settings_for_tests(tmp, **overrides))
    return app, signer


def request_of_bench() -> list[bytes]:
    sys.path.insert(0, str(ROOT / "bench"))
    from cds_harness import sample_request

    return [json.dumps(sample_request()[0]).encode()]


def requests_of_fixtures() -> list[bytes]:
    out = []
    for path in sorted((ROOT / "fixtures" / "bundles").glob("V*.json")):
        out.append(json.dumps(patient_view_request(json.loads(path.read_text()))).encode())
    return out


def inprocess(app, signer, bodies: list[bytes], count: int, concurrency: int) -> list[float]:
    import httpx

    async def run() -> list[float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            async def one(body: bytes) -> float:
                headers = {"Content-Type": "application/json", **(signer() if signer else {})}
                start = time.perf_counter()
                response = await client.post(f"/cds-services/{SERVICE}", content=body, headers=headers)
                elapsed = time.perf_counter() - start
                assert response.status_code == 200, response.text
                return elapsed

            for body in bodies:  # warm-up
                await one(body)
            times: list[float] = []
            queue = [bodies[i % len(bodies)] for i in range(count)]
            for i in range(0, count, concurrency):
                times += await asyncio.gather(*(one(b) for b in queue[i : i + concurrency]))
            return times

    return asyncio.run(run())


def loopback(app, signer, bodies: list[bytes], count: int, port: int) -> list[float]:
    import requests
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        url = f"http://127.0.0.1:{port}/cds-services/{SERVICE}"
        with requests.Session() as session:
            def one(body: bytes) -> float:
                headers = {"Content-Type": "application/json", **(signer() if signer else {})}
                start = time.perf_counter()
                response = session.post(url, data=body, headers=headers, timeout=30)
                elapsed = time.perf_counter() - start
                assert response.status_code == 200, response.text
                return elapsed

            for body in bodies:
                one(body)
            return [one(bodies[i % len(bodies)]) for i in range(count)]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=520)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--mode", choices=("inprocess", "loopback"), default="inprocess")
    parser.add_argument("--signed", action="store_true")
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--bench-record", action="store_true", help="the 150-resource request of bench/run.py instead of the fixtures")
    args = parser.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # the unsigned-mode warning on every request is not what is measured
    bodies = request_of_bench() if args.bench_record else requests_of_fixtures()
    with tempfile.TemporaryDirectory() as tmp:
        base = f"http://127.0.0.1:{args.port}" if args.mode == "loopback" else "http://bench"
        app, signer = build(Path(tmp), args.signed, base)
        try:
            cpu = time.process_time()
            if args.mode == "inprocess":
                times = inprocess(app, signer, bodies, args.requests, args.concurrency)
            else:
                times = loopback(app, signer, bodies, args.requests, args.port)
            cpu = time.process_time() - cpu
        finally:
            app.state.cds.close()
    ms = [t * 1000 for t in times]
    # warm-up (one round of the records) and signing included: an upper bound on the service's share
    cpu_ms = cpu * 1000 / (len(ms) + len(bodies))
    print(
        f"{args.mode}, {'signed' if args.signed else 'unsigned'}, concurrency {args.concurrency}, {len(ms)} requests "
        f"over {len(bodies)} records: p50 {percentile(ms, 50):.1f} ms, p90 {percentile(ms, 90):.1f} ms, "
        f"p99 {percentile(ms, 99):.1f} ms, mean {statistics.fmean(ms):.1f} ms"
        + (f"; process CPU {cpu_ms:.1f} ms per request" if args.bench_record else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
