"""`fhir-aibl write-back` against the real test FHIR server: every input shape writes once, then
nothing; an interrupted run resumes to the same end state; the requests are counted."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict

import pytest
import requests

from fhir_aibl.careplan import IDENTIFIER_SYSTEM
from fhir_aibl.fhir.writeback import LIVE
from fhir_aibl.writeback.batches import PROBES

from ..fhir.conftest import fresh_server, sekmet_seed  # noqa: F401
from ..fhir.faultproxy import FaultPlan, FaultProxy
from .outputs import SHAPES, make_outputs, on_ai, write_back, write_requests


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("outputs")
    return folder, make_outputs(folder)


def _all(base: str, query: str) -> list[dict]:
    out, url = [], f"{base}/{query}"
    while url:
        page = requests.get(url, timeout=30).json()
        out += [e["resource"] for e in page.get("entry") or [] if e.get("search", {}).get("mode", "match") == "match"]
        url = next((link["url"] for link in page.get("link") or [] if link["relation"] == "next"), None)
    return out


def end_state(base: str) -> tuple[dict[str, list[str]], Counter]:
    """{patient: ids of its live fhir-aibl CarePlans}, and Provenances per live CarePlan."""
    plans = _all(base, f"CarePlan?identifier={IDENTIFIER_SYSTEM}|&_count=500")
    live: dict[str, list[str]] = defaultdict(list)
    for plan in plans:
        if plan["status"] in LIVE:
            live[plan["subject"]["reference"]].append(plan["id"])
    live_ids = {f"CarePlan/{i}" for ids in live.values() for i in ids}
    provenances: Counter = Counter()
    for prov in _all(base, "Provenance?_count=500"):
        for target in prov.get("target") or []:
            ref = target["reference"].split("/_history", 1)[0]
            if ref in live_ids:
                provenances[ref] += 1
    return dict(live), provenances


def assert_one_each(base: str, patients: list[str]) -> None:
    live, provenances = end_state(base)
    assert sorted(live) == patients
    assert all(len(ids) == 1 for ids in live.values()), {p: ids for p, ids in live.items() if len(ids) != 1}
    assert all(provenances[f"CarePlan/{ids[0]}"] == 1 for ids in live.values()), provenances


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_writes_once_then_nothing(shape, outputs, fresh_server, tmp_path):
    folder, shapes = outputs
    patients = on_ai(folder)
    n, batches = len(patients), math.ceil(len(patients) / 25)
    first = write_back("--fhir-base", fresh_server, *shapes[shape], "--state", tmp_path / "state")
    assert first.code == 0, first.stderr
    assert f"patients found {n}, written {n}, unchanged 0, failed 0" in first.stderr
    assert "not on an aromatase inhibitor (not written)" in first.stderr
    # a batch: one search, one transaction; and, while no answer has shown the search for several
    # patients at once works (none has CarePlans yet), one patient asked alone
    assert write_requests(first.stderr) == 2 * batches + min(batches, PROBES)
    assert_one_each(fresh_server, patients)
    records = [json.loads(x) for x in (tmp_path / "state" / "journal.ndjson").read_text().splitlines()]
    assert sorted(r["patient"] for r in records) == patients
    assert all(r["outcome"] == "written" and r["content"] and r["careplan"] for r in records)

    # the same state: the journal confirms every patient, the server is not asked
    again = write_back("--fhir-base", fresh_server, *shapes[shape], "--state", tmp_path / "state")
    assert again.code == 0, again.stderr
    assert f"written 0, unchanged {n} ({n} confirmed by the journal), failed 0" in again.stderr
    assert write_requests(again.stderr) == 0
    # without the journal: the server is asked, one search a batch, and nothing is written
    fresh = write_back("--fhir-base", fresh_server, *shapes[shape], "--state", tmp_path / "other")
    assert fresh.code == 0, fresh.stderr
    assert f"written 0, unchanged {n}, failed 0" in fresh.stderr
    assert write_requests(fresh.stderr) == batches
    assert_one_each(fresh_server, patients)


def test_one_shape_after_another_writes_nothing(outputs, fresh_server, tmp_path):
    folder, shapes = outputs
    n = len(on_ai(folder))
    assert write_back("--fhir-base", fresh_server, *shapes["resource-ndjson"], "--state", tmp_path / "a").code == 0
    second = write_back("--fhir-base", fresh_server, *shapes["explained-array"], "--state", tmp_path / "b")
    assert second.code == 0 and f"written 0, unchanged {n}, failed 0" in second.stderr, second.stderr


class CutAfter(FaultProxy):
    """Passes the first `k` transactions; the next reaches the server but its answer is lost
    (a connection reset), and every request after it is refused: the run is cut off. `heal()`
    lets everything through again, on the same address."""

    def __init__(self, upstream: str, k: int):
        super().__init__(upstream, FaultPlan(rate=0.0))
        self.k = k
        self.transactions = 0
        self.cut = False
        self.healed = False

    def draw(self, method: str) -> str | None:
        with self._lock:
            if self.healed:
                return None
            if self.cut:
                return "refuse"
            if method == "POST":
                self.transactions += 1
                if self.transactions > self.k:
                    self.cut = True
                    return "reset"
            return None

    def heal(self) -> None:
        self.healed = True


def test_an_interrupted_run_resumes_to_the_same_end_state(outputs, fresh_server, tmp_path):
    folder, shapes = outputs
    patients = on_ai(folder)
    n, size = len(patients), 10
    with CutAfter(fresh_server, k=2) as proxy:
        base = proxy.base_url
        cut = write_back("--fhir-base", base, *shapes["explained-array"], "--state", tmp_path / "state",
                         "--batch-size", str(size), "--attempts", "1")
        assert cut.code == 2, cut.stderr
        assert "fatal: the run stopped before every patient was attempted: the server failed 3 batches in a row" in cut.stderr
        assert "it may have been applied: a rerun will find it and write nothing twice" in cut.stderr
        assert f"patients found {n}, written {2 * size}, unchanged 0, failed {n - 2 * size}" in cut.stderr
        assert "not attempted" in cut.stderr  # the batches after the stop
        proxy.heal()
        resumed = write_back("--fhir-base", base, *shapes["explained-array"], "--state", tmp_path / "state",
                             "--batch-size", str(size))
    assert resumed.code == 0, resumed.stderr
    # the first two batches are confirmed by the journal; the third was applied, its answer lost:
    # found unchanged on the server; the rest written now
    assert (
        f"patients found {n}, written {n - 3 * size}, unchanged {3 * size} ({2 * size} confirmed by the journal), failed 0"
        in resumed.stderr
    )
    rest = n - 2 * size
    assert write_requests(resumed.stderr) == math.ceil(rest / size) + math.ceil((rest - size) / size)
    assert_one_each(fresh_server, patients)
    again = write_back("--fhir-base", fresh_server, *shapes["fhir-bundle"], "--state", tmp_path / "check")
    assert again.code == 0 and f"written 0, unchanged {n}, failed 0" in again.stderr, again.stderr


def test_a_changed_assessment_replaces_the_live_careplan(outputs, fresh_server, tmp_path):
    """Assessed again under another boundary mode, every patient's CarePlan has a new identifier:
    the journal does not skip them, and each new CarePlan revokes the one before."""
    from fhir_aibl.assess import Assessor

    folder, shapes = outputs
    patients = on_ai(folder)
    other = make_outputs(tmp_path / "hadji", assessor=Assessor(mode="hadji"))
    assert write_back("--fhir-base", fresh_server, *shapes["explained-array"], "--state", tmp_path / "s").code == 0
    live_before, _ = end_state(fresh_server)
    second = write_back("--fhir-base", fresh_server, *other["resource-ndjson"], "--state", tmp_path / "s")
    assert second.code == 0, second.stderr
    assert f"patients found {len(patients)}, written {len(patients)}, unchanged 0, failed 0" in second.stderr
    assert_one_each(fresh_server, patients)
    live_after, _ = end_state(fresh_server)
    assert all(live_after[p] != live_before[p] for p in patients)
    revoked = {p["id"] for p in _all(fresh_server, f"CarePlan?identifier={IDENTIFIER_SYSTEM}|&status=revoked&_count=500")}
    assert {ids[0] for ids in live_before.values()} <= revoked


class SlowWrites(FaultProxy):
    """Every POST answered `delay` seconds late (well within the client's timeout): a run slow
    enough to be killed part-way."""

    def __init__(self, upstream: str, delay: float):
        super().__init__(upstream, FaultPlan(rate=0.0, delay=delay))

    def draw(self, method: str) -> str | None:
        return "delay" if method == "POST" else None


def test_a_killed_run_resumes_to_the_same_end_state(outputs, fresh_server, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from ..conftest import ROOT

    folder, shapes = outputs
    patients = on_ai(folder)
    state = tmp_path / "state"
    journal = state / "journal.ndjson"
    env = {k: v for k, v in os.environ.items() if k != "FHIR_AIBL_TOKEN"}
    with SlowWrites(fresh_server, delay=0.4) as proxy:
        argv = [sys.executable, "-m", "fhir_aibl.cli", "write-back", "--fhir-base", proxy.base_url,
                *map(str, shapes["resource-ndjson"]), "--state", str(state), "--batch-size", "5"]
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if journal.is_file() and len(journal.read_text().splitlines()) >= 10:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
        done = len(journal.read_text().splitlines())
        assert 10 <= done < len(patients)
        resumed = write_back("--fhir-base", proxy.base_url, *shapes["resource-ndjson"], "--state", state)
    assert resumed.code == 0, resumed.stderr
    assert f"({done} confirmed by the journal), failed 0" in resumed.stderr
    assert_one_each(fresh_server, patients)
