"""References: how every input path follows a FHIR reference, in one place.

The file source (`sources.py`), the CDS Hooks prefetch (`cds/prefetch.py`) and the FHIR
connector (`fhir/pull.py`) all meet the same reference forms, and all resolve them here:

- relative `Type/id`, and versioned `Type/id/_history/v` (the version is dropped: evidence
  carries versions through `meta.versionId`);
- absolute `https://server/fhir/Type/id[/_history/v]`: the trailing `Type/id` is taken;
- `urn:uuid:...` / `urn:oid:...`: resolved through the `fullUrl`s of the entries of the same
  Bundle (`fullurl_index`), and meaningless outside it;
- `#id`: a resource contained in the referring resource.

Medications (`MedicationIndex`): a MedicationStatement, MedicationRequest or
MedicationAdministration may name its drug with `medicationReference` to a Medication held
elsewhere in the same input: a Bundle entry, a line of an NDJSON Medication file, an
`_include`d search result. A Medication names no patient, so it cannot travel with one; the
index holds the Medications of a whole input (any order: it is filled before anything is
resolved), and `inline` gives each referring resource a copy in which the Medication is
*contained* and `medicationReference` points to it (`#<id>`). The facts stage then reads
exactly one form (a contained Medication, its code and its ingredients), the FHIR R4 models
validate it as one resource, and the patient's record stays self-contained. A Medication's
`ingredient.itemReference` to another Medication or a Substance is contained the same way.

A reference that does not resolve is left as it is: the facts stage reports it as the data
flag `medication-unresolved` (never "not on an aromatase inhibitor" in silence).

Memory: the file source may meet a Bulk export with a Medication per order. The index keeps
in full (trimmed to what the facts read: code, ingredient, meta) only the Medications that
`keep` says matter (a drug of a class the rules read, or an ingredient reference to follow);
of the others it keeps a 64-bit hash of `Type/id`, enough to know the reference resolved to a
drug the rules do not read.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

__all__ = [
    "MEDICATION_USE_TYPES",
    "MedicationIndex",
    "fullurl_index",
    "medication_reference",
    "normalise_medication_reference",
    "parse_reference",
    "urn_id",
]

#: Resources that name a drug by `medication[x]`.
MEDICATION_USE_TYPES = frozenset({"MedicationStatement", "MedicationRequest", "MedicationAdministration"})
#: What a medicationReference / itemReference can point at and the index holds.
MEDICATION_TYPES = frozenset({"Medication", "Substance"})
#: The parts of a Medication or Substance the facts stage reads (and the models need).
_KEPT = ("resourceType", "id", "meta", "code", "ingredient")

URN_PREFIXES = ("urn:uuid:", "urn:oid:")
# `Type/id` at the end of a relative or absolute reference, optionally `/_history/<vid>`.
# Ids follow the FHIR R4 id datatype: [A-Za-z0-9\-\.]{1,64}.
REF_RE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?/?$"
)


def urn_id(full_url: Any) -> str | None:
    """The uuid or oid of a `urn:uuid:` / `urn:oid:` fullUrl, else None."""
    if isinstance(full_url, str):
        for prefix in URN_PREFIXES:
            if full_url.startswith(prefix) and len(full_url) > len(prefix):
                return full_url[len(prefix) :]
    return None


def fullurl_index(entries: list) -> dict[str, tuple[str, str]]:
    """fullUrl -> (resourceType, id) of a Bundle's entries: how `urn:uuid:` references resolve.

    An entry without an id takes the uuid/oid of its `urn:` fullUrl (a transaction's POST).
    """
    urns: dict[str, tuple[str, str]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        full_url, resource = entry.get("fullUrl"), entry.get("resource")
        if isinstance(full_url, str) and isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            rid = resource.get("id") if isinstance(resource.get("id"), str) else urn_id(full_url)
            if rid:
                urns[full_url] = (resource["resourceType"], rid)
    return urns


def parse_reference(value: Any, urns: Mapping[str, tuple[str, str]] | None = None) -> tuple[str, str] | None:
    """(type, id) a literal reference names, or None. `#id` gives ("#", id); urns resolve `urn:` forms.

    An absolute reference is taken by its trailing `Type/id`, whatever its server: within one
    input (a file, a prefetch, a pull from one base) that is the resource meant.
    """
    if not isinstance(value, str):
        return None
    value = value.strip()
    if not value:
        return None
    if value.startswith("#"):
        return ("#", value[1:]) if len(value) > 1 else None
    if value.startswith(URN_PREFIXES):
        return (urns or {}).get(value)
    match = REF_RE.search(value)
    return (match["type"], match["id"]) if match else None


def medication_reference(resource: Mapping[str, Any]) -> Any:
    """`medicationReference.reference` of a medication-use resource (None when there is none)."""
    ref = resource.get("medicationReference")
    return ref.get("reference") if isinstance(ref, dict) else None


def _trimmed(resource: Mapping[str, Any]) -> dict:
    return {k: resource[k] for k in _KEPT if k in resource}


def _version(resource: Mapping[str, Any]) -> int:
    meta = resource.get("meta")
    version = str(meta.get("versionId", "")) if isinstance(meta, dict) else ""
    return int(version) if version.isdigit() else -1


class MedicationIndex:
    """Medication and Substance resources of one input, by `Type/id`, to resolve references to them.

    `keep(resource)`, if given, says which to hold in full; the others are only remembered as
    seen (so that a reference to them resolves to "a drug the rules do not read", not to
    "unresolved"). Without `keep`, every one is held (per-patient inputs: a prefetch, a pull).
    """

    def __init__(self, keep: Callable[[dict], bool] | None = None) -> None:
        self._keep = keep
        self._held: dict[tuple[str, str], dict] = {}
        self._seen: set[int] = set()

    def __len__(self) -> int:
        return len(self._held) + len(self._seen)

    def add(self, resource: Any, *, full_url: Any = None, urns: Mapping[str, tuple[str, str]] | None = None) -> bool:
        """Index one resource if it is a Medication or Substance with an id; True if it was one.

        `full_url` gives an entry without an id the uuid of its `urn:` fullUrl; `urns` (its
        Bundle's fullUrl index) turns `urn:` ingredient references into `Type/id`. The
        resource itself is never modified.
        """
        if not isinstance(resource, dict) or resource.get("resourceType") not in MEDICATION_TYPES:
            return False
        rid = resource.get("id")
        if not isinstance(rid, str) or not rid:
            rid = urn_id(full_url)
            if rid is None:
                return True  # a Medication nobody can reference by id: nothing to index
        key = (resource["resourceType"], rid)
        trimmed = _trimmed(resource)
        trimmed["id"] = rid
        if urns and isinstance(trimmed.get("ingredient"), list):
            trimmed["ingredient"] = [_resolved_item(i, urns) for i in trimmed["ingredient"]]
        if self._keep is not None and not self._keep(trimmed) and key not in self._held:
            self._seen.add(hash(key))
            return True
        old = self._held.get(key)
        if old is None or _version(trimmed) > _version(old):
            self._held[key] = trimmed
            self._seen.discard(hash(key))
        return True

    def copy(self) -> "MedicationIndex":
        """An index holding what this one holds, that can grow without changing this one."""
        other = MedicationIndex(self._keep)
        other._held = dict(self._held)
        other._seen = set(self._seen)
        return other

    def parts(self) -> tuple[dict, set]:
        """What this index holds, to be pickled (without the `keep` test) and merged elsewhere (`merge`)."""
        return self._held, self._seen

    def merge(self, held: Mapping[tuple[str, str], dict], seen: Iterable[int]) -> None:
        """Add another index's `parts`, read after everything this one holds, with the decision `add`
        makes (the higher version, else the first read): the worker processes of one run index their
        pieces of the input apart, and every patient's record must resolve against all of them."""
        for key, resource in held.items():
            old = self._held.get(key)
            if old is None or _version(resource) > _version(old):
                self._held[key] = resource
                self._seen.discard(hash(key))
        held_hashes = {hash(key) for key in self._held}
        self._seen.update(h for h in seen if h not in held_hashes)

    def held(self) -> list[dict]:
        """The resources held in full, as indexed (ids from fullUrls, ingredient references resolved)."""
        return list(self._held.values())

    def add_all(self, resources: Iterable[Any]) -> None:
        for resource in resources:
            self.add(resource)

    def get(self, rtype: str, rid: str) -> dict | None:
        return self._held.get((rtype, rid))

    def knows(self, rtype: str, rid: str) -> bool:
        key = (rtype, rid)
        return key in self._held or hash(key) in self._seen

    def unresolved(self, resource: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The (type, id) of the Medications a resource references that this index cannot give."""
        target = parse_reference(medication_reference(resource))
        if target is None or target[0] == "#" or target[0] not in MEDICATION_TYPES:
            return []
        return [] if self.knows(*target) else [target]

    def inline(self, resource: dict, urns: Mapping[str, tuple[str, str]] | None = None) -> dict:
        """The resource, with the Medication its medicationReference names contained, if the index holds it.

        Returns the resource itself when there is nothing to do (a medicationCodeableConcept, a
        `#` reference, a reference the index cannot resolve or holds only as seen); otherwise a
        shallow copy: `contained` gains the Medication (and the Medications/Substances its
        ingredients reference), and `medicationReference.reference` becomes `#<id>`. A
        Medication the index only remembers as seen is contained as a bare `{resourceType, id}`.
        The input is never modified.
        """
        if resource.get("resourceType") not in MEDICATION_USE_TYPES:
            return resource
        target = parse_reference(medication_reference(resource), urns)
        if target is None or target[0] == "#" or target[0] not in MEDICATION_TYPES:
            return resource
        medication = self.get(*target)
        if medication is None:
            if not self.knows(*target):
                return resource
            # Seen, and not a drug any rule reads: contained as a bare Medication, so that the
            # facts stage knows the reference resolved (to nothing it reads), not "unresolved".
            medication = {"resourceType": target[0], "id": target[1]}
        contained = [c for c in resource.get("contained") or [] if isinstance(c, dict)]
        taken = {c.get("id") for c in contained}
        local = self._contain(medication, contained, taken)
        ingredients = []
        for ingredient in medication.get("ingredient") or []:
            ref = ingredient.get("itemReference") if isinstance(ingredient, dict) else None
            item = parse_reference(ref.get("reference"), urns) if isinstance(ref, dict) else None
            held = self.get(*item) if item is not None and item[0] in MEDICATION_TYPES else None
            if held is not None and held is not medication:
                item_local = self._contain(held, contained, taken)
                ingredient = {**ingredient, "itemReference": {**ref, "reference": f"#{item_local['id']}"}}
            ingredients.append(ingredient)
        if ingredients:
            local["ingredient"] = ingredients
        copy = dict(resource)
        copy["contained"] = contained
        copy["medicationReference"] = {**resource["medicationReference"], "reference": f"#{local['id']}"}
        return copy

    @staticmethod
    def _contain(held: dict, contained: list[dict], taken: set) -> dict:
        """Append a copy of `held` to `contained` under an id no other contained resource has."""
        local = dict(held)
        base = str(held["id"])
        rid, n = base, 1
        while rid in taken:
            n += 1
            rid = f"{base[:58]}-{n}"
        taken.add(rid)
        local["id"] = rid
        contained.append(local)
        return local


def _resolved_item(ingredient: Any, urns: Mapping[str, tuple[str, str]]) -> Any:
    ref = ingredient.get("itemReference") if isinstance(ingredient, dict) else None
    value = ref.get("reference") if isinstance(ref, dict) else None
    if isinstance(value, str) and value.startswith(URN_PREFIXES):
        target = urns.get(value.strip())
        if target is not None:
            return {**ingredient, "itemReference": {**ref, "reference": f"{target[0]}/{target[1]}"}}
    return ingredient


def normalise_medication_reference(resource: dict, urns: Mapping[str, tuple[str, str]] | None) -> None:
    """Rewrite a `urn:` medicationReference to `Type/id`, in place (the file source's Bundle resources).

    A `urn:uuid:` means something only inside its Bundle; once the Bundle is gone (the file
    source keeps resources, not Bundles) only `Type/id` can still be resolved.
    """
    if not urns:
        return
    ref = resource.get("medicationReference")
    if isinstance(ref, dict) and isinstance(ref.get("reference"), str) and ref["reference"].startswith(URN_PREFIXES):
        target = urns.get(ref["reference"].strip())
        if target is not None:
            ref["reference"] = f"{target[0]}/{target[1]}"
