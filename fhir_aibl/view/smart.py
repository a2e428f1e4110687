"""The bone-health view as a SMART on FHIR app: SMART App Launch (EHR launch) with PKCE, as a public client.

    EHR -> GET /app/launch?iss=<FHIR base>&launch=<opaque>
        the app checks `iss` against the FHIR allowlist (fhir.allowlist, the same list the CDS
        fallback queries use), reads <iss>/.well-known/smart-configuration, and redirects the
        browser to its authorization_endpoint with response_type=code, client_id, redirect_uri,
        scope (with `launch`), state, aud=<iss>, launch, and a PKCE S256 code_challenge
    EHR -> GET /app/redirect?code=...&state=...
        the app takes the pending launch of that state (one use, 10 minutes at most), exchanges the
        code with the code_verifier at the token_endpoint, and reads the patient of the token's
        launch context from <iss> with the access token (the CDS prefetch queries); then assesses
        and renders the page. The token lives for that request only; nothing is stored.

The OAuth client is Authlib's (`OAuth2Session`: authorization URL, PKCE, token request).
Pending launches are kept in this process's memory: run one process behind the redirect, or
pin the app's traffic to one process.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import requests
from authlib.integrations.requests_client import OAuth2Session
from pydantic import BaseModel, ConfigDict, Field

#: the scopes the app asks for: the launch context and read access to the patient's record
DEFAULT_SCOPE = (
    "launch openid fhirUser patient/Patient.read patient/Observation.read patient/Condition.read "
    "patient/MedicationRequest.read patient/MedicationStatement.read patient/MedicationAdministration.read "
    "patient/FamilyMemberHistory.read patient/DiagnosticReport.read patient/Procedure.read patient/ServiceRequest.read"
)
PENDING_SECONDS = 600
PENDING_MAX = 10_000


class SmartSettings(BaseModel):
    """`smart:` in the `fhir-aibl serve` configuration: how the app registers with an EHR."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(default="fhir-aibl-bone-health", min_length=1, description="the client id the EHR registered the app under")
    scope: str = Field(default=DEFAULT_SCOPE, description="scopes requested at launch (must include `launch`)")
    timeout_seconds: float = Field(default=10.0, gt=0, description="time limit of each call to the EHR (discovery, token)")


class LaunchError(Exception):
    """A launch that cannot go on; `status` is the HTTP status to answer, the message says why (no patient data)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Pending:
    iss: str
    token_endpoint: str
    code_verifier: str
    redirect_uri: str
    created: float


class Launches:
    """Launches between the redirect to the EHR and its return: by state, each used once, expiring."""

    def __init__(self, clock=time.monotonic):
        self._items: dict[str, Pending] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def add(self, pending: Pending) -> str:
        state = secrets.token_urlsafe(32)
        with self._lock:
            now = self._clock()
            for key in [k for k, p in self._items.items() if now - p.created > PENDING_SECONDS]:
                del self._items[key]
            if len(self._items) >= PENDING_MAX:
                raise LaunchError("too many launches in progress; try again in a few minutes", 503)
            self._items[state] = pending
        return state

    def take(self, state: str) -> Pending:
        with self._lock:
            pending = self._items.pop(state, None)
        if pending is None or self._clock() - pending.created > PENDING_SECONDS:
            raise LaunchError("this launch is unknown or has expired (each launch can be used once, within 10 minutes): launch the app again from the EHR")
        return pending


def discover(iss: str, timeout: float) -> dict[str, Any]:
    """The EHR's SMART configuration (<iss>/.well-known/smart-configuration), checked for an EHR launch with PKCE."""
    url = iss.rstrip("/") + "/.well-known/smart-configuration"
    try:
        response = requests.get(url, headers={"Accept": "application/json"}, timeout=timeout, allow_redirects=False)
    except requests.RequestException as exc:
        raise LaunchError(f"the EHR's SMART configuration could not be read ({type(exc).__name__})", 502) from None
    if response.status_code != 200:
        raise LaunchError(f"the EHR's SMART configuration answered HTTP {response.status_code}", 502)
    try:
        config = response.json()
    except ValueError:
        raise LaunchError("the EHR's SMART configuration is not JSON", 502) from None
    if not isinstance(config, dict):
        raise LaunchError("the EHR's SMART configuration is not a JSON object", 502)
    for key in ("authorization_endpoint", "token_endpoint"):
        value = config.get(key)
        if not isinstance(value, str) or not value.startswith(("https://", "http://")):
            raise LaunchError(f"the EHR's SMART configuration has no usable {key}", 502)
    methods = config.get("code_challenge_methods_supported") or []
    if "S256" not in methods:
        raise LaunchError("the EHR does not support PKCE with S256 (code_challenge_methods_supported), which this app requires", 502)
    return config


def authorization_url(settings: SmartSettings, config: dict, iss: str, launch: str, redirect_uri: str, launches: Launches) -> str:
    """Where to send the browser: the EHR's authorization endpoint with launch context and PKCE."""
    verifier = secrets.token_urlsafe(64)
    state = launches.add(
        Pending(iss=iss, token_endpoint=config["token_endpoint"], code_verifier=verifier, redirect_uri=redirect_uri, created=launches._clock())
    )
    client = OAuth2Session(settings.client_id, scope=settings.scope, redirect_uri=redirect_uri, code_challenge_method="S256")
    url, _ = client.create_authorization_url(config["authorization_endpoint"], state=state, code_verifier=verifier, launch=launch, aud=iss)
    return url


def exchange(settings: SmartSettings, pending: Pending, code: str) -> dict[str, Any]:
    """The token response for an authorization code: access_token and the launch context (patient)."""
    client = OAuth2Session(
        settings.client_id, redirect_uri=pending.redirect_uri, code_challenge_method="S256", token_endpoint_auth_method="none"
    )
    try:
        token = client.fetch_token(pending.token_endpoint, code=code, code_verifier=pending.code_verifier, timeout=settings.timeout_seconds)
    except requests.RequestException as exc:
        raise LaunchError(f"the EHR's token endpoint could not be reached ({type(exc).__name__})", 502) from None
    except Exception as exc:  # noqa: BLE001 - Authlib raises OAuthError subclasses with the server's error code
        error = getattr(exc, "error", None) or type(exc).__name__
        raise LaunchError(f"the EHR refused the authorization code ({error}): launch the app again from the EHR", 502) from None
    if not token.get("access_token"):
        raise LaunchError("the EHR's token response has no access_token", 502)
    patient = token.get("patient")
    if not isinstance(patient, str) or not patient or "/" in patient:
        raise LaunchError("the EHR's token response has no patient in its launch context (is `launch` among the app's scopes?)", 502)
    return dict(token)
