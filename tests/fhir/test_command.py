"""`fhir-aibl run` through add_arguments/run, against the in-memory fake server."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import responses
from joserfc.jwk import RSAKey

from fhir_aibl.assessment import CONTRACT_FIELDS
from fhir_aibl.fhir import command

from .conftest import run_command
from .fakes import BASE, FakeFhir, mock, outcome, record

CONTRACT = list(CONTRACT_FIELDS)  # the eight of the specification, then dxa_dates


def run_fake(fake: FakeFhir, *argv: str, environ: dict | None = None):
    with mock() as rsps:
        fake.install(rsps)
        return run_command("--fhir-base", BASE, "--as-of", "2026-06-01", *argv, environ=environ)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_secrets_cannot_be_given_as_arguments(capsys):
    for secret in ("--token", "--client-secret", "--password"):
        with pytest.raises(SystemExit):
            parse("--fhir-base", BASE, "--all", secret, "s3cret")
    with pytest.raises(SystemExit):
        parse("--fhir-base", BASE, "--all", "--patient", "p1")  # one or the other
    with pytest.raises(SystemExit):
        parse("--all")  # the server is required
    with pytest.raises(SystemExit):
        parse("--fhir-base", BASE, "--all", "--profile", "nope")
    with pytest.raises(SystemExit):
        parse("--fhir-base", BASE, "--all", "--page-size", "0")


def test_defaults_are_the_documented_ones():
    args = parse("--fhir-base", BASE, "--all")
    assert (
        args.format,
        args.profile,
        args.timeout,
        args.connect_timeout,
        args.attempts,
        args.backoff,
        args.retry_after_max,
        args.max_pages,
        args.progress,
        args.write_back,
        args.debug_phi,
    ) == ("table", "generic", 60.0, 10.0, 5, 0.5, 120.0, 50, "auto", False, False)
    assert command._settings(parse("--fhir-base", BASE, "--all", "--backoff", "0.05")).retry.backoff_base == 0.05


def test_a_population_run_prints_the_assess_contract_and_a_summary():
    fake = FakeFhir(resources=record("p1") + record("p2"))
    result = run_fake(fake, "--all", "--format", "json")
    assert result.code == 0, result.stderr
    data = result.json()
    assert [d["patient"] for d in data] == ["Patient/p1", "Patient/p2"]
    assert all(list(d) == CONTRACT for d in data)
    assert data[0]["ai_status"] == "active"
    assert "patients found 2, assessed 2, written 0, unchanged 0, failed 0" in result.stderr
    assert "round trips: pull 1.00 per patient (2 requests, 2 patients); setup 3" in result.stderr


def test_explain_adds_the_findings():
    result = run_fake(FakeFhir(resources=record("p1")), "--patient", "p1", "--format", "json", "--explain")
    (item,) = result.json()
    assert item["as_of"] == "2026-06-01" and item["findings"] and item["ruleset"]["name"].startswith("aibl-")


def test_the_table_format():
    result = run_fake(FakeFhir(resources=record("p1")), "--patient", "p1")
    assert result.code == 0
    assert result.stdout.splitlines()[0].split()[:3] == ["patient", "AI", "category"]
    assert "Patient/p1" in result.stdout


def test_one_patient_failing_leaves_the_others_and_exits_1():
    result = run_fake(FakeFhir(resources=record("p1")), "--patient", "p1", "ghost", "--format", "json")
    assert result.code == 1
    assert [d["patient"] for d in result.json()] == ["Patient/p1"]
    assert "failed: Patient/ghost: pull: batch of searches" not in result.stderr
    # no such Patient and nothing else about it: named, nothing to assess
    assert "failed: Patient/ghost: assess: nothing to assess" in result.stderr
    assert "warning: Patient/ghost: Patient/ghost: the server has no such Patient resource" in result.stderr
    assert "patients found 2, assessed 1, written 0, unchanged 0, failed 1" in result.stderr


@pytest.mark.parametrize("how", ["absent", "invalid"])
def test_a_patient_without_a_usable_patient_resource_is_assessed_with_age_unknown_and_named(how):
    """Issue 10 item 2 on the connector path: the Patient is absent on the server, or fails
    validation; the patient's other resources are still assessed (age unknown, never lower than
    with the Patient, never low), the patient is named among the summary's problems, exit 1."""
    with_patient = run_fake(FakeFhir(resources=record("p1")), "--patient", "p1", "--format", "json").json()[0]
    resources = record("p1")
    if how == "absent":
        resources = resources[1:]
    else:
        resources[0] = {**resources[0], "gender": 123}
    result = run_fake(FakeFhir(resources=resources), "--patient", "p1", "--format", "json")
    assert result.code == 1
    (item,) = result.json()
    rank = {"low": 0, "indeterminate": 1, "moderate": 2, "high": 3}
    assert rank[item["category"]] >= max(rank[with_patient["category"]], 1)
    assert "age-unknown" in item["flags"] and "complete-record" in item["recommendations"]
    assert "error: Patient/p1: no usable Patient resource" in result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("problems (assessed, record incomplete): Patient/p1 ("))
    assert "no usable Patient resource" in line
    if how == "invalid":  # the invalid Patient is named too, as `assess` names it
        assert "error: Patient/p1: Patient/p1: fails FHIR R4 validation, left out: gender" in result.stderr
    assert "failed 0" in result.stderr


