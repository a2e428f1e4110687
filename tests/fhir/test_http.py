"""The HTTP seam's contract, with `responses`: retries, Retry-After, timeouts, 401 and
re-authentication, OperationOutcome errors, origin checks, what is logged."""

from __future__ import annotations

import email.utils
import logging
import time

import pytest
import requests
import responses

from fhir_aibl.fhir.auth import BearerToken
from fhir_aibl.fhir.errors import (
    AuthError,
    BadRequest,
    ConfigError,
    Conflict,
    ForeignLink,
    NotFound,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unavailable,
)
from fhir_aibl.fhir.http import Http, parse_retry_after
from fhir_aibl.fhir.settings import ClientSettings, RetrySettings

from .fakes import BASE, outcome

URL = f"{BASE}/Patient/p1"


def make_http(**kwargs) -> tuple[Http, list[float]]:
    slept: list[float] = []
    settings = kwargs.pop("settings", ClientSettings())
    http = Http(BASE, settings=settings, sleep=slept.append, jitter=lambda: 1.0, **kwargs)
    return http, slept


def test_a_get_answers_json_with_fhir_headers_and_a_timeout():
    http, _ = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(URL, json={"resourceType": "Patient", "id": "p1"})
        assert http.json("GET", "Patient/p1") == {"resourceType": "Patient", "id": "p1"}
        sent = rsps.calls[0].request
        assert sent.headers["Accept"] == "application/fhir+json"
        assert sent.headers["User-Agent"].startswith("fhir-aibl/")
        assert "Authorization" not in sent.headers
    assert http.stats.requests == 1


def test_every_request_carries_the_configured_timeouts(monkeypatch):
    seen = {}

    class Recording(requests.Session):
        def request(self, method, url, **kwargs):
            seen.update(kwargs)
            resp = requests.Response()
            resp.status_code, resp._content = 200, b"{}"
            return resp

    http = Http(BASE, settings=ClientSettings(connect_timeout=3, read_timeout=7), session=Recording())
    http.send("GET", "metadata")
    assert seen["timeout"] == (3, 7)
    assert seen["allow_redirects"] is False


@pytest.mark.parametrize("header", ["7", "HTTP-DATE"])
def test_429_waits_for_retry_after_in_seconds_or_as_a_date_then_succeeds(header):
    if header == "HTTP-DATE":
        header = email.utils.formatdate(time.time() + 30, usegmt=True)
    http, slept = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=429, headers={"Retry-After": header}, json=outcome("slow down", "throttled"))
        rsps.get(URL, json={"resourceType": "Patient", "id": "p1"})
        assert http.json("GET", "Patient/p1")["id"] == "p1"
    assert len(slept) == 1
    assert slept[0] == 7 if header == "7" else 25 <= slept[0] <= 30
    assert http.stats.requests == 2 and http.stats.retries == 1


def test_a_retry_after_beyond_the_ceiling_fails_at_once():
    http, slept = make_http(settings=ClientSettings(retry=RetrySettings(retry_after_ceiling=60)))
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=429, headers={"Retry-After": "3600"}, json=outcome("quota exhausted", "throttled"))
        with pytest.raises(RateLimited) as info:
            http.send("GET", "Patient/p1")
    assert slept == []
    assert info.value.retry_after == 3600
    assert "quota exhausted" in str(info.value) and "beyond the 60 s ceiling" in str(info.value)
    assert info.value.code == "fhir-rate-limited"


def test_503_then_success_backs_off_exponentially_with_jitter():
    http, slept = make_http(settings=ClientSettings(retry=RetrySettings(backoff_base=0.5, backoff_max=30)))
    with responses.RequestsMock() as rsps:
        for status in (503, 502, 504):
            rsps.get(URL, status=status)
        rsps.get(URL, json={"resourceType": "Patient", "id": "p1"})
        assert http.json("GET", "Patient/p1")["id"] == "p1"
    assert slept == [0.5, 1.0, 2.0]  # jitter pinned to its maximum here


def test_jitter_spreads_the_waits():
    http = Http(BASE, jitter=lambda: 0.25)
    assert http.backoff(1) == 0.125 and http.backoff(4) == 1.0
    assert Http(BASE).backoff(30) <= RetrySettings().backoff_max


