"""The Bulk Data client against `responses`: what the test server does not do (429, Retry-After dates,
deadlines, error files, transport errors mid-download, tokens and other origins)."""

from __future__ import annotations

import json

import pytest
import requests
import responses

from fhir_aibl.bulk.client import BulkClient, BulkError, Manifest, PollSettings
from fhir_aibl.bulk.export import export_to, read_state
from fhir_aibl.fhir.auth import BearerToken
from fhir_aibl.fhir.http import Http

BASE = "https://ehr.example/fhir"
STATUS = f"{BASE}/bulk-status/job1"


class Clock:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self) -> float:
        return self.now


def client(clock: Clock, token: str | None = None, **poll) -> BulkClient:
    http = Http(BASE, auth=BearerToken(token) if token else None, sleep=clock.sleep, jitter=lambda: 1.0)
    return BulkClient(http, poll=PollSettings(**poll), sleep=clock.sleep, clock=clock)


def manifest(*types: str, requires_token: bool = False, errors: int = 0, host: str = BASE) -> dict:
    return {
        "transactionTime": "2026-06-01T10:00:00Z",
        "request": f"{BASE}/$export",
        "requiresAccessToken": requires_token,
        "output": [{"type": t, "url": f"{host}/files/{t}.ndjson"} for t in types],
        "error": [{"type": "OperationOutcome", "url": f"{BASE}/files/err{i}.ndjson"} for i in range(errors)],
    }


def kickoff(rsps, status: int = 202) -> None:
    rsps.add(responses.GET, f"{BASE}/$export", status=status, headers={"Content-Location": STATUS} if status == 202 else {})


@responses.activate
def test_kick_off_asks_async_with_the_types_joined_and_is_retried_on_429():
    clock = Clock()
    responses.add(responses.GET, f"{BASE}/$export", status=429, headers={"Retry-After": "7"})
    kickoff(responses)
    status = client(clock).kick_off("system", types=("Patient", "Observation"), since="2026-01-01T00:00:00Z",
                                    type_filters=("Observation?status=final",))
    assert status == STATUS
    sent = responses.calls[1].request
    assert sent.headers["Prefer"] == "respond-async"
    assert "_type=Patient%2CObservation" in sent.url and "_since=2026-01-01" in sent.url and "_typeFilter=" in sent.url
    assert clock.slept == [7.0]


@responses.activate
def test_a_kick_off_that_is_not_asynchronous_is_an_error():
    responses.add(responses.GET, f"{BASE}/$export", status=200, json={})
    with pytest.raises(BulkError, match="did not start an asynchronous export"):
        client(Clock()).kick_off("system")


@responses.activate
def test_polling_honours_retry_after_then_backs_off_and_reports_progress():
    clock = Clock()
    seen = []
    responses.add(responses.GET, STATUS, status=202, headers={"X-Progress": "10%", "Retry-After": "3"})
    responses.add(responses.GET, STATUS, status=202, headers={"X-Progress": "50%"})
    responses.add(responses.GET, STATUS, status=202, headers={"X-Progress": "90%"})
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient"))
    bulk = client(clock, interval=2.0)
    bulk.on_progress = seen.append
    result = bulk.wait(STATUS)
    assert result.types() == {"Patient"}
    assert clock.slept == [3.0, 2.0, 4.0]  # Retry-After, then the backoff doubling
    assert seen == ["10%", "50%", "90%"]


@responses.activate
def test_polling_stops_at_the_deadline_naming_the_last_progress():
    clock = Clock()
    for _ in range(10):
        responses.add(responses.GET, STATUS, status=202, headers={"X-Progress": "stuck at 40%", "Retry-After": "30"})
    with pytest.raises(BulkError, match=r"did not finish within 100 s \(last progress: stuck at 40%\)"):
        client(clock, deadline=100).wait(STATUS)
    assert sum(clock.slept) <= 100


