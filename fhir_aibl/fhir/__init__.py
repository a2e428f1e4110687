"""The FHIR R4 REST connector: pull patients from a FHIR server, select the population,
write CarePlans back (see docs/connector.md).

    client.py      FhirClient: read, search + paging, batch, transaction, conditional writes,
                   CapabilityStatement discovery (SearchSpec builds queries, no I/O)
    http.py        Http: the one HTTP seam (timeouts, retries, Retry-After, 401 re-auth, origin checks)
    auth.py        bearer token (file or FHIR_AIBL_TOKEN), SMART Backend Services (RS384/ES384)
    profiles.py    vendor differences as data (generic, hapi, azure, google, epic, oracle)
    settings.py    typed settings with documented defaults
    pull.py        one patient's record in as few round trips as the server allows
    population.py  patients with an active or intended aromatase inhibitor, by code search
    writeback.py   CarePlan + RiskAssessment + Provenance, one idempotent transaction per patient
    runner.py      a run: select, pull, assess, write; one outcome per patient
    command.py     `fhir-aibl run` (add_arguments, run)
    errors.py      the connector's exceptions, with stable codes
"""

from .client import Capabilities, FhirClient, SearchSpec
from .errors import FhirError
from .profiles import PROFILES, VendorProfile, get_profile
from .pull import PatientPull, Puller
from .runner import PatientOutcome, Runner, RunReport
from .settings import ClientSettings, RetrySettings

__all__ = [
    "PROFILES",
    "Capabilities",
    "ClientSettings",
    "FhirClient",
    "FhirError",
    "PatientOutcome",
    "PatientPull",
    "Puller",
    "RetrySettings",
    "RunReport",
    "Runner",
    "SearchSpec",
    "VendorProfile",
    "get_profile",
]