def test_retries_stop_after_the_configured_attempts_with_the_servers_diagnostics():
    http, slept = make_http(settings=ClientSettings(retry=RetrySettings(max_attempts=3)))
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=503, json=outcome("maintenance window", "transient"))
        with pytest.raises(Unavailable) as info:
            http.send("GET", "Patient/p1")
    assert len(slept) == 2 and http.stats.requests == 3
    assert "maintenance window" in str(info.value) and "after 3 attempts" in str(info.value)
    assert info.value.status == 503 and info.value.outcome["issue"][0]["code"] == "transient"


def test_a_post_that_creates_is_never_retried():
    http, slept = make_http()
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, status=503)
        with pytest.raises(Unavailable):
            http.send("POST", "", body={"resourceType": "Bundle", "type": "transaction"})
        assert len(rsps.calls) == 1
    assert slept == []


def test_a_read_only_post_is_retried_when_the_caller_says_it_is_idempotent():
    http, slept = make_http()
    with responses.RequestsMock() as rsps:
        rsps.post(BASE, status=429, headers={"Retry-After": "1"})
        rsps.post(BASE, json={"resourceType": "Bundle", "type": "batch-response", "entry": []})
        http.send("POST", "", body={"resourceType": "Bundle", "type": "batch"}, idempotent=True)
    assert slept == [1.0]


def test_timeouts_are_retried_for_reads_then_reported():
    http, slept = make_http(settings=ClientSettings(read_timeout=2, retry=RetrySettings(max_attempts=2)))
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=requests.exceptions.ReadTimeout("read timed out"))
        rsps.get(URL, json={"resourceType": "Patient", "id": "p1"})
        assert http.json("GET", "Patient/p1")["id"] == "p1"
    assert len(slept) == 1
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=requests.exceptions.ConnectTimeout("connect timed out"))
        with pytest.raises(RequestTimeout) as info:
            http.send("GET", "Patient/p1")
    assert "no answer within 10/2 s" in str(info.value)
    assert info.value.code == "fhir-timeout"


def test_connection_errors_are_retried_for_reads_only():
    http, slept = make_http(settings=ClientSettings(retry=RetrySettings(max_attempts=2)))
    with responses.RequestsMock() as rsps:
        rsps.get(URL, body=requests.exceptions.ConnectionError("reset"))
        rsps.get(URL, json={})
        http.send("GET", "Patient/p1")
        rsps.post(BASE, body=requests.exceptions.ConnectionError("reset"))
        with pytest.raises(TransportError):
            http.send("POST", "", body={"resourceType": "Bundle"})
        assert [c.request.method for c in rsps.calls] == ["GET", "GET", "POST"]


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, BadRequest, "fhir-bad-request"),
        (404, NotFound, "fhir-not-found"),
        (410, NotFound, "fhir-not-found"),
        (412, Conflict, "fhir-conflict"),
        (422, BadRequest, "fhir-bad-request"),
        (500, Unavailable, "fhir-unavailable"),
    ],
)
def test_operation_outcomes_become_typed_errors_with_the_servers_diagnostics(status, error, code):
    http, slept = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=status, json=outcome(f"reason {status}", "invalid"))
        with pytest.raises(error) as info:
            http.send("GET", "Patient/p1", what="GET Patient read")
    assert info.value.code == code and info.value.status == status
    assert info.value.diagnostics == f"error: reason {status}"
    assert str(info.value).startswith(f"GET Patient read: HTTP {status}")
    oo = info.value.operation_outcome()
    assert oo["issue"][0]["details"]["coding"][0]["code"] == code
    assert slept == []  # 500 is not retried: the request itself is likely the problem


def test_an_error_without_an_operation_outcome_still_says_what_happened():
    http, _ = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=418, body="<html>teapot</html>")
        with pytest.raises(ServerError) as info:
            http.send("GET", "Patient/p1", what="GET Patient read")
    assert "HTTP 418" in str(info.value) and info.value.outcome is None


def test_a_redirect_is_not_followed():
    http, _ = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=302, headers={"Location": "https://elsewhere.test/fhir/Patient/p1"})
        with pytest.raises(ServerError, match="redirect not followed"):
            http.send("GET", "Patient/p1")
        assert len(rsps.calls) == 1


