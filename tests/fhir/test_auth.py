"""Authentication: bearer tokens from a file or the environment, SMART Backend Services
(private_key_jwt signed RS384/ES384, token cached until shortly before expiry, one
re-authentication on 401)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

import pytest
import responses
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey

from fhir_aibl.fhir.auth import (
    CLIENT_ASSERTION_TYPE,
    BearerToken,
    NoAuth,
    SmartBackendAuth,
    auth_from_options,
    load_signing_key,
)
from fhir_aibl.fhir.errors import AuthError, ConfigError, TokenError
from fhir_aibl.fhir.http import Http

from .fakes import BASE, outcome

TOKEN_URL = "https://auth.test/token"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def rsa_key():
    return RSAKey.generate_key(2048, auto_kid=True)


@pytest.fixture(scope="module")
def ec_key():
    return ECKey.generate_key("P-384", auto_kid=True)


def _pem(tmp_path, key, name="key.pem"):
    path = tmp_path / name
    path.write_bytes(key.as_pem(private=True))
    return path


def _token_callback(issued: list[dict], lifetime: int = 300, status: int = 200):
    def callback(request):
        form = {k: v[0] for k, v in parse_qs(request.body).items()}
        issued.append(form)
        if status != 200:
            return status, {}, json.dumps({"error": "invalid_client", "error_description": "unknown key"})
        return (
            200,
            {},
            json.dumps({"access_token": f"token-{len(issued)}", "token_type": "Bearer", "expires_in": lifetime}),
        )

    return callback


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_the_client_assertion_is_a_jwt_the_server_can_verify(tmp_path, rsa_key, ec_key, kind):
    key = rsa_key if kind == "rsa" else ec_key
    signing = load_signing_key(_pem(tmp_path, key))
    assert signing.alg == ("RS384" if kind == "rsa" else "ES384")
    clock = Clock()
    auth = SmartBackendAuth(client_id="cds-app", key=signing, token_url=TOKEN_URL, clock=clock)
    issued: list[dict] = []
    with responses.RequestsMock() as rsps:
        rsps.add_callback("POST", TOKEN_URL, callback=_token_callback(issued))
        assert auth.headers() == {"Authorization": "Bearer token-1"}
    form = issued[0]
    assert form["grant_type"] == "client_credentials"
    assert form["client_assertion_type"] == CLIENT_ASSERTION_TYPE
    assert form["scope"].startswith("system/")
    public = key.as_dict(private=False)
    verifier = (RSAKey if kind == "rsa" else ECKey).import_key(public)
    token = jwt.decode(form["client_assertion"], verifier, algorithms=[signing.alg])
    assert token.header["alg"] == signing.alg and token.header["typ"] == "JWT" and token.header["kid"] == signing.kid
    claims = token.claims
    assert claims["iss"] == claims["sub"] == "cds-app"
    assert claims["aud"] == TOKEN_URL
    assert claims["exp"] - claims["iat"] == 300 and claims["iat"] == int(clock.now)
    assert len(claims["jti"]) >= 32


def test_the_token_is_cached_until_shortly_before_it_expires(tmp_path, ec_key):
    clock = Clock()
    auth = SmartBackendAuth(
        client_id="c", key=load_signing_key(_pem(tmp_path, ec_key)), token_url=TOKEN_URL, clock=clock
    )
    issued: list[dict] = []
    with responses.RequestsMock() as rsps:
        rsps.add_callback("POST", TOKEN_URL, callback=_token_callback(issued, lifetime=600))
        assert auth.headers()["Authorization"] == "Bearer token-1"
        clock.now += 500  # 100 s left: still more than the 60 s margin
        assert auth.headers()["Authorization"] == "Bearer token-1"
        clock.now += 45  # 55 s left
        assert auth.headers()["Authorization"] == "Bearer token-2"
    assert len(issued) == 2
    # every assertion is new: a replayed jti is refused by servers
    assert issued[0]["client_assertion"] != issued[1]["client_assertion"]


def test_401_from_the_fhir_server_fetches_one_new_token_and_retries_once(tmp_path, rsa_key):
    auth = SmartBackendAuth(client_id="c", key=load_signing_key(_pem(tmp_path, rsa_key)), token_url=TOKEN_URL)
    http = Http(BASE, auth=auth, sleep=lambda s: None)
    issued: list[dict] = []
    with responses.RequestsMock() as rsps:
        rsps.add_callback("POST", TOKEN_URL, callback=_token_callback(issued))
        rsps.get(f"{BASE}/Patient/p1", status=401, json=outcome("token revoked", "login"))
        rsps.get(f"{BASE}/Patient/p1", json={"resourceType": "Patient", "id": "p1"})
        assert http.json("GET", "Patient/p1")["id"] == "p1"
        fhir_calls = [c for c in rsps.calls if c.request.url.startswith(BASE)]
        assert [c.request.headers["Authorization"] for c in fhir_calls] == ["Bearer token-1", "Bearer token-2"]
    assert http.stats.reauthentications == 1

    with responses.RequestsMock() as rsps:
        rsps.add_callback("POST", TOKEN_URL, callback=_token_callback(issued))
        rsps.get(f"{BASE}/Patient/p1", status=401, json=outcome("client not authorised", "login"))
        with pytest.raises(AuthError, match="client not authorised"):
            http.send("GET", "Patient/p1")
        assert len([c for c in rsps.calls if c.request.url.startswith(BASE)]) == 2  # one retry, not a loop


def test_a_refused_client_is_a_token_error_with_the_reason(tmp_path, rsa_key):
    auth = SmartBackendAuth(client_id="c", key=load_signing_key(_pem(tmp_path, rsa_key)), token_url=TOKEN_URL)
    with responses.RequestsMock() as rsps:
        rsps.add_callback("POST", TOKEN_URL, callback=_token_callback([], status=401))
        with pytest.raises(TokenError, match="unknown key") as info:
            auth.headers()
    assert info.value.code == "fhir-token"


def test_the_token_endpoint_is_discovered_from_smart_configuration(tmp_path, rsa_key):
    auth = SmartBackendAuth(client_id="c", key=load_signing_key(_pem(tmp_path, rsa_key)), fhir_base=BASE)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/.well-known/smart-configuration", json={"token_endpoint": TOKEN_URL})
        rsps.add_callback("POST", TOKEN_URL, callback=_token_callback([]))
        auth.headers()
    missing = SmartBackendAuth(client_id="c", key=load_signing_key(_pem(tmp_path, rsa_key)), fhir_base=BASE)
    with responses.RequestsMock() as rsps:
        rsps.get(f"{BASE}/.well-known/smart-configuration", status=404)
        with pytest.raises(TokenError, match="--smart-token-url"):
            missing.headers()


def test_a_jwks_file_picks_the_key_by_kid(tmp_path, rsa_key, ec_key):
    path = tmp_path / "keys.jwks"
    path.write_text(json.dumps(KeySet([rsa_key, ec_key]).as_dict(private=True)))
    assert load_signing_key(path, kid=ec_key.kid).alg == "ES384"
    chosen = load_signing_key(path, kid=rsa_key.kid)
    assert chosen.alg == "RS384" and chosen.kid == rsa_key.kid
    with pytest.raises(ConfigError, match="with kid 'nope'"):
        load_signing_key(path, kid="nope")


def test_keys_that_cannot_sign_rs384_or_es384_are_refused(tmp_path, rsa_key):
    public_only = tmp_path / "public.pem"
    public_only.write_bytes(rsa_key.as_pem(private=False))
    with pytest.raises(ConfigError, match="no usable private key"):
        load_signing_key(public_only)
    p256 = tmp_path / "p256.pem"
    p256.write_bytes(ECKey.generate_key("P-256").as_pem(private=True))
    with pytest.raises(ConfigError, match="P-384"):
        load_signing_key(p256)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ConfigError):
        load_signing_key(garbage)
    with pytest.raises(ConfigError, match="cannot read"):
        load_signing_key(tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="signs RS384, not ES384"):
        load_signing_key(_pem(tmp_path, rsa_key), alg="ES384")


def test_a_pem_key_announces_the_kid_given_or_its_thumbprint(tmp_path, ec_key):
    path = _pem(tmp_path, ec_key)
    assert load_signing_key(path, kid="registered-kid").kid == "registered-kid"
    assert load_signing_key(path).kid == ec_key.thumbprint()


def test_bearer_tokens_come_from_a_file_or_the_environment(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("  file-token \n")
    auth = auth_from_options(
        token_file=token_file,
        smart_client_id=None,
        smart_key=None,
        smart_token_url=None,
        fhir_base=BASE,
        environ={"FHIR_AIBL_TOKEN": "env-token"},
    )
    assert auth.headers() == {"Authorization": "Bearer file-token"}  # the file wins over the environment
    auth = auth_from_options(
        token_file=None,
        smart_client_id=None,
        smart_key=None,
        smart_token_url=None,
        fhir_base=BASE,
        environ={"FHIR_AIBL_TOKEN": "env-token"},
    )
    assert auth.headers() == {"Authorization": "Bearer env-token"} and auth.invalidate() is False
    none = auth_from_options(
        token_file=None, smart_client_id=None, smart_key=None, smart_token_url=None, fhir_base=BASE, environ={}
    )
    assert isinstance(none, NoAuth) and none.headers() == {}
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        BearerToken(path=empty)
    with pytest.raises(ConfigError, match="cannot read the token file"):
        BearerToken(path=tmp_path / "missing")


def test_options_for_two_ways_of_authenticating_are_refused(tmp_path, rsa_key):
    with pytest.raises(ConfigError, match="one way to authenticate"):
        auth_from_options(
            token_file=tmp_path / "t",
            smart_client_id="c",
            smart_key=None,
            smart_token_url=None,
            fhir_base=BASE,
            environ={},
        )
    with pytest.raises(ConfigError, match="--smart-client-id and --smart-key"):
        auth_from_options(
            token_file=None, smart_client_id="c", smart_key=None, smart_token_url=TOKEN_URL, fhir_base=BASE, environ={}
        )
    smart = auth_from_options(
        token_file=None,
        smart_client_id="c",
        smart_key=_pem(tmp_path, rsa_key),
        smart_token_url=TOKEN_URL,
        fhir_base=BASE,
        environ={"FHIR_AIBL_TOKEN": "ignored"},
    )
    assert isinstance(smart, SmartBackendAuth)
