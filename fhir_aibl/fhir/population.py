"""Select the population: every patient with an active or intended aromatase-inhibitor
MedicationStatement or MedicationRequest, found by code search with paging.

The codes are not a list in Python: they are the concepts of class `aromatase-inhibitor`
in `rules/valuesets/medications.yaml` (ingredients, products, brands, ATC), the same value
set the rules read, so adding a product code there widens the population too.

The search sends the codes without their system (`code=84857,199224,...`): real data
spells the RxNorm and ATC systems several ways (`urn:oid:2.16.840.1.113883.6.88`, a
trailing slash, ...; `systems.yaml`), and a code-only token matches all of them. Every
resource found is then checked here against the value set with its system (through the
aliases), its status and its patient reference, so a code that means something else in
another system never selects anybody.

Statuses (CLINICAL.md section 0: `active` includes `on-hold`; `planned` is intended or
ordered, not started): MedicationStatement active, on-hold, intended; MedicationRequest
active, on-hold, draft (an active request whose intent is a proposal or plan is an
intended one and is already covered by `active`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..terminology import Terminology
from .client import FhirClient, SearchSpec, escape_token
from .errors import NotSupported
from .pull import patient_of

log = logging.getLogger("fhir_aibl.fhir")

AI_CLASS = "aromatase-inhibitor"
STATEMENT_STATUSES = ("active", "on-hold", "intended")
REQUEST_STATUSES = ("active", "on-hold", "draft")


def ai_concepts(terminology: Terminology) -> list[tuple[str, str]]:
    """(system, code) of every aromatase-inhibitor concept of the medications value set."""
    vs = terminology.valueset("medications")
    concepts = list(vs.exact.values()) + list(vs.prefixes)
    found = sorted({(c.system, c.code) for c in concepts if c.get("class") == AI_CLASS})
    if not found:
        raise NotSupported("the medications value set has no aromatase-inhibitor concept: nobody could be selected")
    prefixed = [c.code for c in vs.prefixes if c.get("class") == AI_CLASS]
    if prefixed:  # a token search cannot say "starts with"
        log.warning("aromatase-inhibitor codes with match: prefix are searched as exact codes: %s", ", ".join(prefixed))
    return found


@dataclass
class Population:
    patient_ids: list[str]
    #: HTTP requests the selection took
    requests: int = 0
    #: resources found by the code search that the value-set check turned down, with why
    rejected: list[str] = field(default_factory=list)


def select_population(
    client: FhirClient,
    terminology: Terminology,
    *,
    statement_statuses: Iterable[str] = STATEMENT_STATUSES,
    request_statuses: Iterable[str] = REQUEST_STATUSES,
) -> Population:
    if not client.profile.population_search:
        raise NotSupported(
            f"the {client.profile.name} profile cannot search medications without a patient; "
            "select patients with --patient"
        )
    before = client.stats.requests
    statement_statuses, request_statuses = tuple(statement_statuses), tuple(request_statuses)
    allowed = {"MedicationStatement": statement_statuses, "MedicationRequest": request_statuses}
    concepts = ai_concepts(terminology)
    codes = ",".join(escape_token(code) for code in dict.fromkeys(code for _, code in concepts))
    count = ("_count", str(client.profile.page_size))
    searches = [
        SearchSpec("MedicationStatement", (("code", codes), ("status", ",".join(statement_statuses)), count)),
        SearchSpec("MedicationRequest", (("code", codes), ("status", ",".join(request_statuses)), count)),
    ]
    ids: set[str] = set()
    rejected: list[str] = []
    for spec in searches:
        for resource in client.search(spec, max_pages=client.settings.population_max_pages):
            label = f"{resource.get('resourceType')}/{resource.get('id')}"
            if resource.get("resourceType") != spec.resource_type:
                continue  # an _include the server added on its own
            code = resource.get("medicationCodeableConcept")
            hits = [c for c in terminology.match("medications", code) if c.get("class") == AI_CLASS]
            if not hits:
                rejected.append(f"{label}: code not an aromatase inhibitor in its system")
                continue
            if resource.get("status") not in allowed[spec.resource_type]:
                rejected.append(f"{label}: status {resource.get('status')}")
                continue
            pid = patient_of(resource, client.base_url)
            if pid is None:
                rejected.append(f"{label}: names no patient on this server")
                continue
            ids.add(pid)
    return Population(patient_ids=sorted(ids), requests=client.stats.requests - before, rejected=rejected)
