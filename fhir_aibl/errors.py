"""One exception hierarchy for fhir-aibl, each with a stable error code.

    AiblError                      code
    ├── RulesError                 rules-invalid      a rule file or value set cannot be loaded or compiled
    ├── EvaluationError            evaluation-failed  the engine failed while evaluating one patient
    └── InputError                 input-invalid      input that is not usable FHIR
        ├── NotJsonError           not-json           a file or line is not JSON
        ├── NotFhirError           not-fhir           JSON that is not a FHIR resource or Bundle
        ├── InvalidResourceError   resource-invalid   a resource fails FHIR R4 validation
        ├── NoUsableDataError      no-usable-data     a patient group with nothing to assess
        └── PatientMissingError    patient-missing    no usable Patient resource: assessed with age unknown

Code facing HTTP or FHIR turns these into an OperationOutcome (see `operation_outcome`)
or a 4xx with the reason; the command line prints them one per line and carries on.
"""

from __future__ import annotations


class AiblError(Exception):
    code = "error"
    #: OperationOutcome.issue.code (FHIR R4 issue-type value set)
    issue_type = "exception"

    def __init__(self, message: str, *, source: str | None = None, resource: str | None = None):
        super().__init__(message)
        self.message = message
        self.source = source
        self.resource = resource

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.source, self.resource) if part)
        return f"{where}: {self.message}" if where else self.message

    def operation_outcome(self) -> dict:
        issue: dict = {
            "severity": "error",
            "code": self.issue_type,
            "details": {"coding": [{"system": "urn:fhir-aibl:error", "code": self.code}], "text": self.message},
            "diagnostics": str(self),
        }
        if self.resource:
            issue["expression"] = [self.resource]
        return {"resourceType": "OperationOutcome", "issue": [issue]}


class RulesError(AiblError):
    code = "rules-invalid"
    issue_type = "invariant"


class EvaluationError(AiblError):
    code = "evaluation-failed"
    issue_type = "exception"


class InputError(AiblError):
    code = "input-invalid"
    issue_type = "invalid"


class NotJsonError(InputError):
    code = "not-json"
    issue_type = "structure"


class NotFhirError(InputError):
    code = "not-fhir"
    issue_type = "structure"


class InvalidResourceError(InputError):
    code = "resource-invalid"
    issue_type = "invalid"
    #: the resource without its invalid elements, read in its place (fhir_aibl.validation.salvage), or None
    salvaged: dict | None = None


class NoUsableDataError(InputError):
    code = "no-usable-data"
    issue_type = "not-found"


class PatientMissingError(InputError):
    """The record has no usable Patient resource (absent, refers to no Patient, or invalid).

    Not fatal: the patient is still assessed, with age and sex unknown (flag `age-unknown`,
    never a category lower than the data could support); this error names the gap.
    """

    code = "patient-missing"
    issue_type = "not-found"
