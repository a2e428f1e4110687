"""JWT verification: the real CDS Hooks sandbox token, and every way a token is refused (401 with a reason)."""

from __future__ import annotations

import base64
import json
import logging
import time

import pytest
import responses
from joserfc import jwt
from joserfc.jwk import ECKey, OctKey, RSAKey

from fhir_aibl.cds.auth import JwtVerifier
from fhir_aibl.cds.errors import UnauthorizedError
from fhir_aibl.cds.prefetch import KEY_TYPES
from fhir_aibl.cds.samples import patient_view_request
from fhir_aibl.cds.settings import JwtSettings, SettingsError

from .conftest import BASE, EHR_ISS, EHR_JKU, PV, Signer, bundle, cds_data

AUD = f"{BASE}/cds-services/{PV}"


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def reason(response) -> str:
    return response.json()["issue"][0]["details"]["text"]


@pytest.fixture
def secured(make_app, signer, jwks_server):
    return make_app(allow_unsigned=False, public_base_url=BASE, jwt=signer.issuer_settings())


@pytest.fixture
def request_v06():
    return patient_view_request(bundle("V06"))


# --------------------------------------------------------------------------- the real sandbox token


def test_the_sandbox_request_with_its_real_token_is_accepted(make_app):
    """The exact request and JWT the CDS Hooks sandbox sent, verified with the sandbox's public key.

    The clock is frozen at the token's iat; the service's URL and id are those the token's
    aud names. The sandbox's own prefetch keys (patient, dxa, meds) are used; the keys it
    did not fill are queried from its fhirServer, which is allowlisted and answered here by
    a mock (empty searches).
    """
    captured = json.loads(cds_data("sandbox-captured/authorization-jwt-from-sandbox.json").read_text())
    body = json.loads(cds_data("sandbox-captured/patient-view-request-from-sandbox.json").read_text())
    jwks = json.loads(cds_data("sandbox-public-jwks/jwks.json").read_text())
    aud = captured["payload"]["aud"]
    base, _, service_id = aud.rpartition("/cds-services/")
    issuer = {"iss": captured["payload"]["iss"], "jku": [captured["header"]["jku"]]}
    harness = make_app(
        allow_unsigned=False,
        public_base_url=base,
        patient_view_id=service_id,
        as_of=None,  # today, from the frozen clock
        jwt={"issuers": [issuer]},
        fhir={"allowlist": [body["fhirServer"]]},
    )
    harness.clock[0] = captured["payload"]["iat"]
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(captured["header"]["jku"], json=jwks)
        empty = {"resourceType": "Bundle", "type": "searchset", "total": 0}
        for rtype in sorted(set(KEY_TYPES.values()) - {"Patient"}):
            mock.get(f"{body['fhirServer']}/{rtype}", json=empty)
        headers = {"Authorization": f"Bearer {captured['compact_jws']}"}
        response = harness.hook(service_id, body, headers)
        assert response.status_code == 200, response.text
        # The sandbox patient takes anastrozole; her only DXA is a forearm "T-score" in g/cm2
        # (not used, and said so on the card): indeterminate, DXA now.
        cards = response.json()["cards"]
        assert cards and cards[0]["indicator"] == "info"
        assert "not yet graded" in cards[0]["summary"]
        assert "Order a DXA scan" in cards[0]["detail"]
        assert "A DXA result on record could not be used" in cards[0]["detail"]
        assert f"Patient/{body['context']['patientId']}" in json.dumps(cards[0]["suggestions"])
        # The same token again is a replay.
        again = harness.hook(service_id, body, headers)
        assert again.status_code == 401 and "replay" in reason(again)


