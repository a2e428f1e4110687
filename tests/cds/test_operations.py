"""Operations, in process: liveness, readiness, Prometheus metrics (scraped from /metrics), the
shared replay cache, JSON logs, settings from the environment and the state directory."""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from pathlib import Path

import pytest
import responses

from fhir_aibl.cds.logs import JsonFormatter
from fhir_aibl.cds.replay import SqliteReplayCache
from fhir_aibl.cds.samples import patient_view_request
from fhir_aibl.cds.settings import Settings, SettingsError, load_settings

from .conftest import BASE, EHR_JKU, PV, bundle

AUD = f"{BASE}/cds-services/{PV}"


def scrape(harness) -> dict[str, float]:
    """The /metrics text exposition as {sample with labels: value}."""
    response = harness.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for line in response.text.splitlines():
        match = re.match(r"^(fhir_aibl_cds_\w+(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def delta(before: dict, after: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


# --------------------------------------------------------------------------- health


def test_liveness_and_readiness_unsigned(make_app):
    harness = make_app()
    live = harness.client.get("/health/live")
    assert live.status_code == 200 and live.json() == {"status": "alive", "pid": os.getpid()}
    ready = harness.client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["checks"]["database"] == "writable"
    assert body["ruleset"] == harness.cds.assessor.ruleset_info.name == ready.headers["x-fhir-aibl-ruleset"]


def test_readiness_follows_the_jwks_and_the_database(make_app, signer):
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt=signer.issuer_settings())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(EHR_JKU, status=500)
        down = harness.client.get("/health/ready")
        assert down.status_code == 503
        assert down.json()["checks"]["jwks"] == {signer.iss: "unreachable and not cached"}
        # probes right after a failed fetch do not hammer the EHR
        assert harness.client.get("/health/ready").status_code == 503 and len(mock.calls) == 1
        mock.replace(responses.GET, EHR_JKU, json=signer.jwks)
        harness.clock[0] += 61  # past jwt.jwks_refetch_seconds
        up = harness.client.get("/health/ready")
        assert up.status_code == 200 and up.json()["checks"]["jwks"] == {signer.iss: "available"}
        # cached: no fetch on the next probes
        assert harness.client.get("/health/ready").status_code == 200 and len(mock.calls) == 2

    def broken():
        raise sqlite3.OperationalError("attempt to write a readonly database")

    harness.cds.store.check_writable = broken
    with responses.RequestsMock(assert_all_requests_are_fired=False):
        not_ready = harness.client.get("/health/ready")
    assert not_ready.status_code == 503 and not_ready.json()["checks"]["database"] == "not writable (OperationalError)"


def test_every_hook_answer_names_its_ruleset(make_app):
    harness = make_app()
    response = harness.hook(PV, patient_view_request(bundle("V06")))
    assert response.status_code == 200 and response.headers["x-fhir-aibl-ruleset"] == harness.cds.ruleset


# --------------------------------------------------------------------------- metrics


def test_metrics_count_requests_cards_refusals_and_suppressions(make_app, signer, jwks_server):
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt=signer.issuer_settings())
    before = scrape(harness)
    request = patient_view_request(bundle("V11"))
    first = harness.hook(PV, request, signer.bearer(AUD))
    assert first.status_code == 200
    cards = first.json()["cards"]
    card = next(c for c in cards if c["indicator"] != "critical")
    assert harness.feedback(
        PV,
        {"feedback": [{"card": card["uuid"], "outcome": "overridden", "overrideReason": {"reason": card["overrideReasons"][0]}, "outcomeTimestamp": "2026-06-01T10:00:00Z"}]},
        signer.bearer(AUD),
    ).status_code == 200
    assert harness.hook(PV, request, signer.bearer(AUD)).status_code == 200  # the overridden card is suppressed
    token = signer.bearer(AUD)
    assert harness.hook(PV, request, token).status_code == 200
    assert harness.hook(PV, request, token).status_code == 401  # replay
    assert harness.hook(PV, request, signer.bearer(f"{BASE}/cds-services/other")).status_code == 401  # audience
    assert harness.hook(PV, request).status_code == 401  # missing
    assert harness.client.post(f"/cds-services/{PV}", content=b"{}", headers={**signer.bearer(AUD), "Content-Type": "text/plain"}).status_code == 415
    missing_key = patient_view_request(bundle("V06"))
    del missing_key["prefetch"]["conditions"]
    assert harness.hook(PV, missing_key, signer.bearer(AUD)).status_code == 412  # no fhirServer: refused
    harness.cds.in_flight = 10_000  # saturated
    assert harness.hook(PV, request, signer.bearer(AUD)).status_code == 503
    harness.cds.in_flight = 0
    after = scrape(harness)

    req = 'fhir_aibl_cds_requests_total{hook="patient-view",service="%s",status="%s"}'
    assert delta(before, after, req % (PV, "200")) == 3
    assert delta(before, after, req % (PV, "401")) == 3
    assert delta(before, after, req % (PV, "415")) == 1
    assert delta(before, after, req % (PV, "412")) == 1
    assert delta(before, after, req % (PV, "503")) == 1
    for reason in ("replay", "audience", "missing"):
        assert delta(before, after, f'fhir_aibl_cds_jwt_rejections_total{{reason="{reason}"}}') == 1
    assert delta(before, after, "fhir_aibl_cds_admission_refusals_total") == 1
    assert delta(before, after, 'fhir_aibl_cds_prefetch_fallbacks_total{outcome="refused"}') == 1
    assert delta(before, after, f'fhir_aibl_cds_suppressed_cards_total{{kind="{_kind(harness, card)}"}}') >= 1
    assert delta(before, after, 'fhir_aibl_cds_feedback_total{outcome="overridden"}') == 1
    shown = sum(delta(before, after, k) for k in after if k.startswith('fhir_aibl_cds_cards_total{hook="patient-view"'))
    assert shown >= len(cards) + 1
    assert delta(before, after, 'fhir_aibl_cds_request_duration_seconds_count{hook="patient-view"}') == 9
    assert after["fhir_aibl_cds_in_flight"] == 0


