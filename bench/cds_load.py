"""Open-loop load generator for the CDS Hooks service: a separate process, loopback only.

    python bench/cds_load.py --url URL --request FILE --key FILE --iss ISS --rates 50,100,200 --seconds 30 [--warmup 5]

For each rate, sends `rate x (warmup + seconds)` POSTs at fixed intervals, whatever the
answers do (open loop: a slow answer does not delay the next request, so queueing in the
service shows up in the latency instead of hiding in a slower send rate). Latency runs from
the moment a request was due to the moment its whole answer was read, so time the client
itself lost is counted against the service, never hidden. The warm-up requests are not
counted. Every request carries its own ES384-signed JWT (unique `jti`, `aud` = the URL),
signed before the run so signing costs nothing during it, and its own `hookInstance`.

Prints one JSON line per rate and nothing else on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import httpx
import orjson
from joserfc import jwt
from joserfc.jwk import ECKey

PLACEHOLDER = "00000000-0000-4000-8000-000000000000"


def tokens(key: ECKey, iss: str, url: str, count: int) -> list[str]:
    now = int(time.time())
    header = {"alg": "ES384", "typ": "JWT", "kid": key.kid}
    out = []
    for _ in range(count):
        claims = {"iss": iss, "sub": "bench-client", "aud": url, "iat": now, "exp": now + 600, "jti": str(uuid.uuid4())}
        out.append(jwt.encode(header, claims, key, algorithms=["ES384"]))
    return out


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run_rate(client: httpx.AsyncClient, url: str, body: bytes, key: ECKey, iss: str,
                   rate: int, seconds: float, warmup: float) -> dict:
    total = int(rate * (warmup + seconds))
    skip = int(rate * warmup)
    signed = tokens(key, iss, url, total)
    latencies: list[float] = []
    service: list[float] = []
    errors: dict[str, int] = {}
    lag: list[float] = []

    async def one(i: int, due: float) -> None:
        payload = body.replace(PLACEHOLDER.encode(), str(uuid.uuid4()).encode(), 1)
        headers = {"Authorization": f"Bearer {signed[i]}", "Content-Type": "application/json"}
        sent = time.perf_counter()
        try:
            response = await client.post(url, content=payload, headers=headers)
            await response.aread()
            ok = response.status_code == 200
            kind = None if ok else f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            ok, kind = False, type(exc).__name__
        done = time.perf_counter()
        if i >= skip:
            latencies.append(done - due)
            service.append(done - sent)
            lag.append(sent - due)
            if kind:
                errors[kind] = errors.get(kind, 0) + 1

    start = time.perf_counter() + 0.2
    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    measured_span = (total - skip) / rate
    lat = sorted(latencies)
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    return {
        "rate": rate,
        "seconds": seconds,
        "requests": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "p50_ms": ms(percentile(lat, 0.50)),
        "p90_ms": ms(percentile(lat, 0.90)),
        "p99_ms": ms(percentile(lat, 0.99)),
        "max_ms": ms(lat[-1]) if lat else None,
        "service_p99_ms": ms(percentile(sorted(service), 0.99)),
        "client_lag_p99_ms": ms(percentile(sorted(lag), 0.99)),
        "offered_per_second": round(len(lat) / measured_span, 1) if measured_span else None,
    }


async def main_async(args: argparse.Namespace) -> None:
    key = ECKey.import_key(json.loads(Path(args.key).read_text()))
    request = json.loads(Path(args.request).read_text())
    request["hookInstance"] = PLACEHOLDER
    body = orjson.dumps(request)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)) as client:
        for rate in args.rates:
            result = await run_rate(client, args.url, body, key, args.iss, rate, args.seconds, args.warmup)
            print(json.dumps(result), flush=True)
            await asyncio.sleep(1.0)  # let the service drain before the next rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--request", required=True, help="a CDS Hooks request (JSON)")
    parser.add_argument("--key", required=True, help="the client's private JWK (JSON)")
    parser.add_argument("--iss", required=True)
    parser.add_argument("--rates", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    args = parser.parse_args(argv)
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
