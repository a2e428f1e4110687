"""`fhir-aibl serve --workers 2` for real: two uvicorn worker processes behind one loopback port.

Requests go over HTTP on kept-alive connections; each connection stays with the worker that
accepted it, and `/health/live` says which (its pid), so a test can choose the worker: the
JWT replay cache and the feedback are shown to be shared by sending a token, or feedback, to
one worker and the next call to the other. Every worked example is answered over HTTP as the
in-process app answers it. Health, readiness and metrics are checked by scraping them, and
the service stops cleanly on SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fhir_aibl.cds.samples import draft_medication_request, order_select_request, patient_view_request

from .conftest import AS_OF, BUNDLES, OS, PV, bundle
from .serving import free_port, start, wait_ready

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Worker:
    """One kept-alive connection, and the pid of the worker process serving it."""

    conn: http.client.HTTPConnection
    pid: int
    port: int = 0

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None) -> Answer:
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            return self._send(method, path, data, headers)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # uvicorn closes a connection idle for 5 s (timeout_keep_alive), which a slow test
            # on a loaded machine can exceed; nothing was processed on it: reconnect to the same
            # worker and send again
            self._reconnect()
            return self._send(method, path, data, headers)

    def _send(self, method: str, path: str, data, headers: dict) -> Answer:
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())

    def _reconnect(self) -> None:
        self.conn.close()
        for _ in range(500):
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            if self._send("GET", "/health/live", None, {}).json()["pid"] == self.pid:
                return
            self.conn.close()
        pytest.fail(f"no new connection reached worker {self.pid}")


@dataclass
class Served:
    proc: subprocess.Popen
    port: int
    base: str
    log: Path
    workers: list[Worker] = field(default_factory=list)

    def connect(self) -> Worker:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        worker = Worker(conn, 0, self.port)
        worker.pid = worker._send("GET", "/health/live", None, {}).json()["pid"]
        return worker


@pytest.fixture(scope="module")
def served(tmp_path_factory, signer) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("workers")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp / "ehr-jwks.json").write_text(json.dumps(signer.jwks))
    config = tmp / "cds.yaml"
    config.write_text(
        f"public_base_url: {base}\n"
        f"as_of: {AS_OF}\n"
        "jwt:\n"
        f"  issuers: [{{iss: '{signer.iss}', jwks_file: ehr-jwks.json}}]\n"
        f"state_dir: {tmp / 'state'}\n"
    )
    proc, log = start(tmp, config, port, "--workers", "2", "--log-format", "json", "--log-level", "info")
    served = Served(proc, port, base, log)
    try:
        wait_ready(proc, port, log)
        by_pid: dict[int, Worker] = {}
        for _ in range(200):
            worker = served.connect()
            if worker.pid in by_pid:
                worker.conn.close()
            else:
                by_pid[worker.pid] = worker
            if len(by_pid) == 2:
                break
        served.workers = list(by_pid.values())
        yield served
    finally:
        for worker in served.workers:
            worker.conn.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _pair(served: Served) -> tuple[Worker, Worker]:
    if len(served.workers) < 2:
        pytest.fail("200 connections all went to one worker: the second worker is not serving")
    return served.workers[0], served.workers[1]


def _bearer(signer, served: Served, service: str) -> dict:
    return signer.bearer(f"{served.base}/cds-services/{service}")


def _scrape(worker: Worker) -> dict[str, float]:
    answer = worker.request("GET", "/metrics")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/plain")
    values: dict[str, float] = {}
    for line in answer.body.decode().splitlines():
        match = re.match(r"^(fhir_aibl_cds_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def _total(values: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in values.items() if k.startswith(prefix))


# --------------------------------------------------------------------------- tests, in order


def test_two_worker_processes_serve_one_port_and_the_database_is_in_the_state_directory(served, tmp_path_factory):
    a, b = _pair(served)
    assert a.pid != b.pid and served.proc.pid not in (a.pid, b.pid)
    ready = a.request("GET", "/health/ready")
    assert ready.status == 200
    body = ready.json()
    assert body["status"] == "ready" and body["checks"]["database"] == "writable"
    assert set(body["checks"]["jwks"].values()) == {"available"}
    assert body["ruleset"] and ready.headers["x-fhir-aibl-ruleset"] == body["ruleset"]
    discovery = b.request("GET", "/cds-services")
    assert discovery.status == 200 and {s["id"] for s in discovery.json()["services"]} == {PV, OS}


def test_a_token_replayed_to_the_other_worker_is_refused(served, signer):
    a, b = _pair(served)
    request = patient_view_request(bundle("V06"))
    for first, second in ((a, b), (b, a), (a, b)):
        headers = _bearer(signer, served, PV)
        accepted = first.request("POST", f"/cds-services/{PV}", request, headers)
        assert accepted.status == 200, accepted.body
        replayed = second.request("POST", f"/cds-services/{PV}", request, headers)
        assert replayed.status == 401
        assert "replay" in replayed.json()["issue"][0]["details"]["text"]


def test_every_worked_example_is_answered_over_http_as_in_process(served, signer, make_app):
    local = make_app()
    workers = _pair(served)
    names = sorted(p.stem for p in BUNDLES.glob("*.json"))
    assert len(names) >= 50
    for i, name in enumerate(names):
        request = patient_view_request(bundle(name))
        remote = workers[i % 2].request("POST", f"/cds-services/{PV}", request, _bearer(signer, served, PV))
        expected = local.hook(PV, request)
        assert remote.status == expected.status_code, (name, remote.body[:300])
        if remote.status != 200:
            continue
        assert remote.headers["x-fhir-aibl-ruleset"]

        def strip(cards):
            return [{k: v for k, v in c.items() if k not in ("uuid",)} for c in cards]

        got, want = strip(remote.json()["cards"]), strip(expected.json()["cards"])
        # suggestion uuids differ per answer; everything the clinician reads is the same
        assert json.dumps(got, sort_keys=True).count('"uuid"') == json.dumps(want, sort_keys=True).count('"uuid"')
        assert [(c["summary"], c["indicator"], c["detail"]) for c in got] == [(c["summary"], c["indicator"], c["detail"]) for c in want], name


def test_order_select_and_refusals_over_http(served, signer):
    a, b = _pair(served)
    draft = draft_medication_request("v06", "199224", "anastrozole 1 MG Oral Tablet")
    request = order_select_request(bundle("V06"), [draft])
    answer = a.request("POST", f"/cds-services/{OS}", request, _bearer(signer, served, OS))
    assert answer.status == 200 and answer.json()["cards"]
    not_json = b.request("POST", f"/cds-services/{PV}", raw=b"hook=patient-view", headers={**_bearer(signer, served, PV), "Content-Type": "application/x-www-form-urlencoded"})
    assert not_json.status == 415
    unsigned = b.request("POST", f"/cds-services/{PV}", patient_view_request(bundle("V06")))
    assert unsigned.status == 401
    wrong_aud = a.request("POST", f"/cds-services/{PV}", patient_view_request(bundle("V06")), signer.bearer(f"http://other.example.org/cds-services/{PV}"))
    assert wrong_aud.status == 401


def test_feedback_given_to_one_worker_suppresses_the_card_on_the_other(served, signer):
    a, b = _pair(served)
    request = patient_view_request(bundle("V11"))
    first = a.request("POST", f"/cds-services/{PV}", request, _bearer(signer, served, PV))
    assert first.status == 200
    cards = first.json()["cards"]
    card = next(c for c in cards if c["indicator"] != "critical")
    feedback = {
        "feedback": [
            {
                "card": card["uuid"],
                "outcome": "overridden",
                "overrideReason": {"reason": card["overrideReasons"][0]},
                "outcomeTimestamp": "2026-06-01T10:00:00Z",
            }
        ]
    }
    stored = b.request("POST", f"/cds-services/{PV}/feedback", feedback, _bearer(signer, served, PV))
    assert stored.status == 200, stored.body
    again = a.request("POST", f"/cds-services/{PV}", request, _bearer(signer, served, PV))
    assert again.status == 200
    assert card["summary"] not in [c["summary"] for c in again.json()["cards"]]


def test_metrics_are_summed_over_both_workers(served, signer):
    a, b = _pair(served)
    before = _scrape(a)
    request = patient_view_request(bundle("V06"))
    for worker in (a, b, a, b):
        assert worker.request("POST", f"/cds-services/{PV}", request, _bearer(signer, served, PV)).status == 200
    refused = b.request("POST", f"/cds-services/{PV}", request, {"Authorization": "Bearer not.a.token"})
    assert refused.status == 401
    from_a, from_b = _scrape(a), _scrape(b)
    key = f'fhir_aibl_cds_requests_total{{hook="patient-view",service="{PV}",status="200"}}'
    assert from_a[key] - before.get(key, 0) == 4
    for values in (from_a, from_b):
        assert values[key] == from_a[key]
        assert values['fhir_aibl_cds_jwt_rejections_total{reason="malformed"}'] >= 1
        assert values['fhir_aibl_cds_jwt_rejections_total{reason="replay"}'] >= 3
        assert values['fhir_aibl_cds_requests_total{hook="patient-view",service="' + PV + '",status="415"}'] >= 1
        assert _total(values, "fhir_aibl_cds_cards_total") > 50
        assert _total(values, "fhir_aibl_cds_suppressed_cards_total") >= 1
        assert values['fhir_aibl_cds_request_duration_seconds_count{hook="patient-view"}'] >= 60
        assert any(k.startswith("fhir_aibl_cds_ruleset_info{") for k in values)


def test_logs_are_json_without_patient_identifiers_and_sigterm_stops_cleanly(served):
    for worker in served.workers:
        worker.conn.close()
    served.workers = []
    served.proc.send_signal(signal.SIGTERM)
    try:
        code = served.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        served.proc.kill()
        pytest.fail("the service did not stop within 60 s of SIGTERM")
    err = served.log.read_text()
    assert code == 0, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and "Traceback" not in err
    assert [line for line in lines if not line.startswith("{")] == []  # every line is one JSON object
    entries = [json.loads(line) for line in lines]
    messages = " ".join(e["message"] for e in entries)
    assert "card(s) in" in messages and "shutting down" in messages
    for patient in ("v06", "v11", "Patient/"):
        assert patient not in messages
