"""The connector's one HTTP seam: every request to the FHIR server goes through `Http.send`.

It owns what every request needs and no caller should repeat:

- the `requests.Session` (tests replace it, or mock it with `responses`), with a timeout
  on every request (`ClientSettings.connect_timeout`, `read_timeout`);
- authentication headers, and one re-authentication and retry after a 401 (a 401 means
  the request was not processed, so this is safe for any method);
- retries with exponential backoff and full jitter on 429, 502, 503, 504 and on every
  transport failure, for idempotent requests only (GET, HEAD, PUT, DELETE, or a caller's
  explicit `idempotent=True`, e.g. a batch of reads). A transport failure is anything that
  is not a whole, usable answer: no connection, a reset, a timeout, a body cut short of its
  Content-Length, broken chunking or compression, and (through `json(expect=...)`) a body
  that is not JSON or not the FHIR resource the request asks for. A POST that creates is
  never repeated here: whether it was applied is unknown after a lost answer, and the
  write-back retries a patient as a whole instead (pull again, decide again);
- `Retry-After`, in seconds or as an HTTP-date, honoured up to a ceiling; beyond it the
  request fails at once rather than stall the run;
- same-origin checks on absolute URLs (paging links): the bearer token is only ever sent
  to the origin of the configured base URL;
- error statuses turned into the typed errors of `errors.py`, with the diagnostics of the
  server's OperationOutcome;
- counting: `stats.requests` is every HTTP request sent to the FHIR server (retries
  included), which is how round trips per patient are measured.

Logs name the method, the resource type and the status, never a URL (URLs carry patient
ids) unless `ClientSettings.debug_phi` is on.
"""

from __future__ import annotations

import http.client
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from .auth import Auth, NoAuth
from .errors import (
    AuthError,
    BadResponse,
    ConfigError,
    FhirError,
    ForeignLink,
    RateLimited,
    RequestTimeout,
    ServerError,
    TransportError,
    Unavailable,
    server_error,
)
from .settings import ClientSettings

import orjson

from ..jsoninput import loads as _loads  # JSON in: depth bounded, duplicate keys refused (ValueError)

_dumps = orjson.dumps


log = logging.getLogger("fhir_aibl.fhir")

FHIR_JSON = "application/fhir+json"
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: What can go wrong between sending a request and holding its whole answer. requests wraps
#: most of it (ConnectionError, ChunkedEncodingError for a body cut short or broken chunking,
#: ContentDecodingError); urllib3 and http.client errors are listed too, in case one escapes
#: unwrapped, so that no transport failure ever reaches a caller as anything but a FhirError.
_TRANSPORT_ERRORS = (requests.RequestException, Urllib3Error, http.client.HTTPException, OSError)
#: Checks an answer's JSON: None when usable, else why not (the request is then retried like a
#: transport failure, when idempotent).
Expect = Callable[[Any], "str | None"]


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme, 0)


def _environment_of(session: requests.Session, base_url: str) -> dict[str, Any]:
    """What requests would take from the environment for a request to `base_url`'s origin: proxies,
    the CA bundle (`verify`), the client certificate and ~/.netrc credentials, by its own functions."""
    settings = session.merge_environment_settings(base_url, {}, None, None, None)
    found: dict[str, Any] = {"proxies": settings["proxies"], "verify": settings["verify"], "cert": settings["cert"]}
    netrc = requests.utils.get_netrc_auth(base_url) if not session.auth else None
    if netrc:
        found["auth"] = netrc
    return found


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if value is None or not value.strip():
        return None
    try:
        # urllib3 parses both forms and clamps a date in the past to 0
        return float(Retry().parse_retry_after(value.strip()))
    except (InvalidHeader, ValueError, TypeError, OverflowError):
        return None


@dataclass
class Stats:
    #: HTTP requests sent to the FHIR server, retries and re-authentications included
    requests: int = 0
    retries: int = 0
    reauthentications: int = 0
    #: seconds slept before retries (including Retry-After waits)
    slept: float = 0.0
    by_kind: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.requests += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


