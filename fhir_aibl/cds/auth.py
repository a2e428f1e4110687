"""Verifying the EHR's JWT, as CDS Hooks 2.0 ("Trusting CDS Clients") requires.

Each request carries `Authorization: Bearer <JWS>` signed by the CDS client. A token is
accepted only when every check below passes, in this order; the first failure is a 401
whose reason names the check (and is logged, without patient data: the body is not read
before the token is accepted).

1. A Bearer token in compact JWS form (three base64url parts, JSON header and payload).
2. `alg` is one of the configured asymmetric algorithms (RS*, ES*, PS*). `none` and HMAC
   never are: with HMAC, whoever can verify can also forge.
3. `iss` is a configured issuer (exact match).
4. The key set: the token's `jku` when it is one of that issuer's configured JWKS URLs;
   otherwise the issuer's `jwks_file` (keys pinned in the configuration) when it has one,
   whatever `jku` the token announces; otherwise, without a `jku`, the issuer's first URL.
   A `jku` that is not on the allowlist is never fetched (a token naming its own key server
   would verify itself): with no pinned keys, such a token is refused.
5. The key: found by `kid` in the key set (fetched with requests, cached for
   `jwks_cache_seconds`; an unknown `kid` triggers one re-fetch per `jwks_refetch_seconds`,
   for key rotation). Only RSA and EC public keys are used, and a key's own `alg`, if it
   states one, must match the token's.
6. The signature (joserfc).
7. `aud` (a string or a list) contains this service's endpoint URL.
8. `exp` and `iat` are present and numeric; `exp` has not passed and `iat` is not in the
   future, each with `clock_skew_seconds` of tolerance; `exp` is at most
   `max_lifetime_seconds` ahead (so the replay cache can forget a jti after its exp).
9. `jti` is present and has not been seen from this issuer before its exp (replay).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from .errors import UnauthorizedError
from .settings import Issuer, JwtSettings

log = logging.getLogger("fhir_aibl.cds.auth")

_KEY_TYPES = ("RSA", "EC")


def _refused(reason: str, message: str) -> UnauthorizedError:
    """A 401 whose `reason` (a short fixed word: missing, malformed, algorithm, issuer, jku, jwks,
    key, signature, audience, claims, expired, iat, lifetime, replay) labels the metrics."""
    error = UnauthorizedError(message)
    error.reason = reason
    return error


def _b64json(segment: str, what: str) -> dict:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = json.loads(raw)
    except (ValueError, TypeError):
        raise _refused("malformed", f"malformed token: the {what} is not base64url JSON") from None
    if not isinstance(value, dict):
        raise _refused("malformed", f"malformed token: the {what} is not a JSON object")
    return value


@dataclass
class _CachedKeys:
    keys: KeySet
    fetched: float


class KeyStore:
    """JWK Sets by URL (fetched, cached) or by file (read once)."""

    def __init__(self, settings: JwtSettings, clock: Callable[[], float]):
        self.settings = settings
        self.clock = clock
        self._cache: dict[str, _CachedKeys] = {}
        self._last_fetch: dict[str, float] = {}
        self._lock = threading.Lock()

    def keys(self, source: str, *, refresh: bool = False) -> KeySet:
        """The key set at `source` (a URL, or `file:<path>`)."""
        with self._lock:
            cached = self._cache.get(source)
            now = self.clock()
            fresh = cached is not None and now - cached.fetched < self.settings.jwks_cache_seconds
            if fresh and not refresh:
                return cached.keys
            if cached is not None and refresh and now - self._last_fetch.get(source, 0) < self.settings.jwks_refetch_seconds:
                return cached.keys  # re-fetched a moment ago: an unknown kid stays unknown
            self._last_fetch[source] = now
        keys = self._load(source)
        with self._lock:
            self._cache[source] = _CachedKeys(keys, self.clock())
        return keys

    def available(self, source: str) -> bool:
        with self._lock:
            cached = self._cache.get(source)
            if cached is not None and self.clock() - cached.fetched < self.settings.jwks_cache_seconds:
                return True
            if self.clock() - self._last_fetch.get(source, float("-inf")) < self.settings.jwks_refetch_seconds:
                return False  # tried a moment ago and failed: do not hammer the EHR from a probe
        try:
            self.keys(source)
        except UnauthorizedError:
            return False
        return True

    def _load(self, source: str) -> KeySet:
        if source.startswith("file:"):
            try:
                data = json.loads(Path(source[5:]).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise _refused("jwks", f"the configured JWKS file cannot be read ({type(exc).__name__})") from None
        else:
            data = self._fetch(source)
        return self._key_set(data)

    def _fetch(self, url: str) -> Any:
        try:
            with requests.get(
                url,
                timeout=self.settings.jwks_timeout_seconds,
                allow_redirects=False,
                stream=True,
                headers={"Accept": "application/json"},
            ) as response:
                if response.status_code != 200:
                    raise _refused("jwks", f"the JWKS could not be fetched (HTTP {response.status_code})")
                body = response.raw.read(self.settings.jwks_max_bytes + 1, decode_content=True)
        except requests.RequestException as exc:
            raise _refused("jwks", f"the JWKS could not be fetched ({type(exc).__name__})") from None
        if len(body) > self.settings.jwks_max_bytes:
            raise _refused("jwks", "the JWKS is larger than jwt.jwks_max_bytes")
        try:
            return json.loads(body)
        except ValueError:
            raise _refused("jwks", "the JWKS is not JSON") from None

    @staticmethod
    def _key_set(data: Any) -> KeySet:
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise _refused("jwks", "the JWKS is not a JWK Set")
        # Public RSA and EC keys only: an "oct" (symmetric) key in a key set must never
        # verify anything, whatever the token claims.
        usable = [
            {k: v for k, v in key.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
            for key in data["keys"]
            if isinstance(key, dict) and key.get("kty") in _KEY_TYPES and key.get("use", "sig") == "sig"
        ]
        try:
            return KeySet.import_key_set({"keys": usable})
        except (JoseError, ValueError, TypeError):
            raise _refused("jwks", "the JWKS has no usable RSA or EC signing key") from None


class ReplayCache:
    """jti values seen, per issuer, until their exp; bounded."""

    def __init__(self, size: int, clock: Callable[[], float]):
        self.size = size
        self.clock = clock
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def check_and_add(self, iss: str, jti: str, exp: float) -> bool:
        """False if (iss, jti) was seen and has not expired; otherwise remember it and return True."""
        now = self.clock()
        with self._lock:
            seen = self._seen.get((iss, jti))
            if seen is not None and seen >= now:
                return False
            self._seen[(iss, jti)] = exp
            self._seen.move_to_end((iss, jti))
            if len(self._seen) > self.size:
                for key in [k for k, e in self._seen.items() if e < now]:
                    del self._seen[key]
                while len(self._seen) > self.size:
                    # Full of live tokens: forgetting the oldest opens a replay window for it,
                    # refusing every new token would stop the service. Availability wins, loudly.
                    self._seen.popitem(last=False)
                    log.warning("JWT replay cache full (jwt.replay_cache_size=%d): oldest jti forgotten", self.size)
            return True


class JwtVerifier:
    def __init__(self, settings: JwtSettings, clock: Callable[[], float] = time.time, *, replay=None):
        """`replay`: an object with `check_and_add(iss, jti, exp)`; default: a ReplayCache in this
        process's memory (the service passes replay.SqliteReplayCache, shared by its workers)."""
        self.settings = settings
        self.clock = clock
        self.issuers: dict[str, Issuer] = {i.iss: i for i in settings.issuers}
        self.keystore = KeyStore(settings, clock)
        self.replay = replay if replay is not None else ReplayCache(settings.replay_cache_size, clock)

    def keys_available(self) -> dict[str, bool]:
        """For readiness: per issuer, whether its key set is cached or can be had now (fetched at
        most once per `jwks_refetch_seconds` while it cannot)."""
        out = {}
        for issuer in self.issuers.values():
            source = f"file:{issuer.jwks_file}" if issuer.jwks_file is not None else issuer.jku[0]
            out[issuer.iss] = self.keystore.available(source)
        return out

    def verify(self, authorization: str | None, audiences: Iterable[str]) -> dict[str, Any]:
        """The token's claims, or UnauthorizedError naming the first check that failed."""
        if not authorization:
            raise _refused("missing", "no Authorization header: a signed JWT (Bearer) is required")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _refused("missing", "the Authorization header is not a Bearer token")
        parts = token.split(".")
        if len(parts) != 3:
            raise _refused("malformed", "malformed token: not a compact JWS (three dot-separated parts)")
        header = _b64json(parts[0], "header")
        claims = _b64json(parts[1], "payload")

        alg = header.get("alg")
        if alg not in self.settings.algorithms:
            raise _refused("algorithm", f"algorithm {alg!r} is not accepted: only {', '.join(self.settings.algorithms)}")
        iss = claims.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise _refused("issuer", "the issuer (iss) is not trusted")
        source = self._key_source(issuer, header.get("jku"))
        key = self._key(source, header.get("kid"), alg)
        try:
            verified = jws.deserialize_compact(token, key, algorithms=[alg])
        except JoseError:
            raise _refused("signature", "the signature does not verify") from None
        # Read the claims from what was verified, not from the unverified decoding above.
        try:
            claims = json.loads(verified.payload)
        except (ValueError, TypeError):
            raise _refused("malformed", "malformed token: the payload is not JSON") from None
        if not isinstance(claims, dict) or claims.get("iss") != iss:
            raise _refused("malformed", "malformed token: the payload is not a JSON object")
        self._check_claims(claims, set(audiences))
        return claims

    def _key_source(self, issuer: Issuer, jku: Any) -> str:
        if jku is not None and isinstance(jku, str) and jku.rstrip("/") in issuer.jku:
            return jku.rstrip("/")
        if issuer.jwks_file is not None:
            # Keys pinned in the configuration verify the token whatever `jku` it announces
            # (many EHRs, the CDS Hooks sandbox among them, always send one): that URL is then
            # neither fetched nor trusted.
            return f"file:{issuer.jwks_file}"
        if jku is not None:
            raise _refused("jku", "the jku is not on this issuer's allowlist")
        return issuer.jku[0]

    def _key(self, source: str, kid: Any, alg: str):
        for refresh in (False, True):
            keys = self.keystore.keys(source, refresh=refresh)
            candidates = [k for k in keys if kid is None or k.kid == kid]
            if kid is None and len(candidates) > 1:
                raise _refused("key", "the token has no kid and the key set has several keys")
            if candidates:
                key = candidates[0]
                if key.get("alg") not in (None, alg):
                    raise _refused("key", "the key's alg does not match the token's alg")
                return key
        raise _refused("key", "no key in the issuer's key set has the token's kid")

    def _check_claims(self, claims: dict[str, Any], audiences: set[str]) -> None:
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
        if not any(isinstance(a, str) and a.rstrip("/") in audiences for a in auds):
            raise _refused("audience", "the audience (aud) is not this service's endpoint URL")
        now = self.clock()
        skew = self.settings.clock_skew_seconds
        exp, iat = claims.get("exp"), claims.get("iat")
        for name, value in (("exp", exp), ("iat", iat)):
            if value is None:
                raise _refused("claims", f"the token has no {name}")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _refused("claims", f"{name} is not a number")
        if now > exp + skew:
            raise _refused("expired", "the token has expired (exp)")
        if iat > now + skew:
            raise _refused("iat", "the token was issued in the future (iat)")
        if exp > now + self.settings.max_lifetime_seconds + skew:
            raise _refused("lifetime", "the token's exp is further ahead than jwt.max_lifetime_seconds")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise _refused("claims", "the token has no jti")
        if not self.replay.check_and_add(claims["iss"], jti, float(exp) + skew):
            raise _refused("replay", "the token was used before (jti replay)")
