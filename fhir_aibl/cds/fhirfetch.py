"""The fallback FHIR query: what the service fetches itself when a prefetch key is missing.

Deliberately small (plain `requests`, GET only): the project's full FHIR client lives in
`fhir_aibl/fhir/`. What matters here is safety, not features:

- `fhirServer` comes from the request, so it is attacker-controlled. A query goes out only
  when it lies on the configured allowlist (`allowed`): same scheme, host and port as an
  entry and a path at or below the entry's path. Anything else would let a caller use this
  service to reach into the hospital network (server-side request forgery).
- Redirects are not followed (a listed server could otherwise bounce the query, with the
  EHR's bearer token, anywhere), and `next` links are followed only while they stay on the
  allowlisted base.
- The EHR's `fhirAuthorization.access_token` is sent as a bearer token and never logged.
- Every query of one request shares one time budget; a query still running when it is spent
  counts as failed. Responses are read up to a size cap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from ..jsoninput import JsonInputError, NotJsonError
from ..jsoninput import loads as json_loads
from .prefetch import bundle_resources
from .settings import FhirSettings

log = logging.getLogger("fhir_aibl.cds.fhir")

_DEFAULT_PORTS = {"http": 80, "https": 443}


class FetchError(Exception):
    """One fallback query failed; the message names the reason, never patient data."""


def _origin_and_path(url: str) -> tuple[str, str, int, str] | None:
    try:
        parts = urlsplit(url)
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username or parts.password:
        return None
    return parts.scheme, parts.hostname.lower(), int(port or 0), parts.path.rstrip("/")


def allowed(url: str, allowlist: list[str]) -> bool:
    """True if `url` is an allowlisted FHIR base or lies below one (path-segment aware)."""
    target = _origin_and_path(url)
    if target is None:
        return False
    for entry in allowlist:
        base = _origin_and_path(entry)
        if base is None or base[:3] != target[:3]:
            continue
        if target[3] == base[3] or target[3].startswith(base[3] + "/"):
            return True
    return False


@dataclass
class Outcome:
    key: str
    resources: list[tuple[dict, dict]] | None = None
    error: str | None = None


class Fetcher:
    def __init__(self, settings: FhirSettings):
        self.settings = settings

    def allowed(self, base: str) -> bool:
        return allowed(base, self.settings.allowlist)

    def fetch(
        self, key: str, base: str, query: str, token: str | None, deadline: float
    ) -> Outcome:
        """Run one query (and its `next` pages) against `base`; never raises."""
        try:
            return Outcome(key, resources=self._fetch(base, query, token, deadline))
        except FetchError as exc:
            return Outcome(key, error=str(exc))
        except requests.Timeout:
            return Outcome(key, error="timed out")
        except requests.RequestException as exc:
            # The exception text can carry the URL, which carries the patient id: name the kind only.
            return Outcome(key, error=f"connection failed ({type(exc).__name__})")

    def _fetch(self, base: str, query: str, token: str | None, deadline: float) -> list[tuple[dict, dict]]:
        if not self.allowed(base):
            raise FetchError("fhirServer is not on the allowlist")
        base = base.rstrip("/") + "/"
        # A next link may be absolute; a template is relative to the base.
        url = query if _origin_and_path(query) is not None else urljoin(base, query.lstrip("/"))
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        found: list[tuple[dict, dict]] = []
        with requests.Session() as session:
            session.trust_env = False  # no proxy or netrc from the environment between us and the EHR
            for _page in range(self.settings.max_pages):
                if not allowed(url, [base]):
                    raise FetchError("a next link leaves the fhirServer base")
                body = self._get(session, url, headers, deadline)
                if body.get("resourceType") == "OperationOutcome":
                    raise FetchError("the FHIR server answered with an OperationOutcome")
                if body.get("resourceType") != "Bundle":
                    found.append((body, {}))
                    return found
                found.extend(
                    (res, urns)
                    for res, urns in bundle_resources(body)
                    if res.get("resourceType") != "OperationOutcome"  # search.mode outcome: warnings
                )
                nxt = next((lk.get("url") for lk in body.get("link") or [] if isinstance(lk, dict) and lk.get("relation") == "next"), None)
                if not isinstance(nxt, str):
                    return found
                url = urljoin(url, nxt)
        raise FetchError(f"more than {self.settings.max_pages} pages")

    def _get(self, session: requests.Session, url: str, headers: Mapping[str, str], deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise requests.Timeout()
        response = session.get(
            url,
            headers=headers,
            timeout=(min(remaining, 2.0), remaining),
            allow_redirects=False,
            stream=True,
            verify=self.settings.verify_tls,
        )
        with response:
            if response.status_code != 200:
                raise FetchError(f"the FHIR server answered HTTP {response.status_code}")
            chunks = []
            size = 0
            for chunk in response.iter_content(64 * 1024):
                size += len(chunk)
                if size > self.settings.max_response_bytes:
                    raise FetchError("the FHIR response is larger than fhir.max_response_bytes")
                if time.monotonic() > deadline:
                    raise requests.Timeout()
                chunks.append(chunk)
        try:
            body = json_loads(b"".join(chunks))
        except NotJsonError:
            raise FetchError("the FHIR server did not answer with JSON") from None
        except JsonInputError as exc:  # nested too deep, a duplicate key
            raise FetchError(f"the FHIR server's answer is not valid FHIR JSON: {exc}") from None
        if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
            raise FetchError("the FHIR server did not answer with a FHIR resource")
        return body
