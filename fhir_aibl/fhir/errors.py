"""The connector's exceptions, each with a stable error code (`fhir_aibl.errors.AiblError` below them all).

    AiblError (fhir_aibl.errors)
    └── FhirError                    fhir-error           anything the FHIR connector could not do
        ├── ConfigError              fhir-config          a setting that cannot work (bad base URL, unknown profile)
        ├── AuthError                fhir-auth            no usable credentials, or the server refused them
        │   └── TokenError           fhir-token           the SMART token endpoint refused or answered nonsense
        ├── TransportError           fhir-transport       no whole HTTP answer: refused, reset, DNS, cut short
        │   ├── RequestTimeout       fhir-timeout         no answer within the configured timeout
        │   └── BadResponse          fhir-bad-response    a 2xx answer that is not JSON, or not the FHIR asked for
        ├── ServerError              fhir-http            an HTTP error status; `.status`, `.diagnostics`, `.outcome`
        │   ├── BadRequest           fhir-bad-request     400, 422: the server refused the request as invalid
        │   ├── Forbidden            fhir-forbidden       403
        │   ├── NotFound             fhir-not-found       404, 410
        │   ├── Conflict             fhir-conflict        409, 412: a version conflict (If-Match) or several matches
        │   ├── RateLimited          fhir-rate-limited    429 after every retry, or a Retry-After beyond the ceiling
        │   └── Unavailable          fhir-unavailable     500, 502, 503, 504 after every retry
        ├── UnsafeResponse           fhir-unsafe          an answer fhir-aibl refuses to use
        │   ├── ForeignLink          fhir-foreign-link    a paging link to another origin (would leak the token)
        │   ├── PageLimit            fhir-page-limit      more pages than the configured cap
        │   ├── IgnoredParameter     fhir-ignored-param   the server says it ignored a search parameter
        │   └── CrossPatient         fhir-cross-patient   a patient's search returned another patient's data
        ├── NotSupported             fhir-not-supported   the server (or its profile) cannot do what is needed
        └── WriteBackError           fhir-write-back      a write-back transaction could not be built or applied

Every one turns into an OperationOutcome with `.operation_outcome()` (from AiblError); a
ServerError keeps the server's own OperationOutcome in `.outcome` and its diagnostics in
the message, so that the reason a server gave reaches the user unchanged.
"""

from __future__ import annotations

from typing import Any

from ..errors import AiblError


class FhirError(AiblError):
    code = "fhir-error"
    issue_type = "exception"


class ConfigError(FhirError):
    code = "fhir-config"
    issue_type = "invalid"


class AuthError(FhirError):
    code = "fhir-auth"
    issue_type = "login"


class TokenError(AuthError):
    code = "fhir-token"
    issue_type = "login"


class TransportError(FhirError):
    code = "fhir-transport"
    issue_type = "transient"


class RequestTimeout(TransportError):
    code = "fhir-timeout"
    issue_type = "timeout"


class BadResponse(TransportError):
    """An answer that arrived but cannot be used (not JSON, not the resource asked for): as for
    a body cut short, the exchange failed, and an idempotent request is tried again."""

    code = "fhir-bad-response"
    issue_type = "transient"


class ServerError(FhirError):
    code = "fhir-http"
    issue_type = "exception"

    def __init__(
        self,
        message: str,
        *,
        status: int,
        diagnostics: str = "",
        outcome: dict | None = None,
        retry_after: float | None = None,
        source: str | None = None,
        resource: str | None = None,
    ):
        super().__init__(message, source=source, resource=resource)
        self.status = status
        self.diagnostics = diagnostics
        self.outcome = outcome
        self.retry_after = retry_after


class BadRequest(ServerError):
    code = "fhir-bad-request"
    issue_type = "invalid"


class Forbidden(ServerError):
    code = "fhir-forbidden"
    issue_type = "forbidden"


class NotFound(ServerError):
    code = "fhir-not-found"
    issue_type = "not-found"


class Conflict(ServerError):
    code = "fhir-conflict"
    issue_type = "conflict"


class RateLimited(ServerError):
    code = "fhir-rate-limited"
    issue_type = "throttled"


class Unavailable(ServerError):
    code = "fhir-unavailable"
    issue_type = "transient"


class UnsafeResponse(FhirError):
    code = "fhir-unsafe"
    issue_type = "security"


class ForeignLink(UnsafeResponse):
    code = "fhir-foreign-link"


class PageLimit(UnsafeResponse):
    code = "fhir-page-limit"
    issue_type = "too-costly"


class IgnoredParameter(UnsafeResponse):
    code = "fhir-ignored-param"
    issue_type = "not-supported"


class CrossPatient(UnsafeResponse):
    code = "fhir-cross-patient"


class NotSupported(FhirError):
    code = "fhir-not-supported"
    issue_type = "not-supported"


class WriteBackError(FhirError):
    code = "fhir-write-back"
    issue_type = "processing"


def _status_class(status: int) -> type[ServerError]:
    if status in (400, 422):
        return BadRequest
    if status == 401:
        return ServerError  # turned into AuthError by the caller, who knows whether it re-authenticated
    if status == 403:
        return Forbidden
    if status in (404, 410):
        return NotFound
    if status in (409, 412):
        return Conflict
    if status == 429:
        return RateLimited
    if status >= 500:
        return Unavailable
    return ServerError


def outcome_diagnostics(outcome: Any) -> str:
    """The human-readable text of an OperationOutcome: each issue's diagnostics or details.text."""
    if not isinstance(outcome, dict) or outcome.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in outcome.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or ((issue.get("details") or {}).get("text")) or issue.get("code") or ""
        severity = issue.get("severity")
        parts.append(f"{severity}: {text}" if severity and text else str(text))
    return "; ".join(p for p in parts if p)


def server_error(status: int, reason: str, body: Any, *, what: str, retry_after: float | None = None) -> ServerError:
    """The typed error for an HTTP error answer; `what` says which request it was (no patient data)."""
    outcome = body if isinstance(body, dict) and body.get("resourceType") == "OperationOutcome" else None
    diagnostics = outcome_diagnostics(outcome)
    message = f"{what}: HTTP {status} {reason}".rstrip()
    if diagnostics:
        message += f": {diagnostics}"
    cls = _status_class(status)
    return cls(message, status=status, diagnostics=diagnostics, outcome=outcome, retry_after=retry_after)