def _kind(harness, card) -> str:
    record = harness.cds.store.card(card["uuid"])
    return record.kind


def test_metrics_count_resources_of_another_patient(make_app):
    harness = make_app()
    before = scrape(harness)
    request = patient_view_request(bundle("V06"))
    stranger = {"resourceType": "Condition", "id": "x1", "subject": {"reference": "Patient/someone-else"}, "code": {"text": "x"}}
    request["prefetch"]["conditions"].setdefault("entry", []).append({"resource": stranger})
    assert harness.hook(PV, request).status_code == 200
    assert delta(before, scrape(harness), 'fhir_aibl_cds_resources_dropped_total{reason="other-patient"}') == 1


def test_unknown_service_ids_do_not_become_metric_labels(make_app):
    harness = make_app()
    assert harness.hook("made-up-1234", patient_view_request(bundle("V06"))).status_code == 404
    assert "made-up-1234" not in harness.client.get("/metrics").text


# --------------------------------------------------------------------------- replay cache shared by processes


def test_the_replay_cache_is_shared_through_the_database(tmp_path):
    now = [1_000.0]
    one = SqliteReplayCache(tmp_path / "db.sqlite3", lambda: now[0])
    two = SqliteReplayCache(tmp_path / "db.sqlite3", lambda: now[0])  # another worker's connection
    assert one.check_and_add("iss", "a", 1_300.0)
    assert not two.check_and_add("iss", "a", 1_300.0)
    assert not one.check_and_add("iss", "a", 1_300.0)
    assert two.check_and_add("other-iss", "a", 1_300.0)  # per issuer
    now[0] = 1_301.0  # past its exp: the jti may be forgotten
    assert two.check_and_add("iss", "a", 1_600.0)
    assert not one.check_and_add("iss", "a", 1_600.0)
    one.close()
    two.close()


# --------------------------------------------------------------------------- logs


def test_json_log_lines_carry_no_exception_text():
    record = logging.LogRecord("fhir_aibl.cds", logging.ERROR, __file__, 1, "POST %s -> 500", ("/cds-services/x",), None)
    try:
        raise ValueError("value 'Patient/secret-id' is not valid")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["message"] == "POST /cds-services/x -> 500" and entry["level"] == "ERROR" and entry["exception"] == "ValueError"
    assert "secret-id" not in line and "\n" not in line


# --------------------------------------------------------------------------- settings from the environment


def test_every_setting_can_come_from_the_environment(tmp_path):
    config = tmp_path / "cds.yaml"
    config.write_text("public_base_url: https://file.example.org\njwt: {clock_skew_seconds: 10, max_lifetime_seconds: 600}\n")
    environ = {
        "FHIR_AIBL_PUBLIC_BASE_URL": "https://env.example.org/",
        "FHIR_AIBL_JWT__CLOCK_SKEW_SECONDS": "30",
        "FHIR_AIBL_CORS_ORIGINS": '["https://ehr.example.org"]',
        "FHIR_AIBL_STATE_DIR": str(tmp_path / "state"),
        "FHIR_AIBL_ALLOW_UNSIGNED": "false",
        "FHIR_AIBL_PORT": "9000",  # a flag of the command, not a setting: ignored here
        "FHIR_AIBL_SOURCE_URL": "",  # empty, as env files often have it: unset
        "UNRELATED": "x",
    }
    s = load_settings(config, environ=environ)
    assert s.public_base_url == "https://env.example.org"  # the environment wins over the file
    assert s.jwt.clock_skew_seconds == 30 and s.jwt.max_lifetime_seconds == 600  # nested values merge
    assert s.cors_origins == ["https://ehr.example.org"] and s.source_url is None
    assert s.database_path == tmp_path / "state" / "cds.sqlite3"
    assert load_settings(config, environ=environ, allow_unsigned=True).allow_unsigned is True  # overrides win
    assert load_settings(config, environ=environ, use_environment=False).public_base_url == "https://file.example.org"


def test_a_bad_environment_value_is_a_clear_error():
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"FHIR_AIBL_JWT__CLOCK_SKEW_SECONDS": "soon"})
    assert "clock_skew_seconds" in str(caught.value) and "FHIR_AIBL_" in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        load_settings(environ={"FHIR_AIBL_CORS_ORIGINS": "not json"})
    assert "cors_origins" in str(caught.value)


def test_the_state_directory_is_never_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    default = Settings().database_path
    assert default.is_absolute() and Path.cwd() not in default.parents and default.name == "cds.sqlite3"
    assert "fhir-aibl" in default.parts
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/fhir-aibl")  # systemd's StateDirectory=
    assert Settings().database_path == Path("/var/lib/fhir-aibl/cds.sqlite3")
    assert Settings(state_dir=tmp_path / "s").database_path == tmp_path / "s" / "cds.sqlite3"
    assert Settings(feedback={"database": tmp_path / "x.db"}).database_path == tmp_path / "x.db"
