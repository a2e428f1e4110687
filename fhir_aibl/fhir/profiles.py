"""Vendor differences as data: one `VendorProfile` per kind of server.

A profile holds what fhir-aibl cannot learn from a server's CapabilityStatement, or what
it must not believe there: Epic wants `category` on every Observation search, several
servers truncate `_revinclude` without a `next` link, some refuse client-assigned ids.
What the CapabilityStatement does say (batch, `_revinclude` targets, search parameters,
conditional create) is discovered at run time and narrows a profile, never widens it:
the connector uses a feature only when the profile allows it AND the server does not
deny it, and falls back when the server refuses it at run time anyway.

The values below are the defaults shipped; they are starting points to be checked
against each site's own endpoint (vendor behaviour differs between releases and sites).
`--profile NAME` picks one; `--page-size` overrides its page size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError

#: Observation categories (http://terminology.hl7.org/CodeSystem/observation-category) that hold
#: what the rules read: DXA results (imaging, procedure), laboratory values, BMI and weight
#: (vital-signs, exam), smoking and alcohol (social-history, survey).
RULE_OBSERVATION_CATEGORIES = ("laboratory", "vital-signs", "imaging", "procedure", "social-history", "survey", "exam")


@dataclass(frozen=True)
class VendorProfile:
    name: str
    description: str
    #: `_count` asked for on every search. Large pages mean fewer round trips; servers cap it.
    page_size: int = 200
    #: Pull a patient with one batch Bundle of searches (one round trip).
    batch: bool = True
    #: Write back with one transaction per patient (atomic). Without it the writes are sent one by one.
    transaction: bool = True
    #: Pull with `Patient?_id=..&_revinclude=..` when batch is not available.
    revinclude: bool = True
    #: Observation searches must carry `category` (Epic): one search per category of `observation_categories`.
    observation_category_required: bool = False
    observation_categories: tuple[str, ...] = RULE_OBSERVATION_CATEGORIES
    #: Conditional create (`If-None-Exist`) on the CarePlan's business identifier.
    conditional_create: bool = True
    #: The server accepts `PUT Type/<id>` creating a resource with an id fhir-aibl chose (updateCreate):
    #: used to make the RiskAssessment and Provenance writes idempotent where conditional create cannot.
    client_assigned_ids: bool = True
    #: The server answers `MedicationStatement?code=..` without a patient (needed by `--all`).
    population_search: bool = True
    #: `--all` also searches `MedicationRequest?medication.code=..` (chained through the referenced
    #: Medication), where the CapabilityStatement lists the `medication` parameter: finds the
    #: patients whose drug is given only by reference. Needs population_search's patient-less search.
    chained_medication_search: bool = True
    #: Ask for the referenced Medications with `_include=<Type>:medication` on the medication
    #: searches (where the CapabilityStatement does not deny it); without it, or for what an
    #: include did not bring, the referenced Medications are read by id (`Medication?_id=..`,
    #: else one read each), once per run.
    medication_include: bool = True
    #: `--group ID` reads the members of a FHIR Group (a registry the EHR maintains).
    group_members: bool = True
    #: Send `Prefer: handling=strict`, asking the server to refuse rather than ignore an unknown search
    #: parameter (an ignored `patient=` would return everybody's data).
    strict_handling: bool = True
    #: A type the server cannot search by patient (its CapabilityStatement lists no `patient`/`subject`
    #: parameter for it): `scan` reads the whole type once per run (paged, capped by
    #: population_max_pages) and keeps each patient's own resources; `skip` leaves the type out (with
    #: a warning: family history may be missing); `fail` fails the patients.
    unsearchable: Literal["scan", "skip", "fail"] = "scan"


PROFILES: dict[str, VendorProfile] = {
    p.name: p
    for p in (
        VendorProfile(
            name="generic",
            description="Any FHIR R4 server: everything the CapabilityStatement does not deny.",
        ),
        VendorProfile(
            name="hapi",
            description="HAPI FHIR JPA server.",
            # HAPI caps _count at its configured maximum page size; 100 stays under common settings.
            page_size=100,
            # _include/_revinclude seen truncated without a next link (DESIGN.md, known traps).
            revinclude=False,
            medication_include=False,
        ),
        VendorProfile(
            name="azure",
            description="Azure Health Data Services / Azure API for FHIR.",
            page_size=100,
            revinclude=False,  # truncated without a next link (DESIGN.md, known traps)
            medication_include=False,
        ),
        VendorProfile(
            name="google",
            description="Google Cloud Healthcare API FHIR store.",
            page_size=100,
            # PUT-create needs enableUpdateCreate on the store, which is off by default.
            client_assigned_ids=False,
        ),
        VendorProfile(
            name="epic",
            description="Epic on FHIR (R4).",
            page_size=100,
            batch=False,
            transaction=False,
            revinclude=False,
            observation_category_required=True,
            conditional_create=False,
            client_assigned_ids=False,
            # Epic searches are patient-scoped; a population comes from a Group (Bulk Data) or a list of ids.
            population_search=False,
            chained_medication_search=False,
            # Epic answers a MedicationRequest search with the referenced Medications beside the
            # requests (search.mode include) on its own; they are read from any search answer, and
            # what is missing is read by id. Not asked with _include (not in every release).
            medication_include=False,
        ),
        VendorProfile(
            name="oracle",
            description="Oracle Health (Cerner Millennium) FHIR R4.",
            page_size=100,
            batch=False,
            transaction=False,
            revinclude=False,
            conditional_create=False,
            client_assigned_ids=False,
            population_search=False,
            chained_medication_search=False,
            # Oracle Health mostly sends the drug as a contained Medication; a referenced one is read by id.
            medication_include=False,
        ),
    )
}


def get_profile(name: str) -> VendorProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown server profile {name!r}; known: {', '.join(sorted(PROFILES))}") from None