def test_write_back_sends_one_transaction_per_patient():
    fake = FakeFhir(resources=record("p1") + record("p2"))
    result = run_fake(fake, "--all", "--write-back")
    assert result.code == 0, result.stderr
    assert len(fake.transactions) == 2
    assert "written 2, unchanged 0, failed 0" in result.stderr
    assert "write-back 1.00 per patient written (2 requests" in result.stderr


def test_nothing_can_run_exits_2():
    bad_base = run_command("--fhir-base", "not-a-url", "--all")
    assert bad_base.code == 2 and bad_base.stderr.startswith("fatal: not an http(s) FHIR base URL")
    epic = run_fake(FakeFhir(resources=record("p1")), "--all", "--profile", "epic")
    assert epic.code == 2 and "cannot search medications without a patient" in epic.stderr
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/metadata", status=401, json=outcome("bad token", "login"))
        refused = run_command("--fhir-base", BASE, "--all", environ={"FHIR_AIBL_TOKEN": "t"})
    assert refused.code == 2 and "bad token" in refused.stderr


def test_a_bearer_token_from_the_environment_or_a_file_is_sent_and_never_printed(tmp_path):
    fake = FakeFhir(resources=record("p1"))
    result = run_fake(fake, "--patient", "p1", environ={"FHIR_AIBL_TOKEN": "env-s3cret"})
    assert {h["Authorization"] for h in fake.headers} == {"Bearer env-s3cret"}
    assert "env-s3cret" not in result.stdout + result.stderr
    token = tmp_path / "token"
    token.write_text("file-s3cret\n")
    fake = FakeFhir(resources=record("p1"))
    result = run_fake(fake, "--patient", "p1", "--token-file", str(token), "--debug-phi")
    assert {h["Authorization"] for h in fake.headers} == {"Bearer file-s3cret"}
    assert "file-s3cret" not in result.stdout + result.stderr


