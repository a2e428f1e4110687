"""`fhir-aibl serve` through add_arguments/run (uvicorn replaced: no port is opened), and once for real."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

import pytest
import requests

from fhir_aibl.cds import command

from ..conftest import ROOT


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


class FakeServe:
    def __init__(self, error: Exception | None = None):
        self.calls: list[dict] = []
        self.error = error

    def __call__(self, app, **kw):
        self.calls.append({"app": app, **kw})
        if self.error:
            raise self.error


def test_defaults():
    args = parse()
    assert (args.host, args.port, args.config, args.allow_unsigned) == ("127.0.0.1", 8080, None, False)


def test_run_serves_the_app(tmp_path):
    config = tmp_path / "cds.yaml"
    config.write_text(f"feedback: {{database: {tmp_path / 'f.sqlite3'}}}\n")
    serve = FakeServe()
    assert command.run(parse("--config", str(config), "--port", "9123"), serve=serve) == 0
    call = serve.calls[0]
    assert (call["host"], call["port"]) == ("127.0.0.1", 9123)
    assert call["app"].state.cds.settings.allow_unsigned is False
    call["app"].state.cds.close()


def test_allow_unsigned_is_loud(tmp_path, capsys):
    config = tmp_path / "cds.yaml"
    config.write_text(f"feedback: {{database: {tmp_path / 'f.sqlite3'}}}\n")
    serve = FakeServe()
    assert command.run(parse("--config", str(config), "--allow-unsigned"), serve=serve) == 0
    assert serve.calls[0]["app"].state.cds.settings.allow_unsigned is True
    err = capsys.readouterr().err
    assert "UNSIGNED MODE" in err and "local development only" in err.lower()
    serve.calls[0]["app"].state.cds.close()


def test_a_bad_config_exits_2(tmp_path, capsys):
    config = tmp_path / "cds.yaml"
    config.write_text("jwt: {algorithms: [HS256]}\n")
    serve = FakeServe()
    assert command.run(parse("--config", str(config)), serve=serve) == 2
    assert not serve.calls
    assert "fatal:" in capsys.readouterr().err


def test_a_port_in_use_exits_2(tmp_path, capsys):
    config = tmp_path / "cds.yaml"
    config.write_text(f"feedback: {{database: {tmp_path / 'f.sqlite3'}}}\n")
    serve = FakeServe(OSError(98, "Address already in use"))
    assert command.run(parse("--config", str(config)), serve=serve) == 2
    assert "cannot listen" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_for_real_on_loopback(tmp_path):
    """One real uvicorn process: discovery and one hook call over HTTP on 127.0.0.1."""
    port = _free_port()
    config = tmp_path / "cds.yaml"
    config.write_text(f"as_of: 2026-06-01\nfeedback: {{database: {tmp_path / 'f.sqlite3'}}}\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fhir_aibl.cds.command", "--port", str(port), "--config", str(config), "--allow-unsigned", "--log-level", "warning"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                discovery = requests.get(f"{base}/cds-services", timeout=2)
                break
            except requests.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the server did not start: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        assert discovery.status_code == 200
        from fhir_aibl.cds.samples import patient_view_request

        request = patient_view_request(json.loads((ROOT / "fixtures" / "bundles" / "V06.json").read_text()))
        answer = requests.post(f"{base}/cds-services/aibl-patient-view", json=request, timeout=30)
        assert answer.status_code == 200 and "High risk" in answer.json()["cards"][0]["summary"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
