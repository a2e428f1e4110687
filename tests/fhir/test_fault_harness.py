"""`fhir-aibl run --all --write-back` through a fault-injecting proxy (faultproxy.py) in front
of a real FHIR server (SEKMET) holding twenty of the worked examples.

At each fault rate, with a fixed seed: the process prints no traceback; every patient ends
written or named as failed (nothing is "unchanged" on a server that held nothing, even when
a transaction's answer was lost after it was applied); the exit status is 1 exactly when a
patient failed; no fault changes an assessment; and a clean rerun completes with exactly one
live CarePlan per patient and one Provenance per CarePlan.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fhir_aibl.careplan import IDENTIFIER_SYSTEM
from fhir_aibl.fhir.writeback import LIVE

from ..conftest import FIXTURES
from ..fhir_server import SekmetUnavailable, sekmet_server, unavailable
from .conftest import AS_OF, run_command
from .faultproxy import FaultPlan, FaultProxy
from .loading import load_files

ROOT = Path(__file__).resolve().parents[2]
#: twenty worked examples, every one on an aromatase inhibitor (in the population)
FILES = [FIXTURES / "bundles" / f"V{i:02d}.json" for i in range(1, 21)]
PATIENTS = {f"Patient/v{i:02d}" for i in range(1, 21)}
#: the client's read timeout in these runs, and how late a `delay` fault answers
READ_TIMEOUT = 2.0
DELAY = READ_TIMEOUT + 1.0


@pytest.fixture()
def small_server(tmp_path: Path):
    try:
        with sekmet_server(tmp_path) as base_url:
            load_files(base_url, FILES)
            yield base_url
    except SekmetUnavailable as exc:
        unavailable(str(exc))


def _all(base_url: str, resource_type: str, **params) -> list[dict]:
    resp = requests.get(f"{base_url}/{resource_type}", params={"_count": "1000", **params}, timeout=30)
    resp.raise_for_status()
    return [e["resource"] for e in resp.json().get("entry", []) if e.get("search", {}).get("mode") == "match"]


def _live_plans(base_url: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for plan in _all(base_url, "CarePlan", identifier=f"{IDENTIFIER_SYSTEM}|"):
        if plan["status"] in LIVE:
            out.setdefault(plan["subject"]["reference"], []).append(plan)
    return out


def _run_through(proxy: FaultProxy) -> subprocess.CompletedProcess:
    """The real command in a process of its own, short timeouts and backoffs."""
    argv = [
        sys.executable,
        "-m",
        "fhir_aibl.cli",
        "run",
        "--fhir-base",
        proxy.base_url,
        "--all",
        "--as-of",
        AS_OF,
        "--write-back",
        "--format",
        "json",
        "--timeout",
        str(READ_TIMEOUT),
        "--connect-timeout",
        str(READ_TIMEOUT),
        "--backoff",
        "0.05",
        # small pages: the pull follows `next` links (GETs through the proxy) besides its batch
        "--page-size",
        "3",
    ]
    env = {k: v for k, v in os.environ.items() if k != "FHIR_AIBL_TOKEN"}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.parametrize(("rate", "seed"), [(0.1, 11), (0.3, 3)])
def test_a_population_write_back_through_faults(small_server, rate, seed):
    with FaultProxy(small_server, FaultPlan(rate=rate, seed=seed, delay=DELAY), lifetime=600) as proxy:
        run = _run_through(proxy)
    print(f"measured: rate {rate}: faults injected {dict(proxy.injected)}; passed {proxy.passed}")
    print("\n".join(line for line in run.stderr.splitlines() if not line.startswith("warning:")))

    # faults were injected, for reads and writes alike
    assert sum(proxy.injected.values()) >= 3
    assert {method for method, _ in proxy.injected} >= {"GET", "POST"}

    # no traceback; every patient ends written or named as failed
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout
    assessed = {a["patient"] for a in json.loads(run.stdout)}
    failed = set(re.findall(r"^failed: (Patient/[^:]+): ", run.stderr, flags=re.M))
    assert assessed | failed == PATIENTS and not assessed & failed
    summary = r"^patients found (\d+), assessed 0, written (\d+)[^,]*, unchanged (\d+), failed (\d+)$"
    match = re.search(summary, run.stderr, re.M)
    assert match, run.stderr
    found, written, unchanged, n_failed = map(int, match.groups())
    assert (found, written, unchanged, n_failed) == (len(PATIENTS), len(assessed), 0, len(failed))
    assert run.returncode == (1 if failed else 0), run.stderr

    # what the run says it wrote is on the server, once
    live = _live_plans(small_server)
    assert all(len(live.get(ref, [])) == 1 for ref in assessed), live

    # a clean rerun completes everything, writes nothing twice, and assesses as the faulted run did
    again = run_command("--fhir-base", small_server, "--all", "--as-of", AS_OF, "--write-back", "--format", "json")
    assert again.code == 0, again.stderr
    assert f"patients found {len(PATIENTS)}, assessed 0" in again.stderr and "failed 0" in again.stderr
    first = {a["patient"]: a for a in json.loads(run.stdout)}
    second = {a["patient"]: a for a in again.json()}
    assert {ref: second[ref] for ref in first} == first
    live = _live_plans(small_server)
    assert set(live) == PATIENTS and all(len(plans) == 1 for plans in live.values()), live
    ours = {f"CarePlan/{p['id']}" for p in _all(small_server, "CarePlan", identifier=f"{IDENTIFIER_SYSTEM}|")}
    provenances: dict[str, int] = {}
    for prov in _all(small_server, "Provenance"):
        for target in prov.get("target", []):
            ref = re.sub(r"/_history/.*$", "", target.get("reference", ""))
            if ref in ours:
                provenances[ref] = provenances.get(ref, 0) + 1
    assert provenances == {ref: 1 for ref in ours}


def test_the_proxy_is_repeatable_and_passes_everything_at_rate_zero(small_server):
    with FaultProxy(small_server, FaultPlan(rate=0.0)) as proxy:
        base_url = proxy.base_url
        resp = requests.get(f"{base_url}/Patient", params={"_count": "2"}, timeout=30)
    assert resp.status_code == 200 and not proxy.injected
    links = [link["url"] for link in resp.json()["link"]]
    assert links and all(url.startswith(base_url) for url in links)  # the server's origin rewritten
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base_url}/metadata", timeout=5)  # stopped with its context
    draws = []
    for _ in range(2):
        proxy = FaultProxy(small_server, FaultPlan(rate=0.5, seed=5))
        draws.append([proxy.draw("GET") for _ in range(50)])
    assert draws[0] == draws[1] and set(draws[0]) - {None}
