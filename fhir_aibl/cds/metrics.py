"""Prometheus metrics of the CDS Hooks service, served at GET /metrics (prometheus_client).

Every name starts with `fhir_aibl_cds_`. Labels are bounded sets (service ids, hooks, HTTP
statuses, card indicators, reasons named in code): never a patient, a URL from a request or
free text.

    requests_total{service,hook,status}        hook calls answered, by HTTP status
    request_duration_seconds{hook}             their latency (histogram), arrival to answer
    cards_total{hook,indicator}                cards answered, by indicator (info/warning/critical)
    suppressed_cards_total{kind}               cards not shown because the clinician overrode them
    prefetch_fallbacks_total{outcome}          missing prefetch: fetched, failed, refused (no
                                               fhirServer or not on the allowlist)
    resources_dropped_total{reason}            prefetched resources not used: other-patient, invalid
    jwt_rejections_total{reason}               401s by the check that failed (auth.py)
    admission_refusals_total                   503s before any work: too many calls in progress
    feedback_total{outcome}                    feedback items stored (accepted, overridden)
    in_flight                                  hook calls in progress (summed over workers)
    ruleset_info{ruleset,version}              1 for the ruleset each worker serves

With several worker processes (`fhir-aibl serve --workers N`) each writes its values to
files in `PROMETHEUS_MULTIPROC_DIR` (set by the command before the workers start, emptied at
start) and /metrics sums them, so any worker's answer covers all of them.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_P = "fhir_aibl_cds_"

REQUESTS = Counter(_P + "requests", "CDS hook calls answered, by HTTP status", ["service", "hook", "status"])
LATENCY = Histogram(
    _P + "request_duration_seconds",
    "CDS hook call latency, from arrival to answer",
    ["hook"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
)
CARDS = Counter(_P + "cards", "cards answered, by indicator", ["hook", "indicator"])
SUPPRESSED = Counter(_P + "suppressed_cards", "cards not shown because a clinician overrode them", ["kind"])
FALLBACKS = Counter(_P + "prefetch_fallbacks", "missing prefetch keys: queried from fhirServer or refused", ["outcome"])
DROPPED = Counter(_P + "resources_dropped", "prefetched resources not used", ["reason"])
JWT_REJECTIONS = Counter(_P + "jwt_rejections", "requests refused (401) by the JWT check that failed", ["reason"])
ADMISSION_REFUSALS = Counter(_P + "admission_refusals", "hook calls refused (503) before any work: service saturated")
FEEDBACK = Counter(_P + "feedback", "feedback items stored, by outcome", ["outcome"])
IN_FLIGHT = Gauge(_P + "in_flight", "hook calls in progress", multiprocess_mode="livesum")
RULESET = Gauge(_P + "ruleset_info", "the ruleset served (value 1)", ["ruleset", "version"], multiprocess_mode="max")


def exposition() -> tuple[bytes, str]:
    """The text exposition of every metric, of all worker processes when there are several."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Forget a stopped worker's live gauges (its counters stay in the sums)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
