"""The bone-health view launched as a SMART on FHIR app, end to end.

An EHR in the test suite (tests/smart_ehr.py: an Authlib authorization server implementing
the SMART EHR launch, and a FHIR endpoint in front of SEKMET that answers only to its tokens)
launches `fhir-aibl serve` (uvicorn, a free loopback port): discovery from `iss`, authorization
with launch context and PKCE, the code exchanged, the record read with the token, the page
rendered. In Chromium, and over plain HTTP for the unhappy paths.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from fhir_aibl.cds import create_app, settings_for_tests

from .browser import browser  # noqa: F401  (the fixture)
from .cds.test_fhir_server import as_put_transaction
from .conftest import AS_OF
from .fhir_server import SekmetUnavailable, sekmet_server, unavailable
from .smart_ehr import CLIENT_ID, SmartEhr, serve
from .view_helpers import bundle

PATIENTS = ("V06", "V43")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, assessor):
    """(app base URL, the EHR) with V06 and V43 on the EHR's FHIR server."""
    try:
        with sekmet_server(tmp_path_factory.mktemp("smart-sekmet")) as fhir:
            for name in PATIENTS:
                response = requests.post(fhir, json=as_put_transaction(bundle(name)), headers={"Content-Type": "application/fhir+json"}, timeout=60)
                assert response.status_code in (200, 201), response.text[:300]
            ehr = SmartEhr(fhir, redirect_uris=[])
            with serve(ehr.app) as ehr_base:
                ehr.base = ehr_base
                settings = settings_for_tests(
                    tmp_path_factory.mktemp("smart-app"), as_of=AS_OF, fhir={"allowlist": [ehr.iss], "budget_seconds": 20.0}, request_deadline_seconds=30,
                    # the app's redirect URL follows the request; no CDS hook (no JWT) is called here
                    allow_unsigned=True,
                )
                app = create_app(settings, assessor=assessor)
                with serve(app) as app_base:
                    ehr.clients[CLIENT_ID].redirect_uris.append(f"{app_base}/app/redirect")
                    yield app_base, ehr
    except SekmetUnavailable as exc:
        unavailable(str(exc))


def launch_url(app_base: str, iss: str, launch: str) -> str:
    return f"{app_base}/app/launch?{urlencode({'iss': iss, 'launch': launch})}"


def test_ehr_launch_in_chromium_renders_the_view(stack, browser):  # noqa: F811
    app_base, ehr = stack
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    try:
        page.goto(launch_url(app_base, ehr.iss, ehr.new_launch("v06")))
        assert page.url.startswith(f"{app_base}/app/redirect?")
        assert page.locator("#category").get_attribute("data-category") == "high"
        assert "−1.6 at the lumbar spine" in page.locator("#why").inner_text()
        chart = page.locator("svg#dxa-chart")
        assert chart.locator(".point").count() == 3
        assert chart.locator("rect.band").count() == 4
        assert chart.locator("line.ai-start").count() == 1
    finally:
        page.close()
    # the app used PKCE and read the record with the token, only about the launch patient
    last = ehr.token_requests[-1]
    assert last["client_id"] == CLIENT_ID and len(last["code_verifier"]) >= 43 and last["grant_type"] == "authorization_code"
    assert ehr.fhir_requests and all("v06" in r for r in ehr.fhir_requests)


def test_ehr_launch_over_http_shows_the_gate_values(stack):
    app_base, ehr = stack
    response = requests.get(launch_url(app_base, ehr.iss, ehr.new_launch("v43")), timeout=60)
    assert response.status_code == 200, response.text[:500]
    assert "Creatinine clearance 28 mL/min" in response.text
    assert "Content-Security-Policy" in response.headers and response.headers["Cache-Control"] == "no-store"
    # the authorization request carried the launch, the audience and an S256 challenge
    first = response.history[0]
    query = parse_qs(urlsplit(first.headers["location"]).query)
    assert query["aud"] == [ehr.iss] and query["code_challenge_method"] == ["S256"] and "launch" in query["scope"][0].split()


def _authorized(app_base: str, ehr: SmartEhr, patient: str) -> tuple[str, str]:
    """(code, state) of a launch stopped before the app's redirect endpoint."""
    to_ehr = requests.get(launch_url(app_base, ehr.iss, ehr.new_launch(patient)), allow_redirects=False, timeout=30)
    assert to_ehr.status_code == 302
    back = requests.get(to_ehr.headers["location"], allow_redirects=False, timeout=30)
    assert back.status_code in (302, 307)
    query = parse_qs(urlsplit(back.headers["location"]).query)
    return query["code"][0], query["state"][0]


def test_a_redirect_cannot_be_replayed(stack):
    app_base, ehr = stack
    code, state = _authorized(app_base, ehr, "v06")
    first = requests.get(f"{app_base}/app/redirect", params={"code": code, "state": state}, timeout=60)
    assert first.status_code == 200
    again = requests.get(f"{app_base}/app/redirect", params={"code": code, "state": state}, timeout=60)
    assert again.status_code == 400 and "unknown or has expired" in again.text


def test_a_code_the_ehr_did_not_issue_is_refused(stack):
    app_base, ehr = stack
    _code, state = _authorized(app_base, ehr, "v06")
    response = requests.get(f"{app_base}/app/redirect", params={"code": "forged", "state": state}, timeout=60)
    assert response.status_code == 502 and "refused the authorization code" in response.text
    assert "invalid_grant" in response.text


@pytest.mark.parametrize(
    "params, status, reason",
    [
        ({"launch": "x"}, 400, "needs the parameters iss and launch"),
        ({"iss": "https://elsewhere.example.org/fhir", "launch": "x"}, 400, "not on this service"),
    ],
)
def test_a_launch_that_cannot_start(stack, params, status, reason):
    app_base, _ehr = stack
    response = requests.get(f"{app_base}/app/launch", params=params, allow_redirects=False, timeout=30)
    assert response.status_code == status and reason in response.text


def test_a_denied_authorization_or_an_unknown_state(stack):
    app_base, _ehr = stack
    denied = requests.get(f"{app_base}/app/redirect", params={"error": "access_denied", "state": "s"}, timeout=30)
    assert denied.status_code == 400 and "access_denied" in denied.text
    unknown = requests.get(f"{app_base}/app/redirect", params={"code": "c", "state": "not-issued"}, timeout=30)
    assert unknown.status_code == 400 and "unknown or has expired" in unknown.text


def test_the_ehr_fhir_server_answers_only_with_the_patients_token(stack):
    _app_base, ehr = stack
    assert requests.get(f"{ehr.iss}/Patient/v06", timeout=30).status_code == 401


def test_the_app_shows_what_the_offline_page_shows(stack, assessor, tmp_path):
    """The page launched from the EHR says to the clinician what `assess --format html` says (same record, same date)."""
    from fhir_aibl import cli

    from .view_helpers import FIXTURES, texts

    app_base, ehr = stack
    online = requests.get(launch_url(app_base, ehr.iss, ehr.new_launch("v43")), timeout=60)
    assert online.status_code == 200
    assert cli.main(["assess", str(FIXTURES / "V43.json"), "--as-of", AS_OF.isoformat(), "--format", "html", "--out", str(tmp_path)]) == 0
    offline = (tmp_path / "v43.html").read_text()
    assert texts(online.text)[0] == texts(offline)[0]
