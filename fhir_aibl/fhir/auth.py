"""Authentication for the FHIR connector: a bearer token, or SMART Backend Services.

Secrets never come from the command line (where `ps` and shell history show them) and
never reach a log: a bearer token is read from an environment variable or a file; a
SMART client signs its assertion with a private key read from a file.

SMART Backend Services (http://hl7.org/fhir/smart-app-launch/backend-services.html):
OAuth 2.0 client_credentials with a `private_key_jwt` client assertion (RFC 7523) signed
RS384 or ES384, the algorithms the SMART specification requires servers to support. The
access token is cached until `refresh_margin` seconds before it expires; a 401 from the
FHIR server drops it, and the request is retried once with a new one (the connector's
HTTP layer does that, see `http.Http`).

An `Auth` has two methods: `headers()` (what to add to a request to the FHIR server) and
`invalidate()` (the server said 401: forget the credential; True if a new one can be
had, so that one retry is worthwhile).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import requests

from .errors import AuthError, ConfigError, TokenError

log = logging.getLogger("fhir_aibl.fhir")

TOKEN_ENV = "FHIR_AIBL_TOKEN"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: Read everything the pull needs, write the three resource types of the write-back (SMART v1 scopes).
DEFAULT_SCOPE = "system/*.read system/CarePlan.write system/RiskAssessment.write system/Provenance.write"
SIGNING_ALGORITHMS = ("RS384", "ES384")


class Auth(Protocol):
    def headers(self) -> dict[str, str]: ...

    def invalidate(self) -> bool: ...


class NoAuth:
    def headers(self) -> dict[str, str]:
        return {}

    def invalidate(self) -> bool:
        return False


class BearerToken:
    """A static bearer token from a file (re-read after a 401: it may have been rotated) or a value."""

    def __init__(self, token: str | None = None, *, path: Path | None = None):
        if (token is None) == (path is None):
            raise ConfigError("a bearer token comes from exactly one of a value or a file")
        self._path = Path(path) if path is not None else None
        self._token = token.strip() if token is not None else self._read()
        if not self._token:
            raise ConfigError("the bearer token is empty")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, name: str = TOKEN_ENV) -> BearerToken | None:
        value = (environ if environ is not None else os.environ).get(name, "").strip()
        return cls(value) if value else None

    def _read(self) -> str:
        assert self._path is not None
        try:
            return self._path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file: {exc.strerror or exc}", source=str(self._path)) from exc

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        if self._path is None:
            return False
        fresh = self._read()
        changed = bool(fresh) and fresh != self._token
        self._token = fresh or self._token
        return changed


# -- SMART Backend Services ---------------------------------------------------------------------


@dataclass(frozen=True)
class SigningKey:
    key: Any  # a joserfc RSAKey or ECKey holding the private key
    alg: str
    kid: str


def load_signing_key(path: Path, *, kid: str | None = None, alg: str | None = None) -> SigningKey:
    """A private key from a PEM file or a JWKS file (JSON `{"keys": [...]}` or one JWK).

    From a JWKS the key is chosen by `kid`, else the first private RSA or P-384 EC key. The
    algorithm follows from the key: RS384 for RSA, ES384 for EC P-384 (other curves cannot sign
    ES384). `kid` defaults to the JWK's own, else the RFC 7638 thumbprint of the key, which
    is what `joserfc` and most registration tools put in a published JWKS.
    """
    from joserfc.jwk import ECKey, KeySet, RSAKey

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the private key: {exc.strerror or exc}", source=str(path)) from exc
    candidates: list[Any] = []
    try:
        if raw.lstrip().startswith(b"{"):
            doc = json.loads(raw)
            jwks = doc if "keys" in doc else {"keys": [doc]}
            candidates = list(KeySet.import_key_set(jwks))
        else:
            for cls in (RSAKey, ECKey):
                try:
                    candidates = [cls.import_key(raw)]
                    break
                except Exception:  # noqa: BLE001 - joserfc raises several types for "not this kind of key"
                    continue
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"not a PEM or JWKS private key: {exc}", source=str(path)) from exc
    private = [k for k in candidates if getattr(k, "is_private", False)]
    if kid:
        # a JWK is chosen by its kid; a PEM key has none, and the kid given is the one to announce
        chosen = [k for k in private if k.kid == kid] or [k for k in private if not k.kid]
    else:
        chosen = private
    usable = [k for k in chosen if _alg_for(k) is not None]
    if not usable:
        raise ConfigError(
            "no usable private key: need an RSA key (RS384) or an EC P-384 key (ES384)"
            + (f" with kid {kid!r}" if kid else ""),
            source=str(path),
        )
    key = usable[0]
    key_alg = _alg_for(key)
    if alg and alg != key_alg:
        raise ConfigError(f"the key signs {key_alg}, not {alg}", source=str(path))
    return SigningKey(key=key, alg=key_alg or "", kid=kid or key.kid or key.thumbprint())


def _alg_for(key: Any) -> str | None:
    if key.key_type == "RSA":
        return "RS384"
    if key.key_type == "EC" and key.as_dict(private=False).get("crv") == "P-384":
        return "ES384"
    return None


class SmartBackendAuth:
    """client_credentials with a signed JWT assertion; the token cached until shortly before expiry."""

    #: Lifetime of a client assertion: the SMART specification allows at most five minutes.
    assertion_lifetime = 300
    #: Fetch a new token this many seconds before the cached one expires, so that a token never
    #: expires between being attached to a request and the server checking it.
    refresh_margin = 60
    #: When a token response has no `expires_in`, assume the five minutes SMART recommends.
    default_lifetime = 300

    def __init__(
        self,
        *,
        client_id: str,
        key: SigningKey,
        token_url: str | None = None,
        fhir_base: str | None = None,
        scope: str = DEFAULT_SCOPE,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (10.0, 30.0),
        clock: Callable[[], float] = time.time,
    ):
        if not client_id:
            raise ConfigError("SMART Backend Services needs a client id")
        if not token_url and not fhir_base:
            raise ConfigError("SMART Backend Services needs a token URL or a FHIR base to discover it from")
        self.client_id = client_id
        self.key = key
        self._token_url = token_url
        self._fhir_base = fhir_base.rstrip("/") if fhir_base else None
        self.scope = scope
        self.session = session or requests.Session()
        self.timeout = timeout
        self.clock = clock
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = threading.Lock()
        #: token requests made (for tests and the run summary)
        self.token_requests = 0

    @property
    def token_url(self) -> str:
        if self._token_url is None:
            self._token_url = self._discover()
        return self._token_url

    def _discover(self) -> str:
        url = f"{self._fhir_base}/.well-known/smart-configuration"
        try:
            resp = self.session.get(url, headers={"Accept": "application/json"}, timeout=self.timeout)
            endpoint = resp.json().get("token_endpoint") if resp.status_code == 200 else None
        except (requests.RequestException, ValueError, AttributeError) as exc:
            raise TokenError(f"cannot discover the token endpoint from .well-known/smart-configuration: {exc}") from exc
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise TokenError(
                f".well-known/smart-configuration (HTTP {resp.status_code}) names no token_endpoint; "
                "give --smart-token-url"
            )
        return endpoint

    def assertion(self) -> str:
        from joserfc import jwt

        now = int(self.clock())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": self.token_url,
            "iat": now,
            "exp": now + self.assertion_lifetime,
            "jti": str(uuid.uuid4()),  # never reused: servers reject a replayed assertion
        }
        header = {"alg": self.key.alg, "kid": self.key.kid, "typ": "JWT"}
        return jwt.encode(header, claims, self.key.key, algorithms=[self.key.alg])

    def _fetch(self) -> None:
        data = {
            "grant_type": "client_credentials",
            "scope": self.scope,
            "client_assertion_type": CLIENT_ASSERTION_TYPE,
            "client_assertion": self.assertion(),
        }
        self.token_requests += 1
        try:
            resp = self.session.post(
                self.token_url, data=data, headers={"Accept": "application/json"}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            raise TokenError(f"token endpoint unreachable: {type(exc).__name__}") from exc
        try:
            body = resp.json()
        except ValueError:
            body = {}
        if resp.status_code != 200:
            reason = body.get("error_description") or body.get("error") or resp.reason
            raise TokenError(f"token endpoint refused the client (HTTP {resp.status_code}): {reason}")
        token = body.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenError("token endpoint answered without an access_token")
        token_type = str(body.get("token_type", "bearer")).lower()
        if token_type != "bearer":
            raise TokenError(f"token endpoint issued a {token_type!r} token; only bearer tokens are supported")
        try:
            lifetime = float(body.get("expires_in", self.default_lifetime))
        except (TypeError, ValueError):
            lifetime = self.default_lifetime
        self._token = token
        self._expires_at = self.clock() + lifetime
        log.debug("SMART token obtained, valid for %d s", int(lifetime))

    def headers(self) -> dict[str, str]:
        with self._lock:
            if self._token is None or self.clock() >= self._expires_at - self.refresh_margin:
                self._fetch()
            return {"Authorization": f"Bearer {self._token}"}

    def invalidate(self) -> bool:
        with self._lock:
            self._token = None
            self._expires_at = 0.0
        return True


def auth_from_options(
    *,
    token_file: Path | None,
    smart_client_id: str | None,
    smart_key: Path | None,
    smart_token_url: str | None,
    smart_scope: str = DEFAULT_SCOPE,
    smart_kid: str | None = None,
    fhir_base: str,
    environ: Mapping[str, str] | None = None,
    session: requests.Session | None = None,
    timeout: tuple[float, float] = (10.0, 30.0),
) -> Auth:
    """The Auth the command-line options ask for; at most one kind may be given."""
    smart = smart_client_id or smart_key or smart_token_url
    env_token = BearerToken.from_env(environ)
    chosen = [name for name, given in (("--token-file", token_file), ("--smart-*", smart)) if given]
    if len(chosen) > 1:
        raise ConfigError(f"give one way to authenticate, not {' and '.join(chosen)}")
    if token_file:
        return BearerToken(path=token_file)
    if smart:
        if not smart_client_id or not smart_key:
            raise ConfigError("SMART Backend Services needs --smart-client-id and --smart-key (and --smart-token-url)")
        key = load_signing_key(smart_key, kid=smart_kid)
        return SmartBackendAuth(
            client_id=smart_client_id,
            key=key,
            token_url=smart_token_url,
            fhir_base=fhir_base,
            scope=smart_scope,
            session=session,
            timeout=timeout,
        )
    if env_token is not None:
        return env_token
    return NoAuth()


__all__ = [
    "Auth",
    "AuthError",
    "BearerToken",
    "NoAuth",
    "SigningKey",
    "SmartBackendAuth",
    "auth_from_options",
    "load_signing_key",
]