def test_401_re_reads_a_rotated_token_file_once(tmp_path):
    token = tmp_path / "token"
    token.write_text("old-token\n")
    http, _ = make_http(auth=BearerToken(path=token))
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=401, json=outcome("token expired", "login"))
        rsps.get(URL, json={"resourceType": "Patient", "id": "p1"})
        token.write_text("new-token\n")
        http.send("GET", "Patient/p1")
        assert [c.request.headers["Authorization"] for c in rsps.calls] == ["Bearer old-token", "Bearer new-token"]
    assert http.stats.reauthentications == 1


def test_401_with_credentials_that_cannot_be_renewed_is_an_auth_error():
    http, _ = make_http(auth=BearerToken("fixed"))
    with responses.RequestsMock() as rsps:
        rsps.get(URL, status=401, json=outcome("invalid token", "login"))
        with pytest.raises(AuthError, match="invalid token"):
            http.send("GET", "Patient/p1")
        assert len(rsps.calls) == 1


def test_links_to_another_origin_are_refused():
    http, _ = make_http(auth=BearerToken("secret"))
    for url in (
        "https://evil.test/r4/Patient?page=2",
        "http://fhir.test/r4/Patient",
        "https://fhir.test:8443/r4/Patient",
    ):
        with pytest.raises(ForeignLink):
            http.send("GET", url)
    assert http.stats.requests == 0
    http.check_origin("https://FHIR.test:443/r4/Patient?_page=2")  # same origin, spelled otherwise


def test_a_base_url_must_be_http():
    with pytest.raises(ConfigError):
        Http("ftp://fhir.test/r4")
    with pytest.raises(ConfigError):
        Http("fhir.test/r4")


def test_parse_retry_after():
    assert parse_retry_after("120") == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None and parse_retry_after(" ") is None


def test_logs_name_no_patient_unless_asked(caplog):
    http, _ = make_http()
    with caplog.at_level(logging.DEBUG, logger="fhir_aibl.fhir"), responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Observation", json={"resourceType": "Bundle", "type": "searchset"})
        http.send("GET", "Observation?patient=secret-patient-42", what="GET Observation search (patient)")
    assert caplog.records and all("secret-patient-42" not in r.getMessage() for r in caplog.records)
    caplog.clear()
    debug, _ = make_http(settings=ClientSettings(debug_phi=True))
    with caplog.at_level(logging.DEBUG, logger="fhir_aibl.fhir"), responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Observation", json={"resourceType": "Bundle", "type": "searchset"})
        debug.send("GET", "Observation?patient=secret-patient-42", what="GET Observation search (patient)")
    assert any("secret-patient-42" in r.getMessage() for r in caplog.records)


def test_errors_name_no_patient_unless_asked():
    http, _ = make_http()
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/Observation", status=400, json=outcome("bad search"))
        with pytest.raises(BadRequest) as info:
            http.send("GET", "Observation?patient=secret-patient-42", what="GET Observation search (patient)")
    assert "secret-patient-42" not in str(info.value)


def test_environment_is_read_once_per_client_and_still_applies(monkeypatch, tmp_path):
    """Proxies, the CA bundle and ~/.netrc from the environment are read when the client is made
    (not on every request, as requests does) and sent with every request; a given session is left as it is."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "other.example")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "ca.pem"))
    netrc = tmp_path / "netrc"
    netrc.write_text("machine fhir.test login user password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    http, _ = make_http()
    assert http.session.trust_env is False
    sent: list[dict] = []

    def capture(*args, **kwargs):
        sent.append(kwargs)
        raise requests.ConnectionError("captured")

    monkeypatch.setattr(http.session, "request", capture)
    with pytest.raises(TransportError):
        http.send("GET", URL, idempotent=False)
    (kwargs,) = sent
    expected = requests.Session().merge_environment_settings(URL, {}, None, None, None)
    assert kwargs["proxies"] == expected["proxies"] and kwargs["proxies"]["https"] == "http://proxy.example:3128"
    assert kwargs["verify"] == str(tmp_path / "ca.pem") == expected["verify"]
    assert kwargs["auth"] == requests.utils.get_netrc_auth(URL) == ("user", "secret")
    given = requests.Session()
    assert make_http(session=given)[0].session.trust_env is True  # the caller's session: untouched
