"""Graceful shutdown: a hook call in progress when `fhir-aibl serve --workers 2` gets SIGTERM is
still answered, then the service exits 0.

The call is made to wait inside the service, deterministically: one prefetch key is left out,
so the service queries the request's fhirServer, a stub here that holds its answer until the
test has sent SIGTERM.
"""

from __future__ import annotations

import http.client
import json
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
