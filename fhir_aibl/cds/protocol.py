"""The CDS Hooks 2.0 wire format this service reads: hook requests and feedback, validated.

Field names and cardinalities follow the specification and the HL7 logical models
(CDSHooksRequest, CDSHook*Context). Unknown members are allowed where the specification
allows extensions. Validation errors name the member, never echo its value: a request
carries patient data.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import BadRequestError
from .prefetch import ID_RE


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class FhirAuthorization(_Open):
    access_token: str = Field(min_length=1)
    token_type: str
    expires_in: int | None = None
    scope: str | None = None
    subject: str | None = None
    patient: str | None = None

    @field_validator("token_type")
    @classmethod
    def _bearer(cls, value: str) -> str:
        if value.lower() != "bearer":
            raise ValueError("token_type must be Bearer")
        return value


class HookRequest(_Open):
    hook: str = Field(min_length=1)
    hookInstance: str = Field(min_length=1)
    fhirServer: str | None = None
    fhirAuthorization: FhirAuthorization | None = None
    context: dict[str, Any]
    prefetch: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _auth_needs_server(self) -> "HookRequest":
        # CDSHooksRequest invariant: fhirAuthorization.exists() implies fhirServer.exists()
        if self.fhirAuthorization is not None and not self.fhirServer:
            raise ValueError("fhirAuthorization needs fhirServer")
        return self

    @property
    def patient_id(self) -> str:
        return self.context["patientId"]

    @property
    def access_token(self) -> str | None:
        return self.fhirAuthorization.access_token if self.fhirAuthorization else None


def _problems(exc: ValidationError) -> str:
    out = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "(request)"
        out.append(f"{where}: {err['msg']}")
    return "; ".join(out[:5])


def parse_hook_request(data: Any, hook: str) -> HookRequest:
    """A validated request for `hook`, or BadRequestError with the reason."""
    if not isinstance(data, dict):
        raise BadRequestError("the request body must be a JSON object")
    try:
        request = HookRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(f"invalid CDS Hooks request: {_problems(exc)}") from None
    if request.hook != hook:
        raise BadRequestError(f"this service answers the {hook} hook, not {request.hook!r}")
    patient_id = request.context.get("patientId")
    if not isinstance(patient_id, str) or not patient_id:
        raise BadRequestError("context.patientId is required")
    if not ID_RE.match(patient_id):
        raise BadRequestError("context.patientId is not a FHIR id")
    if hook == "order-select":
        drafts = request.context.get("draftOrders")
        if not isinstance(drafts, dict) or drafts.get("resourceType") != "Bundle":
            raise BadRequestError("context.draftOrders (a FHIR Bundle) is required for order-select")
        selections = request.context.get("selections", [])
        if not isinstance(selections, list) or not all(isinstance(s, str) for s in selections):
            raise BadRequestError("context.selections must be a list of references")
    return request


# --------------------------------------------------------------------------- feedback


class Coding(BaseModel):
    model_config = ConfigDict(extra="allow")
    system: str = Field(min_length=1)
    code: str = Field(min_length=1)
    display: str | None = None


class OverrideReason(_Open):
    reason: Coding | None = None
    userComment: str | None = Field(default=None, max_length=4000)


class AcceptedSuggestion(_Open):
    id: str = Field(min_length=1)


class FeedbackEntry(_Open):
    card: str
    outcome: Literal["accepted", "overridden"]
    outcomeTimestamp: dt.datetime
    acceptedSuggestions: list[AcceptedSuggestion] | None = None
    overrideReason: OverrideReason | None = None

    @field_validator("card")
    @classmethod
    def _uuid(cls, value: str) -> str:
        try:
            uuid.UUID(value)
        except ValueError:
            raise ValueError("card must be the uuid of a card") from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "FeedbackEntry":
        if self.outcome == "accepted":
            if not self.acceptedSuggestions:
                raise ValueError("an accepted outcome needs acceptedSuggestions")
            if self.overrideReason is not None:
                raise ValueError("overrideReason belongs to an overridden outcome")
        elif self.acceptedSuggestions:
            raise ValueError("acceptedSuggestions belong to an accepted outcome")
        return self


class FeedbackRequest(_Open):
    feedback: list[FeedbackEntry] = Field(min_length=1, max_length=100)


def parse_feedback(data: Any) -> FeedbackRequest:
    if not isinstance(data, dict):
        raise BadRequestError("the feedback body must be a JSON object")
    try:
        return FeedbackRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequestError(f"invalid feedback: {_problems(exc)}") from None
