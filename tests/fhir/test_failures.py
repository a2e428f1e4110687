"""Transport faults, unreadable capabilities and lost write answers, with `responses`: every
failure is retried where that is safe, then named for its patient; `fhir-aibl run` always
ends with its output, its summary and exit 0, 1 or 2 (docs/failure-behaviour.md)."""

from __future__ import annotations

import json

import pytest
import requests
import responses
from urllib3.exceptions import ProtocolError

from fhir_aibl.fhir import FhirClient
from fhir_aibl.fhir.client import SearchSpec
from fhir_aibl.fhir.errors import BadResponse, TransportError
from fhir_aibl.fhir.http import Http
from fhir_aibl.fhir.settings import ClientSettings

from .conftest import run_command
from .fakes import BASE, FakeFhir, mock, outcome, record

URL = f"{BASE}/Patient/p1"
PATIENT = {"resourceType": "Patient", "id": "p1"}

#: What requests (or, unwrapped, urllib3 and the socket) raises when an answer does not arrive whole.
CUT_OFF = [
    requests.exceptions.ChunkedEncodingError("Connection broken: IncompleteRead(10 bytes read, 90 more expected)"),
    requests.exceptions.ContentDecodingError("Received response with content-encoding: gzip, but failed to decode"),
    ProtocolError("Connection broken: InvalidChunkLength(got length b'zz', 0 bytes read)"),
    ConnectionResetError(104, "Connection reset by peer"),
]


def make_http() -> tuple[Http, list[float]]:
    slept: list[float] = []
    return Http(BASE, settings=ClientSettings(), sleep=slept.append, jitter=lambda: 1.0), slept


# -- the HTTP seam -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", CUT_OFF, ids=lambda e: type(e).__name__)
def test_an_answer_cut_off_in_transit_is_retried_for_a_read(fault):
    http, slept = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=fault)
        rsps.get(URL, json=PATIENT)
        assert http.json("GET", "Patient/p1") == PATIENT
    assert http.stats.requests == 2 and len(slept) == 1


@pytest.mark.parametrize("fault", CUT_OFF, ids=lambda e: type(e).__name__)
def test_an_answer_always_cut_off_is_a_transport_error_naming_the_request(fault):
    http, _ = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=fault)
        with pytest.raises(TransportError) as info:
            http.json("GET", "Patient/p1", what="GET Patient read")
    assert http.stats.requests == 5
    assert str(info.value).startswith("GET Patient read: the answer was cut off or garbled in transit")
    assert str(info.value).endswith("(after 5 attempts)")
    assert info.value.code == "fhir-transport"


def test_a_post_that_creates_is_not_sent_again_after_a_cut_off_answer():
    http, slept = make_http()
    with responses.RequestsMock() as rsps:
        rsps.post(f"{BASE}/CarePlan", body=CUT_OFF[0])
        with pytest.raises(TransportError):
            http.send("POST", "CarePlan", body={"resourceType": "CarePlan"})
    assert http.stats.requests == 1 and slept == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("<html><body>502 Bad Gateway</body></html>", "the server's answer is not valid FHIR JSON"),
        ('{"resourceType": "Patient", "id": "p1"', "the server's answer is not valid FHIR JSON"),  # cut short, no length
        ('{"hello": "world"}', "the server answered an object without resourceType, not a Patient"),
        ('["Patient"]', "the server answered list, not a Patient"),
        ('{"resourceType": "OperationOutcome"}', "the server answered OperationOutcome, not a Patient"),
    ],
)
def test_a_body_that_is_not_json_or_not_the_fhir_asked_for_is_retried_then_named(body, problem):
    client = FhirClient(BASE)
    client.http.sleep = lambda s: None
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=body, content_type="application/fhir+json")
        rsps.get(URL, json=PATIENT)
        assert client.read("Patient", "p1") == PATIENT
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=body, content_type="application/fhir+json")
        with pytest.raises(BadResponse) as info:
            client.read("Patient", "p1")
    # the parser's own reason may follow in parentheses ("(not JSON: unexpected character ...)")
    message = str(info.value)
    assert message.startswith(f"GET Patient read: {problem}") and message.endswith("(after 5 attempts)"), message
    assert info.value.code == "fhir-bad-response" and isinstance(info.value, TransportError)


