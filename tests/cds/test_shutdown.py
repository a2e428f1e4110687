"""Graceful shutdown: a hook call in progress when `fhir-aibl serve --workers 2` gets SIGTERM is
still answered, then the service exits 0.

The call is made to wait inside the service, deterministically: one prefetch key is left out,
so the service queries the request's fhirServer, a stub here that holds its answer until the
test has sent SIGTERM.
"""

from __future__ import annotations

import http.client
import json
import socket
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


from fhir_aibl.cds.samples import patient_view_request

from .conftest import AS_OF, PV, bundle
from .serving import free_port, start, wait_ready


class _SlowFhir(BaseHTTPRequestHandler):
    arrived = threading.Event()
    release = threading.Event()

    def do_GET(self):  # noqa: N802 - http.server's name
        type(self).arrived.set()
        type(self).release.wait(30)
        body = json.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/fhir+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


def test_sigterm_lets_the_call_in_progress_finish_then_exits_0(tmp_path):
    fhir = ThreadingHTTPServer(("127.0.0.1", 0), _SlowFhir)
    threading.Thread(target=fhir.serve_forever, daemon=True).start()
    fhir_base = f"http://127.0.0.1:{fhir.server_address[1]}/fhir"
    port = free_port()
    config = tmp_path / "cds.yaml"
    config.write_text(f"as_of: {AS_OF}\nstate_dir: state\nfhir: {{allowlist: ['{fhir_base}']}}\n")
    proc, log = start(tmp_path, config, port, "--workers", "2", "--allow-unsigned", "--graceful-timeout", "20")
    try:
        wait_ready(proc, port, log)
        request = patient_view_request(bundle("V06"))
        del request["prefetch"]["conditions"]
        request["fhirServer"] = fhir_base
        answer: dict = {}

        def call():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", f"/cds-services/{PV}", body=json.dumps(request), headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            answer["status"], answer["body"] = response.status, response.read()

        caller = threading.Thread(target=call)
        caller.start()
        assert _SlowFhir.arrived.wait(60), log.read_text()[-2000:]  # the call is inside the service now
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)  # the signal reaches the workers while the call waits
        assert proc.poll() is None  # still finishing the call
        _SlowFhir.release.set()
        caller.join(60)
        assert answer.get("status") == 200, answer
        assert json.loads(answer["body"])["cards"]  # a full answer, not an error
        code = proc.wait(timeout=60)
        assert code == 0, log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()
    finally:
        _SlowFhir.release.set()
        fhir.shutdown()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_log(proc, log, text: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while text not in log.read_text():
        assert proc.poll() is None or text in log.read_text(), log.read_text()[-2000:]
        assert time.monotonic() < deadline, f"{text!r} not logged: {log.read_text()[-2000:]}"
        time.sleep(0.02)


def _raw_request(body: bytes) -> bytes:
    head = (
        f"POST /cds-services/{PV} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response from `sock` (Content-Length framed, as the service answers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection was closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection was closed in the middle of the answer"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def test_a_connection_accepted_before_sigterm_whose_request_comes_after_is_still_answered(tmp_path):
    """The race of a rules upgrade (the old worker stops while a client's request is on its way):
    the stopping worker waits a moment for the request of a connection it has accepted, answers
    it, and closes it; a kept-alive connection's next request too; a connection that sends
    nothing is closed and does not hold the stop."""
    port = free_port()
    config = tmp_path / "cds.yaml"
    config.write_text(f"as_of: {AS_OF}\nstate_dir: state\n")
    proc, log = start(tmp_path, config, port, "--workers", "1", "--allow-unsigned", "--log-level", "debug")
    body = json.dumps(patient_view_request(bundle("V06"))).encode()
    try:
        wait_ready(proc, port, log)
        kept = socket.create_connection(("127.0.0.1", port), timeout=30)
        kept.sendall(_raw_request(body))
        assert _read_response(kept)[0] == 200  # kept alive: HTTP/1.1 without Connection: close
        fresh = socket.create_connection(("127.0.0.1", port), timeout=30)
        silent = socket.create_connection(("127.0.0.1", port), timeout=30)
        time.sleep(0.3)  # accepted by the service
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _wait_for_log(proc, log, "Shutting down")  # the connections have been told to stop
        fresh.sendall(_raw_request(body))
        kept.sendall(_raw_request(body))
        for sock in (fresh, kept):
            status, _, answer = _read_response(sock)
            assert status == 200 and json.loads(answer)["cards"]
            assert sock.recv(1) == b""  # then closed by the service
        assert silent.recv(1) == b""  # nothing sent: closed
        assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        assert time.monotonic() - stopped_at < 30  # not held by the silent connection until the graceful timeout
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
