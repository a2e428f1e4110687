"""End to end against a real FHIR server (SEKMET, started by the test suite on 127.0.0.1),
loaded with the 60 worked examples and, when ../shared/data is beside the project, the 21
Synthea records and the mCODE patient Jenny M (all of them, about 6,100 resources).

These run on CI (CI=true makes an unavailable server a failure, not a skip).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from fhir_aibl.assess import RULES_DIR
from fhir_aibl.careplan import IDENTIFIER_SYSTEM, RULESET_SYSTEM, load_catalogue
from fhir_aibl.fhir import PROFILES, FhirClient, Runner
from fhir_aibl.fhir.population import select_population
from fhir_aibl.sources import read_paths

from ..conftest import AS_OF as AS_OF_DATE
from .conftest import AS_OF, run_command
from .fakes import outcome

#: The worked examples with no active or intended aromatase inhibitor: tamoxifen only (V31),
#: no medication (V32), AI completed (V33) or stopped (V34), AI entered-in-error (V35).
NOT_IN_POPULATION = {"Patient/v31", "Patient/v32", "Patient/v33", "Patient/v34", "Patient/v35", "Patient/v57"}  # AI stopped or none
JENNY_REF = "Patient/cancer-patient-jenny-m"


def _measured(label: str, result) -> None:
    """Print the run's round-trip line (shown with pytest -s; docs/connector.md quotes it)."""
    for line in result.stderr.splitlines():
        if line.startswith(("patients found", "round trips")):
            print(f"measured: {label}: {line}")


def _unversioned(refs):
    return sorted(re.sub(r"/_history/[^/]+$", "", r) for r in refs)


def _comparable(contract: dict) -> dict:
    # The server numbers versions itself (every loaded resource is version 1), the files
    # carry their own: compare evidence without versions, everything else exactly.
    return {**contract, "evidence": _unversioned(contract["evidence"])}


@pytest.fixture(scope="module")
def file_records(sekmet_seed):
    return {p.patient_ref: p for p in read_paths(sekmet_seed.files).patients}


@pytest.fixture(scope="module")
def file_contracts(file_records, assessor):
    return {
        ref: assessor.assess(ref, rec.resources, AS_OF_DATE).assessment.contract() for ref, rec in file_records.items()
    }


def _get(base_url: str, path: str, **params) -> dict:
    resp = requests.get(f"{base_url}/{path}", params=params, timeout=30)
    resp.raise_for_status()
    return resp.json()


