"""The CDS Hooks 2.0 service of fhir-aibl (`fhir-aibl serve`).

    app.py        create_app(settings): discovery, hooks, feedback; pools, deadline, size limit
    settings.py   typed settings with defaults, loaded from YAML/JSON (load_settings, settings_for_tests)
    protocol.py   the CDS Hooks request and feedback shapes, validated
    prefetch.py   prefetch templates; sorting the prefetch; one patient's resources only
    validation.py which prefetched resources are validated (those facts.py can read), and how
    fhirfetch.py  the fallback FHIR query: allowlist, bearer token, time budget
    auth.py       JWT verification: issuers, jku allowlist, JWKS cache, claims, jti replay
    cards.py      Assessment -> cards (assessment, treatment, safety) with suggestions
    fhirjson.py   the cards' R4B resources as JSON (model_dump_json's output, faster)
    safety.py     safety.yaml: findings that block drugs (critical cards, no suggestion)
    feedback.py   SQLite store of issued cards and feedback; suppression of overridden cards
    samples.py    sample requests from FHIR Bundles (tests, benchmarks, README)
    command.py    `fhir-aibl serve` (add_arguments, run)
    errors.py     the service's errors, each with an HTTP status and a stable code
"""

from .app import CdsService, create_app
from .samples import order_select_request, patient_view_request
from .settings import Settings, load_settings, settings_for_tests

__all__ = [
    "CdsService",
    "Settings",
    "create_app",
    "load_settings",
    "order_select_request",
    "patient_view_request",
    "settings_for_tests",
]