def test_smart_backend_services_from_the_command_line(tmp_path):
    key = tmp_path / "client.pem"
    key.write_bytes(RSAKey.generate_key(2048).as_pem(private=True))
    fake = FakeFhir(resources=record("p1"))
    with mock() as rsps:
        fake.install(rsps)
        rsps.post(
            "https://auth.test/token", json={"access_token": "smart-token", "token_type": "bearer", "expires_in": 300}
        )
        result = run_command(
            "--fhir-base",
            BASE,
            "--patient",
            "p1",
            "--as-of",
            "2026-06-01",
            "--smart-client-id",
            "cds",
            "--smart-key",
            str(key),
            "--smart-token-url",
            "https://auth.test/token",
        )
    assert result.code == 0, result.stderr
    assert {h["Authorization"] for h in fake.headers} == {"Bearer smart-token"}
    missing = run_command(
        "--fhir-base", BASE, "--patient", "p1", "--smart-client-id", "cds", "--smart-key", str(tmp_path / "missing.pem")
    )
    assert missing.code == 2 and "cannot read the private key" in missing.stderr


def test_the_progress_bar_goes_to_stderr_on_population_runs():
    fake = FakeFhir(resources=record("p1") + record("p2"))
    result = run_fake(fake, "--all", "--progress", "always", "--format", "json")
    assert "\r[" in result.stderr and "2/2 patients" in result.stderr
    assert "\r" not in result.stdout
    quiet = run_fake(FakeFhir(resources=record("p1")), "--all", "--format", "json")
    assert "\r[" not in quiet.stderr  # auto: stderr is not a terminal here


def test_request_urls_are_logged_only_with_debug_phi():
    plain = run_fake(FakeFhir(resources=record("p1")), "--patient", "p1")
    assert "debug:" not in plain.stderr
    debug = run_fake(FakeFhir(resources=record("p1")), "--patient", "p1", "--debug-phi")
    assert f"debug: POST {BASE} -> 200" in debug.stderr


def test_run_uses_the_real_streams_by_default(monkeypatch):
    fake = FakeFhir(resources=record("p1"))
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.delenv("FHIR_AIBL_TOKEN", raising=False)
    with mock() as rsps:
        fake.install(rsps)
        code = command.run(parse("--fhir-base", BASE, "--patient", "p1", "--format", "json"))
    assert code == 0 and json.loads(out.getvalue())[0]["patient"] == "Patient/p1"
    assert "patients found 1" in err.getvalue()


def test_credentials_refused_mid_run_stop_the_run_but_keep_what_was_done():
    fake = FakeFhir(resources=record("p1") + record("p2") + record("p3"))
    calls = {"n": 0}
    original = fake.handle

    def handle(method, path, params, body):
        if method == "POST":
            calls["n"] += 1
            if calls["n"] >= 2:
                return 401, outcome("token revoked", "login")
        return original(method, path, params, body)

    fake.handle = handle
    result = run_fake(fake, "--patient", "p1", "p2", "p3", "--format", "json", environ={"FHIR_AIBL_TOKEN": "t"})
    assert result.code == 2  # the run itself failed, though what was done is reported
    assert "fatal: the run stopped before every patient was attempted: the server refused the credentials" in (
        result.stderr
    )
    assert [d["patient"] for d in result.json()] == ["Patient/p1"]
    assert "failed: Patient/p2: credentials refused: " in result.stderr and "token revoked" in result.stderr
    assert "failed: Patient/p3: not attempted: the server refused the credentials" in result.stderr
    assert "patients found 3, assessed 1, written 0, unchanged 0, failed 2" in result.stderr


def test_a_server_that_goes_away_stops_the_run_after_a_few_patients():
    fake = FakeFhir(resources=record("p1"))
    original = fake.handle
    fake.handle = lambda method, path, params, body: (
        (503, outcome("down for maintenance", "transient"))
        if method == "POST"
        else original(method, path, params, body)
    )
    pids = [f"p{i}" for i in range(1, 8)]
    result = run_fake(fake, "--patient", *pids, "--attempts", "1")
    assert result.code == 2
    assert result.stderr.count("down for maintenance") == 3
    assert result.stderr.count("not attempted: the server was unreachable or unavailable for 3 patients in a row") == 4
    assert "patients found 7, assessed 0, written 0, unchanged 0, failed 7" in result.stderr