@responses.activate
def test_a_failed_export_is_an_error_with_the_servers_reason():
    responses.add(responses.GET, STATUS, status=500, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "exception", "diagnostics": "disk full"}]})
    with pytest.raises(Exception, match="disk full"):
        client(Clock()).wait(STATUS)


def test_a_manifest_without_output_is_refused():
    with pytest.raises(BulkError, match="not a Bulk Data manifest"):
        Manifest.parse({"transactionTime": "x"})


@responses.activate
def test_export_downloads_with_the_token_reads_error_files_warns_and_deletes(tmp_path):
    clock = Clock()
    kickoff(responses)
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient", "Observation", requires_token=True, errors=1))
    responses.add(responses.GET, f"{BASE}/files/Patient.ndjson", body='{"resourceType":"Patient","id":"p1"}\n')
    responses.add(responses.GET, f"{BASE}/files/Observation.ndjson", body=requests.ConnectionError("reset"))
    responses.add(responses.GET, f"{BASE}/files/Observation.ndjson", body="")
    responses.add(responses.GET, f"{BASE}/files/err0.ndjson", body=json.dumps({"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "Observation/o9 could not be read"}]}) + "\n")
    responses.add(responses.DELETE, STATUS, status=202)
    warnings = []
    result = export_to(client(clock, token="s3cret"), tmp_path, level="system", warn=warnings.append)
    assert [p.name for p in result.files] == ["Patient.000.ndjson", "Observation.000.ndjson"]
    assert (result.folder / "Patient.000.ndjson").read_text().startswith('{"resourceType":"Patient"')
    assert not list(result.folder.glob("*.part"))
    downloads = [c.request for c in responses.calls if "/files/" in c.request.url]
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in downloads)
    assert result.errors == ["error: Observation/o9 could not be read"]
    assert any("no FamilyMemberHistory" in w and "parental hip fracture" in w for w in warnings)
    assert any("no Condition" in w for w in warnings)
    assert responses.calls[-1].request.method == "DELETE"
    assert read_state(tmp_path)["transactionTime"] == "2026-06-01T10:00:00Z"


@responses.activate
def test_the_token_never_goes_to_another_origin(tmp_path):
    kickoff(responses)
    responses.add(responses.GET, STATUS, status=200,
                  json=manifest("Patient", requires_token=True, host="https://storage.example"))
    responses.add(responses.DELETE, STATUS, status=202)
    with pytest.raises(BulkError, match="another origin and needs the access token"):
        export_to(client(Clock(), token="s3cret"), tmp_path, level="system")
    assert responses.calls[-1].request.method == "DELETE"  # the job is deleted even so
    assert read_state(tmp_path) is None  # no state from an export that did not complete


@responses.activate
def test_a_file_elsewhere_without_a_token_is_fetched_without_one(tmp_path):
    kickoff(responses)
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient", host="https://storage.example"))
    responses.add(responses.GET, "https://storage.example/files/Patient.ndjson", body='{"resourceType":"Patient","id":"p1"}\n')
    responses.add(responses.DELETE, STATUS, status=404)  # already gone: fine
    result = export_to(client(Clock(), token="s3cret"), tmp_path, level="system", types=("Patient",))
    assert "Authorization" not in responses.calls[2].request.headers
    assert result.files and not result.warnings


@responses.activate
def test_a_download_that_keeps_failing_is_an_error(tmp_path):
    clock = Clock()
    for _ in range(3):
        responses.add(responses.GET, f"{BASE}/files/Patient.ndjson", body=requests.ConnectionError("reset"))
    with pytest.raises(BulkError, match="download failed after 3 attempts"):
        client(clock, download_attempts=3).download(f"{BASE}/files/Patient.ndjson", tmp_path / "P.ndjson",
                                                    requires_token=False)
    assert not list(tmp_path.iterdir())


@responses.activate
def test_incremental_uses_the_last_complete_transaction_time(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"transactionTime": "2026-05-01T00:00:00Z"}))
    responses.add(responses.GET, f"{BASE}/Group/g1/$export", status=202, headers={"Content-Location": STATUS})
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient"))
    responses.add(responses.GET, f"{BASE}/files/Patient.ndjson", body="")
    responses.add(responses.DELETE, STATUS, status=202)
    result = export_to(client(Clock()), tmp_path, level="group", group="g1", incremental=True, types=("Patient",))
    assert "_since=2026-05-01T00%3A00%3A00Z" in responses.calls[0].request.url
    assert responses.calls[0].request.url.startswith(f"{BASE}/Group/g1/$export")
    assert result.since == "2026-05-01T00:00:00Z"
    assert read_state(tmp_path)["transactionTime"] == "2026-06-01T10:00:00Z"