def test_a_search_answered_with_something_else_than_a_bundle_is_retried():
    client = FhirClient(BASE)
    client.http.sleep = lambda s: None
    bundle = {"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": PATIENT}]}
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Patient", json={"resourceType": "Bundle", "entry": ["not an entry"]})
        rsps.get(f"{BASE}/Patient", json=bundle)
        assert client.search(SearchSpec("Patient")) == [PATIENT]


# -- the command: transport faults fail their patient, never the run ----------------------------


class FaultyFake(FakeFhir):
    """A FakeFhir whose `fault(method, path, body)` may answer an exception instead."""

    def fault(self, method: str, path: str, body) -> BaseException | None:
        return None

    def _callback(self, request):
        body = json.loads(request.body) if request.body else None
        path = request.url[len(self.base) :].split("?")[0].strip("/")
        failure = self.fault(request.method, path, body)
        if failure is not None:
            self.requests.append((request.method, request.url))
            return 200, {}, failure
        return super()._callback(request)


def _batch_for(body, pid: str) -> bool:
    return bool(body) and body.get("type") == "batch" and body["entry"][0]["request"]["url"] == f"Patient/{pid}"


def run_fake(fake: FakeFhir, *argv: str):
    with mock() as rsps:
        fake.install(rsps)
        return run_command("--fhir-base", BASE, "--as-of", "2026-06-01", *argv)


def test_a_patient_whose_answers_keep_arriving_cut_off_fails_by_name_and_the_run_goes_on():
    fake = FaultyFake(resources=record("p1") + record("p2") + record("p3"))
    fake.fault = lambda method, path, body: CUT_OFF[0] if _batch_for(body, "p2") else None
    result = run_fake(fake, "--patient", "p1", "p2", "p3", "--format", "json")
    assert result.code == 1, result.stderr
    assert [d["patient"] for d in result.json()] == ["Patient/p1", "Patient/p3"]
    assert (
        "failed: Patient/p2: pull: POST batch of searches: the answer was cut off or garbled in transit "
        "(ChunkedEncodingError) (after 5 attempts)"
    ) in result.stderr
    assert "patients found 3, assessed 2, written 0, unchanged 0, failed 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_answer_of_a_shape_nobody_foresaw_fails_its_patient_not_the_run():
    fake = FakeFhir(resources=record("p1") + record("p2"))
    original = fake._entry

    def entry(request):
        answer = original(request)
        if request["url"].startswith("Observation?patient=p1"):
            answer["resource"]["entry"] = [42]  # a searchset inside a batch answer, entries not objects
        return answer

    fake._entry = entry
    result = run_fake(fake, "--patient", "p1", "p2", "--format", "json")
    assert result.code == 1, result.stderr
    assert [d["patient"] for d in result.json()] == ["Patient/p2"]
    assert "failed: Patient/p1: unexpected error (AttributeError" in result.stderr
    assert "patients found 2, assessed 1, written 0, unchanged 0, failed 1" in result.stderr


# -- GET metadata --------------------------------------------------------------------------------


def test_one_500_on_metadata_is_retried_and_the_run_uses_the_capabilities():
    fake = FakeFhir(resources=record("p1"))
    served = {"n": 0}
    original = fake.handle

    def handle(method, path, params, body):
        if path == "metadata":
            served["n"] += 1
            if served["n"] == 1:
                return 500, outcome("database connection pool exhausted", "exception")
        return original(method, path, params, body)

    fake.handle = handle
    result = run_fake(fake, "--patient", "p1", "--format", "json")
    assert result.code == 0, result.stderr
    assert served["n"] == 2
    assert "no usable CapabilityStatement" not in result.stderr


@pytest.mark.parametrize("fault", ["500", "cut off", "not FHIR"])
def test_capabilities_that_cannot_be_read_stop_the_run_with_exit_2_and_its_report(fault):
    fake = FaultyFake(resources=record("p1") + record("p2"))
    original = fake.handle
    if fault == "500":
        fake.handle = lambda method, path, params, body: (
            (500, outcome("internal error", "exception"))
            if path == "metadata"
            else original(method, path, params, body)
        )
    elif fault == "cut off":
        fake.fault = lambda method, path, body: CUT_OFF[0] if path == "metadata" else None
    else:
        fake.handle = lambda method, path, params, body: (
            (200, {"resourceType": "Bundle", "type": "searchset"})
            if path == "metadata"
            else original(method, path, params, body)
        )
    result = run_fake(fake, "--patient", "p1", "p2", "--format", "json", "--attempts", "3")
    assert result.code == 2, result.stderr
    assert result.json() == []
    assert result.stderr.startswith("fatal: cannot read the server's capabilities (CapabilityStatement): GET metadata")
    assert "(after 3 attempts)" in result.stderr
    assert "failed: Patient/p1: not attempted: the run could not start" in result.stderr
    assert "patients found 2, assessed 0, written 0, unchanged 0, failed 2" in result.stderr
    assert [m for m, _ in fake.requests] == ["GET"] * 3  # metadata only: no patient was pulled


