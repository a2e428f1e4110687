"""Starting `fhir-aibl serve` for real in a test: a free loopback port, a clean environment,
the log in a file (a pipe nobody reads would fill and block the service), and waiting for
readiness."""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(folder: Path, config: Path, port: int, *args: str) -> tuple[subprocess.Popen, Path]:
    """`python -m fhir_aibl.cds.command --port PORT --config CONFIG ARGS...` in `folder`,
    without the caller's FHIR_AIBL_ and Prometheus variables; its log is `folder/serve.log`."""
    log = folder / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FHIR_AIBL_", "PROMETHEUS_MULTIPROC_DIR"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_aibl.cds.command", "--port", str(port), "--config", str(config), *args],
        cwd=folder,  # not the project: the database must go where the settings say
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    return proc, log


def wait_ready(proc: subprocess.Popen, port: int, log: Path) -> None:
    """Until GET /health/ready answers 200; fails the test (with the log) if the service stops or never gets there."""
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                conn.request("GET", "/health/ready")
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            pytest.fail(f"the service did not become ready: {log.read_text()[-3000:]}")
        time.sleep(0.3)
