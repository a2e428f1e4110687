"""Errors of the CDS Hooks service, each with a stable code and the HTTP status it answers with.

    AiblError (fhir_aibl.errors)
    └── CdsError                    cds-error           500
        ├── BadRequestError         cds-bad-request     400  malformed JSON, missing context, wrong hook, bad feedback
        ├── UnknownServiceError     cds-unknown-service 404  no service with that id
        ├── UnknownCardError        cds-unknown-card    404  feedback about a card this service never issued
        ├── PayloadTooLargeError    cds-too-large       413  request body above `max_request_bytes`
        ├── UnsupportedMediaTypeError cds-media-type    415  a request body whose Content-Type is not JSON
        ├── UnauthorizedError       cds-unauthorized    401  JWT missing or rejected (the reason says which check)
        ├── PrefetchUnavailableError cds-data-unavailable 412 data the assessment cannot do without cannot be had
        ├── BusyError               cds-busy            503  the worker pool and its queue are full
        └── DeadlineExceededError   cds-deadline        503  the per-request deadline passed

Every error answers with an OperationOutcome body (`operation_outcome()`), whose
`issue[0].details.coding[0].code` is the stable code and `details.text` the reason.
Reasons never carry patient data: they name prefetch keys, checks and limits, never
identifiers or clinical values.
"""

from __future__ import annotations

from ..errors import AiblError


class CdsError(AiblError):
    code = "cds-error"
    issue_type = "exception"
    status = 500


class BadRequestError(CdsError):
    code = "cds-bad-request"
    issue_type = "invalid"
    status = 400


class UnknownServiceError(CdsError):
    code = "cds-unknown-service"
    issue_type = "not-found"
    status = 404


class UnknownCardError(CdsError):
    code = "cds-unknown-card"
    issue_type = "not-found"
    status = 404


class PayloadTooLargeError(CdsError):
    code = "cds-too-large"
    issue_type = "too-costly"
    status = 413


class UnsupportedMediaTypeError(CdsError):
    code = "cds-media-type"
    issue_type = "not-supported"
    status = 415


class UnauthorizedError(CdsError):
    code = "cds-unauthorized"
    issue_type = "security"
    status = 401


class PrefetchUnavailableError(CdsError):
    code = "cds-data-unavailable"
    issue_type = "incomplete"
    status = 412


class BusyError(CdsError):
    code = "cds-busy"
    issue_type = "transient"
    status = 503


class DeadlineExceededError(CdsError):
    code = "cds-deadline"
    issue_type = "timeout"
    status = 503