def _all(base_url: str, resource_type: str, **params) -> list[dict]:
    bundle = _get(base_url, resource_type, _count="1000", **params)
    assert bundle["total"] <= 1000
    return [e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode") == "match"]


def _ours(base_url: str) -> list[dict]:
    return _all(base_url, "CarePlan", identifier=f"{IDENTIFIER_SYSTEM}|")


def _expected_population(file_contracts, seed) -> set[str]:
    expected = {ref for ref in file_contracts if ref.startswith("Patient/v")} - NOT_IN_POPULATION
    if seed.shared:
        expected.add(JENNY_REF)
    return expected


# -- reading -----------------------------------------------------------------------------------


def test_population_is_every_patient_on_an_active_or_intended_aromatase_inhibitor(
    loaded_server, sekmet_seed, file_contracts, assessor
):
    client = FhirClient(loaded_server)
    population = select_population(client, assessor.terminology)
    found = {f"Patient/{pid}" for pid in population.patient_ids}
    assert found == _expected_population(file_contracts, sekmet_seed)
    # the Synthea patients (no aromatase inhibitor) are on the server but not selected
    for ref in found:
        assert file_contracts[ref]["ai_status"] in ("active", "planned")
    assert population.rejected == []


def test_every_patient_pulled_from_the_server_is_assessed_as_from_its_file(loaded_server, file_contracts):
    ids = [ref.split("/", 1)[1] for ref in sorted(file_contracts)]
    result = run_command("--fhir-base", loaded_server, "--patient", *ids, "--as-of", AS_OF, "--format", "json")
    assert result.code == 0, result.stderr
    _measured(f"--patient, all {len(ids)} records", result)
    got = {c["patient"]: c for c in result.json()}
    assert set(got) == set(file_contracts)
    for ref, contract in file_contracts.items():
        assert _comparable(got[ref]) == _comparable(contract), ref
    assert f"patients found {len(ids)}, assessed {len(ids)}, written 0, unchanged 0, failed 0" in result.stderr


def test_a_pull_is_one_round_trip_per_patient(loaded_server, file_records, assessor):
    # A page size above any one patient's count of a type: every patient is one batch.
    client = FhirClient(loaded_server, profile=dataclasses.replace(PROFILES["generic"], page_size=1000))
    runner = Runner(client, assessor, as_of=AS_OF_DATE)
    ids = sorted(ref.split("/", 1)[1] for ref in file_records)
    report = runner.run(ids)
    assert report.count("assessed") == len(ids)
    assert report.setup_requests == 1  # GET metadata
    per_patient = [o.pull_requests for o in report.outcomes]
    # the first pull also reads FamilyMemberHistory once for the run: SEKMET cannot search it by patient
    assert per_patient[0] == 2
    assert set(per_patient[1:]) == {1}
    assert client.stats.retries == 0


def test_paging_follows_next_links_and_gives_the_same_record(loaded_server, file_records, assessor, sekmet_seed):
    if not sekmet_seed.shared:
        pytest.skip("../shared/data is not beside the project: no record large enough to page")
    ref, record = max(file_records.items(), key=lambda kv: len(kv[1].resources))
    observations = sum(1 for r in record.resources if r["resourceType"] == "Observation")
    small = run_command(
        "--fhir-base",
        loaded_server,
        "--patient",
        ref.split("/")[1],
        "--as-of",
        AS_OF,
        "--format",
        "json",
        "--page-size",
        "25",
    )
    assert small.code == 0, small.stderr
    expected = assessor.assess(ref, record.resources, AS_OF_DATE).assessment.contract()
    assert _comparable(small.json()[0]) == _comparable(expected)
    # one batch, then one request per further page of each type (25 a page)
    counts: dict[str, int] = {}
    for r in record.resources:
        counts[r["resourceType"]] = counts.get(r["resourceType"], 0) + 1
    extra_pages = sum((n - 1) // 25 for t, n in counts.items() if t != "Patient")
    assert observations > 25
    match = re.search(r"round trips: pull ([\d.]+) per patient \((\d+) requests", small.stderr)
    # + 1 for the FamilyMemberHistory scan of the run (SEKMET cannot search it by patient)
    assert int(match.group(2)) == 1 + extra_pages + 1


# -- writing -----------------------------------------------------------------------------------


def _check_written(base_url: str, contracts: dict[str, dict]) -> dict[str, dict]:
    """Exactly one live fhir-aibl CarePlan per assessed patient, each with its RiskAssessment and
    Provenance, once each; returns the live CarePlans by patient."""
    plans = _ours(base_url)
    live = [p for p in plans if p["status"] == "draft"]
    by_patient: dict[str, dict] = {}
    for plan in live:
        ref = plan["subject"]["reference"]
        assert ref not in by_patient, f"two live CarePlans for {ref}"
        by_patient[ref] = plan
    assert set(by_patient) == set(contracts)
    risks = {r["id"]: r for r in _all(base_url, "RiskAssessment")}
    provenances = _all(base_url, "Provenance")
    for ref, plan in by_patient.items():
        risk_ref = plan["supportingInfo"][0]["reference"]
        assert risk_ref.startswith("RiskAssessment/")
        risk = risks[risk_ref.split("/", 1)[1]]
        assert risk["subject"]["reference"] == ref
        assert risk["identifier"] == plan["identifier"]
        qualitative = risk["prediction"][0]["qualitativeRisk"]["coding"][0]["code"]
        assert qualitative == contracts[ref]["category"]
        targets = [p for p in provenances if f"CarePlan/{plan['id']}" in {t["reference"] for t in p["target"]}]
        assert len(targets) == 1, f"{ref}: {len(targets)} Provenances name its CarePlan"
        prov = targets[0]
        assert risk_ref in {t["reference"] for t in prov["target"]}
        assert prov["agent"][0]["who"]["display"].startswith("fhir-aibl ")
        rulesets = [e for e in prov["entity"] if e["what"].get("identifier", {}).get("system") == RULESET_SYSTEM]
        assert len(rulesets) == 1 and rulesets[0]["what"]["identifier"]["value"].startswith("aibl-")
    return by_patient


def _counts(base_url: str) -> dict[str, int]:
    return {t: _get(base_url, t, _summary="count")["total"] for t in ("CarePlan", "RiskAssessment", "Provenance")}


def _versions(base_url: str) -> dict[str, str]:
    out = {}
    for t in ("CarePlan", "RiskAssessment", "Provenance"):
        for r in _all(base_url, t):
            out[f"{t}/{r['id']}"] = r["meta"]["versionId"]
    return out


def test_write_back_writes_once_then_nothing_then_replaces_a_changed_assessment(
    fresh_server, file_contracts, sekmet_seed
):
    population = _expected_population(file_contracts, sekmet_seed)
    synthea_plans = _counts(fresh_server)["CarePlan"]  # Synthea's own CarePlans are not ours
    contracts = {ref: file_contracts[ref] for ref in population}

    first = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back", "--format", "json")
    assert first.code == 0, first.stderr
    _measured("--all --write-back", first)
    n = len(population)
    assert f"patients found {n}, assessed 0, written {n}, unchanged 0, failed 0" in first.stderr
    assert f"write-back 1.00 per patient written ({n} requests" in first.stderr
    assert {c["patient"] for c in first.json()} == population
    plans = _check_written(fresh_server, contracts)
    assert _counts(fresh_server) == {"CarePlan": synthea_plans + n, "RiskAssessment": n, "Provenance": n}
    before = _versions(fresh_server)

    second = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back", "--format", "json")
    assert second.code == 0, second.stderr
    _measured("--all --write-back, again", second)
    assert f"patients found {n}, assessed 0, written 0, unchanged {n}, failed 0" in second.stderr
    assert "write-back none" in second.stderr
    assert _versions(fresh_server) == before  # nothing created, nothing even updated
    assert second.json() == first.json()

    # V06: the femoral neck T-score falls from -2.1 to -2.9, a new version of the Observation
    obs = _get(fresh_server, "Observation/v06-dxa-fn")
    obs["valueQuantity"]["value"] = -2.9
    requests.put(f"{fresh_server}/Observation/v06-dxa-fn", json=obs, timeout=30).raise_for_status()
    third = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back", "--format", "json")
    assert third.code == 0, third.stderr
    assert f"patients found {n}, assessed 0, written 1, unchanged {n - 1}, failed 0" in third.stderr
    v06 = [
        p
        for p in _all(fresh_server, "CarePlan", subject="Patient/v06")
        if p.get("identifier", [{}])[0].get("system") == IDENTIFIER_SYSTEM
    ]
    old = [p for p in v06 if p["id"] == plans["Patient/v06"]["id"]][0]
    new = [p for p in v06 if p["id"] != old["id"]]
    assert old["status"] == "revoked" and old["meta"]["versionId"] == "2"
    assert len(new) == 1 and new[0]["status"] == "draft"
    assert new[0]["replaces"] == [{"reference": f"CarePlan/{old['id']}"}]
    assert "Observation/v06-dxa-fn/_history/2" in [s["reference"] for s in new[0]["supportingInfo"]]
    prov = [
        p
        for p in _all(fresh_server, "Provenance")
        if f"CarePlan/{new[0]['id']}" in {t["reference"] for t in p["target"]}
    ]
    assert len(prov) == 1
    assert {"role": "revision", "what": {"reference": f"CarePlan/{old['id']}/_history/1"}} in prov[0]["entity"]
    assert f"CarePlan/{old['id']}" in {t["reference"] for t in prov[0]["target"]}
    assert _counts(fresh_server) == {"CarePlan": synthea_plans + n + 1, "RiskAssessment": n + 1, "Provenance": n + 1}
    # every other patient is untouched, and a fourth run has nothing to do
    after = _versions(fresh_server)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {f"CarePlan/{old['id']}"}
    fourth = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back", "--format", "json")
    assert f"written 0, unchanged {n}, failed 0" in fourth.stderr


def test_single_patient_write_back_and_a_missing_patient_fails_alone(fresh_server):
    result = run_command(
        "--fhir-base",
        fresh_server,
        "--patient",
        "v06",
        "no-such-patient",
        "--as-of",
        AS_OF,
        "--write-back",
        "--format",
        "json",
    )
    assert result.code == 1
    assert [c["patient"] for c in result.json()] == ["Patient/v06"]
    assert "patients found 2, assessed 0, written 1, unchanged 0, failed 1" in result.stderr
    # no such Patient and nothing about it: named, with nothing to assess
    assert "failed: Patient/no-such-patient: assess: nothing to assess" in result.stderr
    assert "Patient/no-such-patient: the server has no such Patient resource" in result.stderr
    assert len(_ours(fresh_server)) == 1


# -- failures and restarts ---------------------------------------------------------------------


class Killed(BaseException):
    """The process dying: not an Exception, so nothing in the run catches it."""


class KillingSession(requests.Session):
    """Dies at the Nth write-back transaction, before sending it or after the server applied it."""

    def __init__(self, after: int, when: str):
        super().__init__()
        self.after, self.when, self.transactions = after, when, 0

    def request(self, method, url, *args, **kwargs):
        is_tx = method == "POST" and b'"type":"transaction"' in (kwargs.get("data") or b"")
        if is_tx:
            self.transactions += 1
            if self.transactions == self.after and self.when == "before":
                raise Killed()
        resp = super().request(method, url, *args, **kwargs)
        if is_tx and self.transactions == self.after and self.when == "after":
            raise Killed()  # the server committed; the answer is lost with the process
        return resp


@pytest.mark.parametrize("when", ["before", "after"])
def test_killed_halfway_then_run_again_loses_nothing_and_duplicates_nothing(
    fresh_server, file_contracts, sekmet_seed, when
):
    population = _expected_population(file_contracts, sekmet_seed)
    n = len(population)
    kill_at = 11
    with pytest.raises(Killed):
        run_command(
            "--fhir-base",
            fresh_server,
            "--all",
            "--as-of",
            AS_OF,
            "--write-back",
            session=KillingSession(kill_at, when),
        )
    applied = kill_at - 1 if when == "before" else kill_at
    assert len(_ours(fresh_server)) == applied
    again = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back", "--format", "json")
    assert again.code == 0, again.stderr
    assert f"patients found {n}, assessed 0, written {n - applied}, unchanged {applied}, failed 0" in again.stderr
    _check_written(fresh_server, {ref: file_contracts[ref] for ref in population})
    counts = _counts(fresh_server)
    assert counts["RiskAssessment"] == n and counts["Provenance"] == n


def test_killed_process_then_run_again(fresh_server, file_contracts, sekmet_seed, tmp_path):
    """A real process killed with SIGKILL in the middle of a population write-back."""
    population = _expected_population(file_contracts, sekmet_seed)
    n = len(population)
    script = tmp_path / "slow_run.py"
    # The child paces itself (a short sleep after each transaction) so that the parent can
    # see it halfway; the pacing is the only difference from a normal run.
    script.write_text(
        "import sys, time, requests\n"
        "from tests.fhir.conftest import run_command\n"
        "class Slow(requests.Session):\n"
        "    def request(self, method, url, *a, **k):\n"
        "        r = super().request(method, url, *a, **k)\n"
        "        if method == 'POST' and b'transaction' in (k.get('data') or b''):\n"
        "            time.sleep(0.2)\n"
        "        return r\n"
        f"run_command('--fhir-base', {fresh_server!r}, '--all', '--as-of', {AS_OF!r}, '--write-back', session=Slow())\n"
    )
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen([sys.executable, str(script)], cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    try:
        deadline = time.monotonic() + 120
        while len(_ours(fresh_server)) < 5:
            assert child.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run wrote nothing"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    applied = len(_ours(fresh_server))
    assert 5 <= applied < n
    again = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back")
    assert again.code == 0, again.stderr
    assert f"written {n - applied}, unchanged {applied}, failed 0" in again.stderr
    _check_written(fresh_server, {ref: file_contracts[ref] for ref in population})
    assert _counts(fresh_server)["RiskAssessment"] == n


class FlakySession(requests.Session):
    """Answers 503 to the write-back transactions of one patient, `times` times, without sending them."""

    def __init__(self, patient: str, times: int):
        super().__init__()
        self.patient, self.times, self.refused = patient, times, 0

    def request(self, method, url, *args, **kwargs):
        data = kwargs.get("data") or b""
        if method == "POST" and b'"type":"transaction"' in data and f'"Patient/{self.patient}"'.encode() in data:
            if self.refused < self.times:
                self.refused += 1
                resp = requests.Response()
                resp.status_code, resp.reason, resp.url = 503, "Service Unavailable", url
                resp._content = json.dumps(outcome("database busy", "transient")).encode()
                return resp
        return super().request(method, url, *args, **kwargs)


def test_a_failed_write_is_retried_for_that_patient_only(fresh_server, file_contracts, sekmet_seed, assessor):
    population = _expected_population(file_contracts, sekmet_seed)
    flaky = FlakySession("v12", times=1)
    client = FhirClient(fresh_server, session=flaky)
    slept: list[float] = []
    runner = Runner(
        client,
        assessor,
        as_of=AS_OF_DATE,
        write_back=True,
        catalogue=load_catalogue(RULES_DIR / "recommendations.yaml"),
        sleep=slept.append,
    )
    report = runner.run()
    assert report.count("written") == len(population) and not report.failed
    by_id = {o.patient_id: o for o in report.outcomes}
    assert by_id["v12"].attempts == 2 and by_id["v12"].write_requests == 2
    assert {o.attempts for pid, o in by_id.items() if pid != "v12"} == {1}
    assert len(slept) == 1
    assert len(_ours(fresh_server)) == len(population)


def test_a_write_that_keeps_failing_fails_its_patient_and_leaves_nothing(fresh_server):
    flaky = FlakySession("v07", times=10)
    result = run_command(
        "--fhir-base", fresh_server, "--patient", "v07", "v08", "--as-of", AS_OF, "--write-back", session=flaky
    )
    assert result.code == 1
    assert "written 1, unchanged 0, failed 1" in result.stderr
    assert re.search(r"failed: Patient/v07: write-back: .*HTTP 503.*database busy", result.stderr)
    assert [p["subject"]["reference"] for p in _ours(fresh_server)] == ["Patient/v08"]


def test_a_plan_changed_since_the_pull_is_not_overwritten(fresh_server, assessor):
    """If-Match: a clinician edits the old CarePlan between our pull and our write; the
    transaction is refused (412) and rolled back, the patient is pulled again and the revoke
    applies to the edited version."""
    first = run_command("--fhir-base", fresh_server, "--patient", "v06", "--as-of", AS_OF, "--write-back")
    assert first.code == 0
    (plan,) = _ours(fresh_server)
    obs = _get(fresh_server, "Observation/v06-dxa-fn")
    obs["valueQuantity"]["value"] = -2.9
    requests.put(f"{fresh_server}/Observation/v06-dxa-fn", json=obs, timeout=30).raise_for_status()

    class EditingSession(requests.Session):
        edited = False

        def request(self, method, url, *args, **kwargs):
            if method == "POST" and b'"type":"transaction"' in (kwargs.get("data") or b"") and not self.edited:
                self.edited = True
                current = _get(fresh_server, f"CarePlan/{plan['id']}")
                current["note"] = current.get("note", []) + [{"text": "Reviewed by Dr. A."}]
                requests.put(f"{fresh_server}/CarePlan/{plan['id']}", json=current, timeout=30).raise_for_status()
            return super().request(method, url, *args, **kwargs)

    result = run_command(
        "--fhir-base", fresh_server, "--patient", "v06", "--as-of", AS_OF, "--write-back", session=EditingSession()
    )
    assert result.code == 0, result.stderr
    assert "written 1, unchanged 0, failed 0" in result.stderr
    old = _get(fresh_server, f"CarePlan/{plan['id']}")
    assert old["status"] == "revoked" and old["meta"]["versionId"] == "3"  # written, edited, revoked
    assert old["note"][-1]["text"] == "Reviewed by Dr. A."  # the edit survived
    live = [p for p in _ours(fresh_server) if p["status"] == "draft"]
    assert len(live) == 1 and len(_all(fresh_server, "RiskAssessment")) == 2
