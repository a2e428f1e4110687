"""The deployment files and guide: the systemd unit verifies, and the guide names every metric,
every environment variable of `serve` and the endpoints the proxy example routes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pydantic import BaseModel

from fhir_aibl.cds import metrics
from fhir_aibl.cds.settings import Settings, environment_settings

from ..conftest import ROOT

DEPLOY = ROOT / "deploy"
GUIDE = ROOT / "docs" / "deployment.md"
UNIT = DEPLOY / "fhir-aibl-cds@.service"


def test_the_systemd_unit_verifies(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    # The unit runs /opt/fhir-aibl/venv/bin/fhir-aibl; here, this checkout's own command.
    command = Path(sys.executable).parent / "fhir-aibl"
    if not command.exists():
        pytest.skip("the fhir-aibl command is not installed beside this Python")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/fhir-aibl/venv/bin/fhir-aibl", str(command)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


def test_the_unit_uses_the_state_directory_and_stops_gracefully():
    text = UNIT.read_text()
    for line in ("StateDirectory=fhir-aibl", "KillSignal=SIGTERM", "ExecReload=/bin/kill -HUP $MAINPID", "RestartPreventExitStatus=2", "Environment=FHIR_AIBL_PORT=%i"):
        assert line in text
    timeout = int(re.search(r"TimeoutStopSec=(\d+)", text).group(1))
    graceful = int(re.search(r"FHIR_AIBL_GRACEFUL_TIMEOUT=(\d+)", text).group(1))
    assert timeout > graceful  # systemd must not kill what is still finishing its calls


def test_the_guide_names_every_metric_and_every_variable_of_serve():
    text = GUIDE.read_text()
    names = [m._name for m in vars(metrics).values() if hasattr(m, "_name") and str(getattr(m, "_name", "")).startswith("fhir_aibl_cds_")]
    assert len(names) >= 10
    missing = [n for n in names if n not in text]
    assert missing == []
    for flag in ("HOST", "PORT", "WORKERS", "CONFIG", "LOG_LEVEL", "LOG_FORMAT", "GRACEFUL_TIMEOUT"):
        assert f"FHIR_AIBL_{flag}" in text
    for endpoint in ("/health/live", "/health/ready", "/metrics"):
        assert endpoint in text


def test_the_proxy_example_routes_what_the_service_serves():
    conf = (DEPLOY / "nginx-fhir-aibl.conf").read_text()
    assert "location /cds-services" in conf and "ssl_certificate" in conf
    assert "client_max_body_size 5m" in conf  # = the default max_request_bytes
    assert re.search(r"location = /metrics \{\s*deny all;", conf)
    assert "deploy/nginx-fhir-aibl.conf" in GUIDE.read_text() and "deploy/fhir-aibl-cds@.service" in GUIDE.read_text()


def _leaves(model: type[BaseModel], prefix: str = ""):
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel) and name in ("jwt", "fhir", "feedback"):
            yield from _leaves(sub, f"{prefix}{name}.")
        else:
            yield prefix + name


def test_the_guide_lists_every_setting_with_the_variable_that_sets_it():
    text = GUIDE.read_text()
    defaults = Settings().model_dump(mode="json")
    for name in _leaves(Settings):
        variable = "FHIR_AIBL_" + name.upper().replace(".", "__")
        assert f"| `{name}` | `{variable}` |" in text, name
        value = defaults
        for part in name.split("."):
            value = value[part]
        if value is None:
            continue
        raw = value if isinstance(value, str) else json.dumps(value)
        read = environment_settings({variable: raw})
        for part in name.split("."):
            read = read[part]
        assert read is not None, variable
