"""`fhir-aibl serve` through add_arguments/run (uvicorn replaced: no port is opened), and once for real."""

from __future__ import annotations

import argparse
import json
import os
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


def test_defaults(monkeypatch):
    for name in ("HOST", "PORT", "WORKERS", "CONFIG", "LOG_LEVEL", "LOG_FORMAT", "GRACEFUL_TIMEOUT"):
        monkeypatch.delenv(f"FHIR_AIBL_{name}", raising=False)
    args = parse()
    assert (args.host, args.port, args.config, args.allow_unsigned) == ("127.0.0.1", 8080, None, False)
    assert args.workers == command.default_workers() >= 1
    assert (args.log_level, args.log_format, args.graceful_timeout) == ("info", "text", 30.0)


def test_every_flag_reads_its_environment_variable_and_the_command_line_wins(monkeypatch, tmp_path):
    env = {"HOST": "0.0.0.0", "PORT": "9001", "WORKERS": "3", "CONFIG": str(tmp_path / "c.yaml"), "LOG_LEVEL": "warning", "LOG_FORMAT": "json", "GRACEFUL_TIMEOUT": "5"}
    for name, value in env.items():
        monkeypatch.setenv(f"FHIR_AIBL_{name}", value)
    args = parse()
    assert (args.host, args.port, args.workers, args.config) == ("0.0.0.0", 9001, 3, tmp_path / "c.yaml")
    assert (args.log_level, args.log_format, args.graceful_timeout) == ("warning", "json", 5.0)
    assert parse("--port", "9002", "--workers", "1").port == 9002


def _config(tmp_path, extra: str = "") -> str:
    config = tmp_path / "cds.yaml"
    config.write_text(f"public_base_url: https://cds.example.org\nfeedback: {{database: {tmp_path / 'f.sqlite3'}}}\n{extra}")
    return str(config)


def test_run_serves_the_app(tmp_path):
    serve = FakeServe()
    assert command.run(parse("--config", _config(tmp_path), "--port", "9123", "--workers", "1"), serve=serve) == 0
    call = serve.calls[0]
    assert (call["host"], call["port"]) == ("127.0.0.1", 9123)
    assert call["app"].state.cds.settings.allow_unsigned is False
    # forwarded headers are not believed unless trusted_proxies names the proxies
    assert call["proxy_headers"] is False and call["forwarded_allow_ips"] is None
    assert call["timeout_graceful_shutdown"] == 30.0
    call["app"].state.cds.close()


def test_trusted_proxies_are_passed_to_uvicorn(tmp_path):
    serve = FakeServe()
    args = parse("--config", _config(tmp_path, "trusted_proxies: [10.0.0.5, 10.1.0.0/16]\n"), "--workers", "1")
    assert command.run(args, serve=serve) == 0
    assert serve.calls[0]["proxy_headers"] is True and serve.calls[0]["forwarded_allow_ips"] == "10.0.0.5,10.1.0.0/16"
    serve.calls[0]["app"].state.cds.close()


def test_several_workers_serve_the_factory_with_the_validated_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    seen = {}

    def serve(app, **kw):
        seen.update(app=app, settings=json.loads(os.environ[command.WORKER_SETTINGS_ENV]), metrics=os.environ["PROMETHEUS_MULTIPROC_DIR"], **kw)

    assert command.run(parse("--config", _config(tmp_path), "--workers", "2"), serve=serve) == 0
    assert seen["app"] == "fhir_aibl.cds.command:worker_app" and seen["factory"] is True and seen["workers"] == 2
    assert seen["settings"]["public_base_url"] == "https://cds.example.org"
    # the environment is restored, the metrics folder removed
    assert command.WORKER_SETTINGS_ENV not in os.environ and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    assert not os.path.exists(seen["metrics"])


def test_verifying_jwts_without_public_base_url_exits_2_and_says_how_to_set_it(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FHIR_AIBL_PUBLIC_BASE_URL", raising=False)
    config = tmp_path / "cds.yaml"
    config.write_text(f"feedback: {{database: {tmp_path / 'f.sqlite3'}}}\n")
    serve = FakeServe()
    assert command.run(parse("--config", str(config), "--workers", "1"), serve=serve) == 2
    assert not serve.calls
    err = capsys.readouterr().err
    assert "public_base_url is not set" in err and "FHIR_AIBL_PUBLIC_BASE_URL" in err
    monkeypatch.setenv("FHIR_AIBL_PUBLIC_BASE_URL", "https://cds.example.org")
    assert command.run(parse("--config", str(config), "--workers", "1"), serve=serve) == 0
    serve.calls[0]["app"].state.cds.close()


def test_json_logs_refuse_the_patient_data_switch(tmp_path, capsys):
    serve = FakeServe()
    args = parse("--config", _config(tmp_path, "log_patient_data: true\n"), "--workers", "1", "--log-format", "json")
    assert command.run(args, serve=serve) == 2 and not serve.calls
    assert "log_patient_data" in capsys.readouterr().err


def test_allow_unsigned_is_loud(tmp_path, capsys):
    config = tmp_path / "cds.yaml"
    config.write_text(f"feedback: {{database: {tmp_path / 'f.sqlite3'}}}\n")
    serve = FakeServe()
    assert command.run(parse("--config", str(config), "--allow-unsigned", "--workers", "1"), serve=serve) == 0
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
    serve = FakeServe(OSError(98, "Address already in use"))
    assert command.run(parse("--config", _config(tmp_path), "--workers", "1"), serve=serve) == 2
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
        [sys.executable, "-m", "fhir_aibl.cds.command", "--port", str(port), "--config", str(config), "--allow-unsigned", "--log-level", "warning", "--workers", "1"],
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