def test_the_sandbox_jwks_pinned_in_the_configuration_verifies_whatever_jku_it_announces(make_app, tmp_path):
    """The sandbox always sends a `jku`; with its published JWKS pinned as a file (and no `jku`
    URL configured), its captured token verifies and the `jku` is never fetched."""
    captured = json.loads(cds_data("sandbox-captured/authorization-jwt-from-sandbox.json").read_text())
    body = json.loads(cds_data("sandbox-captured/patient-view-request-from-sandbox.json").read_text())
    pinned = tmp_path / "sandbox-jwks.json"
    pinned.write_text(cds_data("sandbox-public-jwks/jwks.json").read_text())
    assert captured["header"]["jku"]  # the token does announce one
    base, _, service_id = captured["payload"]["aud"].rpartition("/cds-services/")
    harness = make_app(
        allow_unsigned=False,
        public_base_url=base,
        patient_view_id=service_id,
        as_of=None,
        jwt={"issuers": [{"iss": captured["payload"]["iss"], "jwks_file": str(pinned)}]},
        fhir={"allowlist": [body["fhirServer"]]},
    )
    harness.clock[0] = captured["payload"]["iat"]
    headers = {"Authorization": f"Bearer {captured['compact_jws']}"}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        empty = {"resourceType": "Bundle", "type": "searchset", "total": 0}
        for rtype in ("Observation", "Condition", "MedicationStatement", "MedicationRequest", "MedicationAdministration", "FamilyMemberHistory"):
            mock.get(f"{body['fhirServer']}/{rtype}", json=empty)
        response = harness.hook(service_id, body, headers)
        assert response.status_code == 200, response.text
        assert all(call.request.url.startswith(body["fhirServer"]) for call in mock.calls)  # the jku was not fetched
        assert harness.hook(service_id, body, headers).status_code == 401  # replay protection still applies


def test_pinned_keys_do_not_verify_a_token_signed_by_the_key_its_jku_names(make_app, signer, tmp_path, request_v06):
    """A token announcing an attacker's jku, signed with the attacker's key, does not verify
    against the pinned keys, and the attacker's URL is not fetched."""
    path = tmp_path / "ehr-jwks.json"
    path.write_text(json.dumps(signer.jwks))
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt={"issuers": [{"iss": signer.iss, "jwks_file": str(path)}]})
    attacker = Signer(ECKey.generate_key("P-384", parameters={"kid": signer.key.kid}), jku="https://evil.example.org/jwks.json")
    with responses.RequestsMock():  # any HTTP call would fail the test
        response = harness.hook(PV, request_v06, attacker.bearer(AUD))
        assert response.status_code == 401 and "signature" in reason(response)
        assert harness.hook(PV, request_v06, signer.bearer(AUD, header={"jku": "https://evil.example.org/jwks.json"})).status_code == 200


def test_the_sandbox_token_is_refused_after_it_expires(make_app):
    captured = json.loads(cds_data("sandbox-captured/authorization-jwt-from-sandbox.json").read_text())
    body = json.loads(cds_data("sandbox-captured/patient-view-request-from-sandbox.json").read_text())
    jwks = json.loads(cds_data("sandbox-public-jwks/jwks.json").read_text())
    base, _, service_id = captured["payload"]["aud"].rpartition("/cds-services/")
    harness = make_app(
        allow_unsigned=False,
        public_base_url=base,
        patient_view_id=service_id,
        jwt={"issuers": [{"iss": captured["payload"]["iss"], "jku": [captured["header"]["jku"]]}]},
    )
    harness.clock[0] = captured["payload"]["exp"] + 3600
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(captured["header"]["jku"], json=jwks)
        response = harness.hook(service_id, body, {"Authorization": f"Bearer {captured['compact_jws']}"})
    assert response.status_code == 401 and "expired" in reason(response)


# --------------------------------------------------------------------------- accepted


def test_a_good_token_is_accepted_and_the_key_set_is_cached(secured, signer, jwks_server, request_v06):
    for _ in range(3):
        response = secured.hook(PV, request_v06, signer.bearer(AUD))
        assert response.status_code == 200, response.text
    assert len(jwks_server.calls) == 1  # fetched once, then cached


def test_aud_as_a_list_and_rsa_and_pss_keys(make_app, request_v06):
    rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig"})
    signer = Signer(rsa)
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt=signer.issuer_settings())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(EHR_JKU, json=signer.jwks)
        for alg in ("RS384", "RS256", "PS384"):
            headers = signer.bearer([AUD, "https://other.example.org"], header={"alg": alg})  # type: ignore[arg-type]
            response = harness.hook(PV, request_v06, headers)
            assert response.status_code == 200, (alg, response.text)


def test_the_feedback_endpoint_accepts_its_own_url_as_aud(secured, signer, request_v06):
    card = secured.hook(PV, request_v06, signer.bearer(AUD)).json()["cards"][0]
    body = {"feedback": [{"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-06-01T10:00:00Z"}]}
    response = secured.feedback(PV, body, signer.bearer(f"{AUD}/feedback"))
    assert response.status_code == 200, response.text