@responses.activate
def test_a_refused_delete_is_a_warning_not_a_failed_export(tmp_path):
    kickoff(responses)
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient"))
    responses.add(responses.GET, f"{BASE}/files/Patient.ndjson", body="")
    responses.add(responses.DELETE, STATUS, status=403, json={"resourceType": "OperationOutcome", "issue": [
        {"severity": "error", "code": "forbidden", "diagnostics": "scope"}]})
    warnings = []
    result = export_to(client(Clock()), tmp_path, level="system", types=("Patient",), warn=warnings.append)
    assert result.files and read_state(tmp_path) is not None
    assert len(warnings) == 1 and "did not delete the export job" in warnings[0]


@responses.activate
def test_downloads_that_did_not_finish_are_resumed_by_the_next_run_from_the_same_job(tmp_path):
    kickoff(responses)
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient", "Observation"))
    responses.add(responses.GET, f"{BASE}/files/Patient.ndjson", body='{"resourceType":"Patient","id":"p1"}\n')
    for _ in range(2):
        responses.add(responses.GET, f"{BASE}/files/Observation.ndjson", body=requests.ConnectionError("reset"))
    with pytest.raises(BulkError, match="the same command run again resumes the downloads"):
        export_to(client(Clock(), download_attempts=2), tmp_path, level="system", types=("Patient", "Observation"))
    assert not [c for c in responses.calls if c.request.method == "DELETE"]  # the job is kept
    assert json.loads((tmp_path / "job.json").read_text())["status"] == STATUS and read_state(tmp_path) is None
    # the next run: no kick-off, the same job's manifest, only the file that was missing
    responses.calls.reset()
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient", "Observation"))
    responses.add(responses.GET, f"{BASE}/files/Observation.ndjson", body="")
    responses.add(responses.DELETE, STATUS, status=202)
    result = export_to(client(Clock()), tmp_path, level="system", types=("Patient", "Observation"))
    urls = [c.request.url for c in responses.calls]
    assert urls == [STATUS, f"{BASE}/files/Observation.ndjson", STATUS]
    assert [p.name for p in result.files] == ["Patient.000.ndjson", "Observation.000.ndjson"]
    assert not (tmp_path / "job.json").exists() and read_state(tmp_path)["files"] == [p.name for p in result.files]


@responses.activate
def test_a_job_the_server_no_longer_has_means_a_new_export(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"status": f"{BASE}/bulk-status/old", "level": "system", "group": None,
                                                   "types": ["Patient"], "since": None, "filters": []}))
    responses.add(responses.GET, f"{BASE}/bulk-status/old", status=404)
    kickoff(responses)
    responses.add(responses.GET, STATUS, status=200, json=manifest("Patient"))
    responses.add(responses.GET, f"{BASE}/files/Patient.ndjson", body="")
    responses.add(responses.DELETE, STATUS, status=202)
    warnings = []
    result = export_to(client(Clock()), tmp_path, level="system", types=("Patient",), warn=warnings.append)
    assert result.files and "is gone" in warnings[0] and not (tmp_path / "job.json").exists()
