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

A drug given only by reference (`medicationReference` to a Medication) has no code on the
MedicationStatement/Request, so the code search cannot find it. Where the profile allows it
and the CapabilityStatement lists the `medication` search parameter, `MedicationRequest` and
`MedicationStatement` are also searched by the chained `medication.code=..`; the Medications
come along by `_include` where the server declares it, else are read by id, and the same
value-set check runs on the Medication's codes and ingredients (fhir_aibl/references.py).

Servers that allow none of this (Epic, Oracle Health: searches are patient-scoped) select
patients another way: `group_members` (`--group ID`, the members of a FHIR Group such as an
oncology registry the EHR maintains) or `read_patients_file` (`--patients-file FILE`, one
id per line). `--all` on such a server stops with a message naming them.

Statuses (docs/clinical-specification.md section 0: `active` includes `on-hold`; `planned` is intended or
ordered, not started): MedicationStatement active, on-hold, intended; MedicationRequest
active, on-hold, draft (an active request whose intent is a proposal or plan is an
intended one and is already covered by `active`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from pathlib import Path

from ..errors import AiblError
from ..facts import medication_reading
from ..references import MedicationIndex, parse_reference
from ..terminology import Terminology
from .client import FhirClient, SearchSpec, escape_token
from .errors import ConfigError, NotSupported
from .pull import _ID_RE, patient_reference

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
    #: what the run reports as warnings: an aromatase inhibitor whose patient could not be
    #: selected, or was selected from a reference on another base
    warnings: list[str] = field(default_factory=list)


ALTERNATIVES = "--group ID (the members of a FHIR Group), --patients-file FILE (one patient id per line) or --patient ID ..."


def _chained(client: FhirClient, rtype: str) -> bool:
    """`<rtype>?medication.code=..` where the profile allows it and the server lists `medication`."""
    return client.profile.chained_medication_search and client.capabilities().search_param(rtype, "medication") is True


def select_population(
    client: FhirClient,
    terminology: Terminology,
    *,
    statement_statuses: Iterable[str] = STATEMENT_STATUSES,
    request_statuses: Iterable[str] = REQUEST_STATUSES,
) -> Population:
    if not client.profile.population_search:
        raise NotSupported(
            f"the {client.profile.name} profile cannot search medications without a patient (neither by code "
            f"nor through the referenced Medication); select patients with {ALTERNATIVES}"
        )
    client.capabilities()  # read once per run (the runner has, before this); not counted as selection
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
    for rtype, statuses in (("MedicationStatement", statement_statuses), ("MedicationRequest", request_statuses)):
        if _chained(client, rtype):
            spec = SearchSpec(rtype, (("medication.code", codes), ("status", ",".join(statuses)), count))
            if client.profile.medication_include and client.capabilities().include(rtype, f"{rtype}:medication") is True:
                spec = spec.with_params(("_include", f"{rtype}:medication"))
            searches.append(spec)
    ids: set[str] = set()
    rejected: list[str] = []
    warnings: list[str] = []
    found: list[tuple[str, dict]] = []
    medications = MedicationIndex()
    for spec in searches:
        for resource in client.search(spec, max_pages=client.settings.population_max_pages):
            if medications.add(resource):
                continue  # an included Medication
            if resource.get("resourceType") != spec.resource_type:
                continue  # an _include the server added on its own
            found.append((spec.resource_type, resource))
    _read_missing(client, medications, [r for _, r in found])
    for rtype, resource in found:
        label = f"{resource.get('resourceType')}/{resource.get('id')}"
        reading = medication_reading(medications.inline(resource), terminology)
        if reading is None or (reading[2] != "unresolved" and reading[0].get("class") != AI_CLASS):
            rejected.append(f"{label}: code not an aromatase inhibitor in its system")
            continue
        # "unresolved": the server matched medication.code but its Medication cannot be read back:
        # selected (the pull flags it medication-unresolved), never dropped on a guess.
        if resource.get("status") not in allowed[rtype]:
            rejected.append(f"{label}: status {resource.get('status')}")
            continue
        pid, elsewhere = patient_reference(resource, client.base_url)
        if elsewhere:
            # never hidden on a guess: the pull asks the server for this patient's own records
            warnings.append(
                f"{label}: an aromatase inhibitor for Patient/{pid} on another base; Patient/{pid} of this "
                "server is assessed (its records are those the server answers for it)"
            )
        if pid is None:
            warnings.append(f"{label}: an aromatase inhibitor that names no patient on this server: nobody selected by it")
            continue
        ids.add(pid)
    return Population(patient_ids=sorted(ids), requests=client.stats.requests - before, rejected=rejected,
                      warnings=warnings)


def _read_missing(client: FhirClient, medications: MedicationIndex, resources: list[dict]) -> None:
    """Read the Medications the found resources reference and no `_include` brought (by `_id`, 50 at a time)."""
    wanted = sorted({rid for r in resources for rtype, rid in medications.unresolved(r) if rtype == "Medication"})
    if not wanted:
        return
    if client.capabilities().search_param("Medication", "_id") is False:
        for rid in wanted:
            try:
                medications.add(client.read("Medication", rid))
            except AiblError:
                continue  # stays unresolved: the patient is selected and flagged
        return
    for i in range(0, len(wanted), 50):
        spec = SearchSpec("Medication", (("_id", ",".join(wanted[i : i + 50])), ("_count", "50")))
        medications.add_all(client.search(spec))


def group_members(client: FhirClient, group_id: str) -> Population:
    """The patients of a FHIR Group (`GET Group/<id>`): active members that are Patients on this server.

    Members that are not Patients, inactive, or on another server are left out, each with the
    reason in `rejected`.
    """
    if not client.profile.group_members:
        raise NotSupported(f"the {client.profile.name} profile cannot read Group members; use --patients-file FILE or --patient ID ...")
    if not _ID_RE.match(group_id or ""):
        raise ConfigError(f"not a FHIR resource id (1-64 of A-Z a-z 0-9 - .): {group_id!r}")
    before = client.stats.requests
    group = client.read("Group", group_id)
    if not isinstance(group, dict) or group.get("resourceType") != "Group":
        raise NotSupported(f"Group/{group_id}: the server answered no Group")
    ids: list[str] = []
    rejected: list[str] = []
    base = client.base_url.rstrip("/") + "/"
    for n, member in enumerate(group.get("member") or []):
        entity = (member or {}).get("entity") if isinstance(member, dict) else None
        value = entity.get("reference") if isinstance(entity, dict) else None
        target = parse_reference(value)
        label = f"Group/{group_id} member[{n}]"
        if member.get("inactive") is True:
            rejected.append(f"{label}: inactive")
        elif target is None or target[0] != "Patient":
            rejected.append(f"{label}: not a Patient reference")
        elif str(value).startswith(("http://", "https://")) and not str(value).startswith(base):
            rejected.append(f"{label}: a Patient on another server")
        elif target[1] not in ids:
            ids.append(target[1])
    return Population(patient_ids=ids, requests=client.stats.requests - before, rejected=rejected)


def read_patients_file(path: Path) -> list[str]:
    """Patient ids, one per line (`Patient/<id>` accepted); blank lines and `#` comments skipped.

    A line that is not a FHIR id stops the run with its line number: a wrong file must not
    silently assess nobody, or somebody else.
    """
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the patients file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    ids: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        item = line.split("#", 1)[0].strip()
        if not item:
            continue
        if item.startswith("Patient/"):
            item = item[len("Patient/") :]
        if not _ID_RE.match(item):
            raise ConfigError(f"{path}:{lineno}: not a patient id (1-64 of A-Z a-z 0-9 - .): {item[:80]!r}")
        if item not in ids:
            ids.append(item)
    if not ids:
        raise ConfigError(f"{path}: no patient id in the file")
    return ids
