"""The SEKMET fixture of tests/fhir_server.py, which other test packages use too."""

from __future__ import annotations

import pytest
import requests

from ..fhir_server import SekmetUnavailable, on_ci, sekmet_server, unavailable


def test_the_fixture_serves_fhir_r4_on_loopback(sekmet_base_url):
    assert sekmet_base_url.startswith("http://127.0.0.1:") and sekmet_base_url.endswith("/fhir")
    statement = requests.get(f"{sekmet_base_url}/metadata", timeout=10).json()
    assert statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
    interactions = {i["code"] for i in statement["rest"][0]["interaction"]}
    assert {"batch", "transaction"} <= interactions
    careplan = next(r for r in statement["rest"][0]["resource"] if r["type"] == "CarePlan")
    assert careplan["conditionalCreate"] is True and careplan["versioning"] == "versioned-update"


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    with pytest.raises(SekmetUnavailable, match="SEKMET did not start") as info:
        with sekmet_server(tmp_path, extra_config={"port": "not-a-port"}, startup_timeout=30):
            pass  # pragma: no cover - never reached
    assert "exited with status" in str(info.value)


def test_unavailable_skips_locally_and_fails_on_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert not on_ci()
    with pytest.raises(pytest.skip.Exception, match="no venv"):
        unavailable("no venv")
    for value in ("true", "1", "yes"):
        monkeypatch.setenv("CI", value)
        assert on_ci()
        with pytest.raises(pytest.fail.Exception, match="CI is set"):
            unavailable("no venv")
    monkeypatch.setenv("CI", "false")
    assert not on_ci()