class Http:
    def __init__(
        self,
        base_url: str,
        *,
        settings: ClientSettings | None = None,
        auth: Auth | None = None,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
        jitter: Callable[[], float] = random.random,
    ):
        base_url = (base_url or "").strip().rstrip("/")
        scheme, host, _ = origin(base_url)
        if scheme not in ("http", "https") or not host:
            raise ConfigError(f"not an http(s) FHIR base URL: {base_url!r}")
        self.base_url = base_url
        self.origin = origin(base_url)
        self.settings = settings or ClientSettings()
        self.auth: Auth = auth or NoAuth()
        self.session = session or requests.Session()
        # requests reads the environment again on every request (proxy variables, the CA
        # bundle variables, ~/.netrc): about a fifth of the client's CPU per patient pull.
        # Every request of this client goes to one origin, so a session of its own reads it
        # once, with requests' own functions, and passes the same settings on each request.
        # A session given by the caller is left as it is.
        self._environment: dict[str, Any] | None = None
        if session is None and self.session.trust_env:
            self._environment = _environment_of(self.session, self.base_url)
            self.session.trust_env = False
        self.sleep = sleep
        self.jitter = jitter
        self.stats = Stats()

    # -- URLs ------------------------------------------------------------------------------
    def url(self, path_or_url: str) -> str:
        """An absolute URL for a path relative to the base, or a checked absolute URL."""
        if path_or_url.startswith(("http://", "https://")):
            self.check_origin(path_or_url)
            return path_or_url
        return f"{self.base_url}/{path_or_url.lstrip('/')}" if path_or_url else self.base_url

    def check_origin(self, url: str) -> None:
        if origin(url) != self.origin:
            # Never follow: the next request would carry the bearer token to another host.
            raise ForeignLink(
                f"the server sent a link to another origin ({urlsplit(url).scheme}://{urlsplit(url).netloc}); "
                f"refused, only {self.origin[0]}://{self.origin[1]}:{self.origin[2]} is trusted"
            )

    def describe(self, method: str, url: str, what: str) -> str:
        """`what` (the method and resource type, no ids), or the full URL when debug_phi is on."""
        return f"{method} {url}" if self.settings.debug_phi else what

    # -- the request loop --------------------------------------------------------------------
    def backoff(self, attempt: int) -> float:
        r = self.settings.retry
        return self.jitter() * min(r.backoff_max, r.backoff_base * (2 ** (attempt - 1)))

    def send(
        self,
        method: str,
        path_or_url: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, str]] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        idempotent: bool | None = None,
        what: str = "",
        retry_statuses: frozenset[int] | None = None,
        read: Callable[[requests.Response], Any] | None = None,
        stream: bool = False,
    ) -> Any:
        """Send one request (with retries); return a 2xx response, or what `read` makes of it,
        or raise a typed FhirError.

        `retry_statuses`: the statuses retried (default `RetrySettings.statuses`). `read` turns a
        2xx answer into its value, raising BadResponse when it is unusable: that is a failure of
        the exchange, retried like a transport failure when the request is idempotent. `stream`:
        the body of a 2xx answer is left unread for the caller to stream (a Bulk Data download)."""
        method = method.upper()
        url = self.url(path_or_url)
        what = what or method
        if idempotent is None:
            idempotent = method in IDEMPOTENT_METHODS
        retry = self.settings.retry
        statuses = retry.statuses if retry_statuses is None else retry_statuses
        data = _dumps(body) if body is not None else None
        attempt = 0
        reauthenticated = False
        while True:
            attempt += 1
            request_headers = {"Accept": FHIR_JSON, "User-Agent": self.settings.user_agent}
            if data is not None:
                request_headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
            request_headers.update(headers or {})
            request_headers.update(self.auth.headers())
            self.stats.count(what.split(" ")[0])
            try:
                resp = self.session.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=request_headers,
                    timeout=(self.settings.connect_timeout, self.settings.read_timeout),
                    allow_redirects=False,
                    stream=stream,
                    **(self._environment or {}),
                )
            except requests.Timeout as exc:
                error: FhirError = RequestTimeout(
                    f"{self.describe(method, url, what)}: no answer within "
                    f"{self.settings.connect_timeout:g}/{self.settings.read_timeout:g} s (connect/read)"
                )
                cause: BaseException | None = exc
            except requests.ConnectionError as exc:
                error = TransportError(f"{self.describe(method, url, what)}: connection failed ({type(exc).__name__})")
                cause = exc
            except _TRANSPORT_ERRORS as exc:
                # the answer began but did not arrive whole: cut short, reset, broken chunking
                error = TransportError(
                    f"{self.describe(method, url, what)}: the answer was cut off or garbled in transit "
                    f"({type(exc).__name__})"
                )
                cause = exc
            else:
                log.debug("%s -> %s", self.describe(method, url, what), resp.status_code)
                status = resp.status_code
                if status < 300:
                    if read is None:
                        return resp
                    try:
                        return read(resp)
                    except BadResponse as exc:
                        error, cause = exc, exc.__cause__
                elif status == 401 and not reauthenticated and self.auth.invalidate():
                    reauthenticated = True  # once: a second 401 means the credentials are refused
                    self.stats.reauthentications += 1
                    continue
                else:
                    self._pause(self._refused(resp, self.describe(method, url, what), statuses, idempotent, attempt))
                    continue
            # a transport failure
            if idempotent and attempt < retry.max_attempts:
                self._pause(self.backoff(attempt))
                continue
            if attempt > 1:
                error.message += f" (after {attempt} attempts)"
                error.args = (error.message,)
            raise error from cause

    def _refused(
        self, resp: requests.Response, what: str, statuses: frozenset[int], idempotent: bool, attempt: int
    ) -> float:
        """An error status: the seconds to wait before trying again, or raise its typed error."""
        retry = self.settings.retry
        status = resp.status_code
        body_json = _json_or_none(resp)
        if status == 401:
            err = server_error(status, resp.reason or "", body_json, what=what)
            raise AuthError(err.message)
        if status in statuses:
            wait = parse_retry_after(resp.headers.get("Retry-After"))
            err = server_error(status, resp.reason or "", body_json, what=what, retry_after=wait)
            if wait is not None and wait > retry.retry_after_ceiling:
                err.message += f" (Retry-After {wait:g} s is beyond the {retry.retry_after_ceiling:g} s ceiling)"
                err.args = (err.message,)
                raise err
            if idempotent and attempt < retry.max_attempts:
                return wait if wait is not None else self.backoff(attempt)
            if attempt > 1:
                err.message += f" (after {attempt} attempts)"
                err.args = (err.message,)
            raise err
        if 300 <= status < 400:
            raise ServerError(f"{what}: HTTP {status} redirect not followed (check the FHIR base URL)", status=status)
        raise server_error(status, resp.reason or "", body_json, what=what)

    def _pause(self, seconds: float) -> None:
        self.stats.retries += 1
        self.stats.slept += seconds
        if seconds > 0:
            self.sleep(seconds)

    def json(self, method: str, path_or_url: str, *, expect: Expect | None = None, **options: Any) -> Any:
        """`send`, then the body as JSON (None for an empty body).

        A body that is not JSON, or that `expect` turns down (it returns why), is a failure of
        the exchange like a body cut short: retried when the request is idempotent, else (or
        after the last attempt) BadResponse."""
        label = options.get("what") or method.upper()

        def read(resp: requests.Response) -> Any:
            if not resp.content:
                value = None
            else:
                try:
                    value = _loads(resp.content)
                except ValueError as exc:
                    raise BadResponse(f"{label}: the server's answer is not valid FHIR JSON ({exc})") from exc
            problem = expect(value) if expect is not None else None
            if problem:
                raise BadResponse(f"{label}: {problem}")
            return value

        return self.send(method, path_or_url, read=read, **options)


def resource_of(*types: str) -> Expect:
    """An `expect` check: the answer is a JSON object of one of these resource types."""

    def check(value: Any) -> str | None:
        if isinstance(value, dict) and value.get("resourceType") in types:
            return None
        got = value.get("resourceType") if isinstance(value, dict) else type(value).__name__
        return f"the server answered {got or 'an object without resourceType'}, not a {' or '.join(types)}"

    return check


def _json_or_none(resp: requests.Response) -> Any:
    try:
        return _loads(resp.content) if resp.content else None
    except ValueError:
        return None


__all__ = ["Http", "Stats", "origin", "parse_retry_after", "resource_of", "RateLimited", "Unavailable"]