def test_discovery_needs_no_token(secured):
    assert secured.client.get("/cds-services").status_code == 200


# --------------------------------------------------------------------------- refused


def _none_token() -> str:
    now = int(time.time())
    claims = {"iss": EHR_ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": "n1"}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


def _hs256_token() -> str:
    # HMAC signed with a secret an attacker chose: must never verify, whatever key it names.
    key = OctKey.generate_key(256)
    now = int(time.time())
    claims = {"iss": EHR_ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": "h1"}
    return jwt.encode({"alg": "HS256", "kid": "ehr-key-1", "jku": EHR_JKU}, claims, key, algorithms=["HS256"])


REFUSALS = [
    ("no header", lambda s: {}, "no Authorization header"),
    ("basic auth", lambda s: {"Authorization": "Basic dXNlcjpwYXNz"}, "not a Bearer token"),
    ("not a JWS", lambda s: {"Authorization": "Bearer abc.def"}, "not a compact JWS"),
    ("garbage header", lambda s: {"Authorization": "Bearer !!!.e30.sig"}, "malformed token"),
    ("alg none", lambda s: {"Authorization": f"Bearer {_none_token()}"}, "algorithm 'none' is not accepted"),
    ("alg HS256", lambda s: {"Authorization": f"Bearer {_hs256_token()}"}, "algorithm 'HS256' is not accepted"),
    ("unknown issuer", lambda s: s.bearer(AUD, iss="https://evil.example.org"), "issuer (iss) is not trusted"),
    ("jku off the allowlist", lambda s: s.bearer(AUD, header={"jku": "https://evil.example.org/jwks.json"}), "jku is not on this issuer's allowlist"),
    ("unknown kid", lambda s: s.bearer(AUD, header={"kid": "other-key"}), "no key in the issuer's key set has the token's kid"),
    ("signed by another key", lambda s: s.bearer(AUD, key=ECKey.generate_key("P-384", parameters={"kid": "ehr-key-1"})), "signature does not verify"),
    ("alg differs from the key's", lambda s: s.bearer(AUD, header={"alg": "ES256"}, key=ECKey.generate_key("P-256", parameters={"kid": "ehr-key-1"})), "key's alg does not match"),
    ("wrong aud", lambda s: s.bearer(f"{BASE}/cds-services/other-service"), "audience (aud) is not this service's endpoint URL"),
    ("no aud", lambda s: s.bearer(None), "audience (aud)"),  # type: ignore[arg-type]
    ("expired", lambda s: s.bearer(AUD, now=time.time() - 3600), "expired"),
    ("issued in the future", lambda s: s.bearer(AUD, iat=int(time.time()) + 600), "issued in the future"),
    ("no exp", lambda s: s.bearer(AUD, exp=None), "no exp"),
    ("no iat", lambda s: s.bearer(AUD, iat=None), "no iat"),
    ("exp not a number", lambda s: s.bearer(AUD, exp="tomorrow"), "exp is not a number"),
    ("exp too far ahead", lambda s: s.bearer(AUD, exp=int(time.time()) + 86400), "max_lifetime_seconds"),
    ("no jti", lambda s: s.bearer(AUD, jti=None), "no jti"),
]


@pytest.mark.parametrize("name, headers, why", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refused_with_a_reason(secured, signer, request_v06, caplog, name, headers, why):
    with caplog.at_level(logging.WARNING, logger="fhir_aibl.cds"):
        response = secured.hook(PV, request_v06, headers(signer))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert why in reason(response)
    assert response.json()["issue"][0]["details"]["coding"][0]["code"] == "cds-unauthorized"
    # The reason is logged, and nothing about the patient is.
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert why in logged
    assert "v06" not in logged


def test_a_replayed_jti_is_refused(secured, signer, request_v06):
    token = signer.token(AUD)
    assert secured.hook(PV, request_v06, {"Authorization": f"Bearer {token}"}).status_code == 200
    again = secured.hook(PV, request_v06, {"Authorization": f"Bearer {token}"})
    assert again.status_code == 401 and "replay" in reason(again)


def test_the_token_is_checked_before_the_body_is_read(secured, signer):
    response = secured.client.post(f"/cds-services/{PV}", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401  # not 400: an unauthenticated caller gets nothing parsed


def test_an_unreachable_jwks_is_a_401(make_app, signer, request_v06):
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt=signer.issuer_settings())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(EHR_JKU, status=500)
        response = harness.hook(PV, request_v06, signer.bearer(AUD))
    assert response.status_code == 401 and "JWKS could not be fetched (HTTP 500)" in reason(response)


def test_a_jwks_redirect_is_not_followed(make_app, signer, request_v06):
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt=signer.issuer_settings())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(EHR_JKU, status=302, headers={"Location": "https://evil.example.org/jwks.json"})
        mock.get("https://evil.example.org/jwks.json", json=signer.jwks)
        response = harness.hook(PV, request_v06, signer.bearer(AUD))
        assert response.status_code == 401
        assert all("evil" not in call.request.url for call in mock.calls)


def test_symmetric_keys_in_a_jwks_are_never_used():
    settings = JwtSettings(issuers=[{"iss": EHR_ISS, "jku": [EHR_JKU]}])
    verifier = JwtVerifier(settings)
    with responses.RequestsMock() as mock:
        mock.get(EHR_JKU, json={"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]})
        with pytest.raises(UnauthorizedError, match="no usable RSA or EC signing key"):
            verifier.keystore.keys(EHR_JKU)


def test_a_rotated_key_is_fetched_again(make_app, request_v06):
    old = Signer(ECKey.generate_key("P-384", parameters={"kid": "old", "alg": "ES384"}))
    new = Signer(ECKey.generate_key("P-384", parameters={"kid": "new", "alg": "ES384"}))
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt=old.issuer_settings())
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(EHR_JKU, json=old.jwks)
        assert harness.hook(PV, request_v06, old.bearer(AUD)).status_code == 200
        mock.replace(responses.GET, EHR_JKU, json=new.jwks)
        harness.clock[0] += 61  # past jwt.jwks_refetch_seconds since the first fetch
        assert harness.hook(PV, request_v06, new.bearer(AUD)).status_code == 200
        # A second unknown kid right after does not make the service hammer the EHR.
        stranger = Signer(ECKey.generate_key("P-384", parameters={"kid": "stranger"}))
        assert harness.hook(PV, request_v06, stranger.bearer(AUD)).status_code == 401
        assert len(mock.calls) == 2


def test_a_pinned_jwks_file_needs_no_fetch(make_app, signer, tmp_path, request_v06):
    path = tmp_path / "ehr-jwks.json"
    path.write_text(json.dumps(signer.jwks))
    harness = make_app(allow_unsigned=False, public_base_url=BASE, jwt={"issuers": [{"iss": signer.iss, "jwks_file": str(path)}]})
    with responses.RequestsMock():  # any HTTP call would fail the test
        response = harness.hook(PV, request_v06, signer.bearer(AUD, header={"jku": None}))
    assert response.status_code == 200, response.text


def test_verifying_jwts_without_public_base_url_refuses_to_start(make_app, signer):
    """The audience comes from the configuration only: without public_base_url the service
    does not start (and says how to set it), rather than take it from the request's Host."""
    with pytest.raises(SettingsError) as caught:
        make_app(allow_unsigned=False, jwt=signer.issuer_settings())
    assert "public_base_url" in str(caught.value) and "FHIR_AIBL_PUBLIC_BASE_URL" in str(caught.value)
    make_app(allow_unsigned=True).cds.close()  # nothing is verified: nothing to compare aud with


def test_a_token_for_another_service_is_refused_whatever_host_and_forwarded_headers_say(secured, signer, request_v06):
    """A trusted EHR's token for another CDS service, replayed here with that service's Host and
    X-Forwarded-* headers, names the other service in its aud: refused."""
    other = "https://other-cds.example.net"
    spoofed = {"Host": "other-cds.example.net", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "other-cds.example.net"}
    response = secured.hook(PV, request_v06, {**signer.bearer(f"{other}/cds-services/{PV}"), **spoofed})
    assert response.status_code == 401 and "audience" in reason(response)
    assert secured.hook(PV, request_v06, {**signer.bearer(AUD), **spoofed}).status_code == 200


def test_unsigned_mode_says_so_loudly(make_app, request_v06, caplog):
    with caplog.at_level(logging.WARNING, logger="fhir_aibl.cds"):
        harness = make_app(allow_unsigned=True)
        assert harness.hook(PV, request_v06).status_code == 200
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "UNSIGNED MODE" in text and "local development only" in text
