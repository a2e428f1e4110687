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
        if isinstance(sub, type) and issubclass(sub, BaseModel) and name in ("jwt", "fhir", "feedback", "smart"):
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


def test_the_nginx_example_passes_nginx_t(tmp_path):
    """`nginx -t` on the example, with a self-signed certificate in place of the hospital's."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed on this machine")
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cds.hospital.example.org")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    conf = (DEPLOY / "nginx-fhir-aibl.conf").read_text()
    conf = conf.replace("/etc/ssl/certs/cds.hospital.example.org.pem", str(tmp_path / "cert.pem"))
    conf = conf.replace("/etc/ssl/private/cds.hospital.example.org.key", str(tmp_path / "key.pem"))
    (tmp_path / "site.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'};\nerror_log stderr;\nevents {{}}\nhttp {{\n  access_log off;\n  include {tmp_path / 'site.conf'};\n}}\n"
    )
    done = subprocess.run([nginx, "-t", "-q", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