def test_a_server_without_metadata_still_runs_on_the_profile_defaults():
    fake = FakeFhir(resources=record("p1"), capability_statement=False)
    result = run_fake(fake, "--patient", "p1")
    assert result.code == 0, result.stderr
    assert "warning: no usable CapabilityStatement (GET metadata: HTTP 404" in result.stderr


def test_a_server_that_cannot_be_reached_ends_with_the_report_and_exit_2():
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/metadata", body=requests.exceptions.ConnectionError("refused"))
        result = run_command("--fhir-base", BASE, "--all", "--format", "json", "--attempts", "2")
    assert result.code == 2
    assert result.json() == []
    assert "fatal: cannot read the server's capabilities (CapabilityStatement): GET metadata: connection failed" in (
        result.stderr
    )
    assert "patients found 0, assessed 0, written 0, unchanged 0, failed 0" in result.stderr


# -- write-back: an answer lost after the server applied the transaction ------------------------


@pytest.mark.parametrize("fault", [requests.exceptions.ReadTimeout("read timed out"), CUT_OFF[0]])
def test_a_transaction_applied_but_its_answer_lost_is_reported_written(fault):
    fake = FakeFhir(resources=record("p1") + record("p2"), store_writes=True)
    original = fake._callback
    lost = {"n": 0}

    def callback(request):
        status, headers, body = original(request)  # the server applies it ...
        if request.method == "POST" and b'"transaction"' in request.body and b"Patient/p1" in request.body:
            if not lost["n"]:
                lost["n"] += 1
                return status, headers, fault  # ... and the answer never arrives whole
        return status, headers, body

    fake._callback = callback
    result = run_fake(fake, "--patient", "p1", "p2", "--write-back")
    assert result.code == 0, result.stderr
    assert len(fake.transactions) == 2  # one per patient: the retry found p1's and sent nothing
    assert "patients found 2, assessed 0, written 2 (1 confirmed after a lost response), unchanged 0, failed 0" in (
        result.stderr
    )
    assert "written: Patient/p1 (confirmed after a lost response)" in result.stderr
    again = run_fake(fake, "--patient", "p1", "p2", "--write-back")
    assert "written 0, unchanged 2, failed 0" in again.stderr  # a later run: unchanged, as it should be


def test_a_transaction_applied_behind_a_gateway_that_answered_504_is_reported_written():
    fake = FakeFhir(resources=record("p1"), store_writes=True)
    original = fake._callback

    def callback(request):
        status, headers, body = original(request)
        if request.method == "POST" and b'"transaction"' in request.body and len(fake.transactions) == 1:
            return 504, headers, json.dumps(outcome("upstream timed out", "timeout"))
        return status, headers, body

    fake._callback = callback
    result = run_fake(fake, "--patient", "p1", "--write-back")
    assert result.code == 0, result.stderr
    assert "written 1 (1 confirmed after a failed answer), unchanged 0, failed 0" in result.stderr


def test_a_transaction_whose_answer_is_lost_twice_fails_saying_it_may_have_been_applied():
    fake = FakeFhir(resources=record("p1"))
    original = fake._callback

    def callback(request):
        status, headers, body = original(request)
        if request.method == "POST" and b'"transaction"' in request.body:
            return status, headers, requests.exceptions.ReadTimeout("read timed out")
        return status, headers, body

    fake._callback = callback
    result = run_fake(fake, "--patient", "p1", "--write-back")
    assert result.code == 1
    assert "failed: Patient/p1: write-back: POST write-back transaction: no answer within" in result.stderr
    assert "it may have been applied: a rerun will find it and write nothing twice" in result.stderr
