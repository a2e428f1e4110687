"""Rules upgrades under load: `fhir-aibl serve --workers 2` gets SIGHUP again and again while
clients call it; every call must be answered.

    python bench/upgrade.py [--upgrades 16] [--clients 3] [--every 12]

Starts the service on a free loopback port (its own folder under a temporary directory, unsigned
calls), then `--clients` threads POST the patient-view hook for a worked example in a loop, each
call on a new connection (`Connection: close`: the case where a stopping worker may have
accepted the connection before its request arrives). Every `--every` seconds the rules file
gets a new comment (a new ruleset name) and the service SIGHUP: both workers are replaced one
after the other. Prints one JSON line: calls answered 200, calls that failed (with the first
errors), upgrades completed (workers replaced, from the service's log) and the seconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fhir_aibl.cds.samples import patient_view_request  # noqa: E402

HOOK = "/cds-services/aibl-patient-view"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upgrades", type=int, default=16)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--every", type=float, default=12.0, help="seconds between two SIGHUPs")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="fhir-aibl-upgrade-"))
    shutil.copytree(ROOT / "rules", folder / "rules")
    (folder / "cds.yaml").write_text("as_of: 2026-06-01\nrules: rules/aibl.yaml\nstate_dir: state\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIR_AIBL_", "PROMETHEUS_MULTIPROC_DIR"))}
    log = folder / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_aibl.cds.command", "--port", str(port), "--config", "cds.yaml",
         "--workers", "2", "--allow-unsigned"],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"),
    )
    body = json.dumps(patient_view_request(json.loads((ROOT / "fixtures/bundles/V06.json").read_text()))).encode()
    answered = 0
    errors: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def call() -> int:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            conn.request("POST", HOOK, body=body, headers={"Content-Type": "application/json", "Connection": "close"})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    def client() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                status = call()
                problem = None if status == 200 else f"HTTP {status}"
            except OSError as exc:
                problem = repr(exc)
            with lock:
                if problem is None:
                    answered += 1
                else:
                    errors.append(problem)

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call() == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(log.read_text()[-2000:], file=sys.stderr)
                return 2
            time.sleep(0.3)
        started = time.monotonic()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        rules = folder / "rules" / "aibl.yaml"
        for i in range(args.upgrades):
            rules.write_text(rules.read_text() + f"\n# upgrade {i}\n")
            proc.send_signal(signal.SIGHUP)
            time.sleep(args.every)
        stop.set()
        for thread in threads:
            thread.join()
        seconds = time.monotonic() - started
        replaced = log.read_text().count("Terminated child process")  # before the service's own stop
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(json.dumps({"upgrades": args.upgrades, "workers_replaced": replaced, "answered": answered,
                      "failed": len(errors), "first_errors": errors[:5], "seconds": round(seconds, 1)}))
    shutil.rmtree(folder, ignore_errors=True)
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
