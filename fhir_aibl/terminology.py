"""Value sets as data: loads `rules/valuesets/*.yaml` and answers code -> concept look-ups.

Every code list the rules depend on lives in a YAML file beside the rules, with
its source and verification status (V, V2, UNVERIFIED; docs/clinical-specification.md section 3),
so that a terminologist can review and change it without touching Python.
The file format is described in `rules/valuesets/README.md`.

Matching rules, all of them from the terminology traps of docs/clinical-specification.md section 3:
- systems are compared after resolving aliases (`systems.yaml`: the `urn:oid:`
  forms real exports use, `http://hl7.org/fhir/sid/icd-10` beside `-cm`, ...);
- ICD-10-CM codes are compared without dots and in upper case (VSAC stores
  `M8580`, FHIR data says `M85.80`);
- an entry with `match: prefix` covers every code that starts with it (`C50`
  covers `C50.912`); the longest matching entry wins;
- a `texts` entry matches free text (used for `bodySite.text` only: the
  display of an Observation code is never read as its meaning).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RulesError
from .resources import ruleset_paths

#: The value sets shipped beside the rules (what `Assessor()` loads by default; package data).
DEFAULT_VALUESETS = ruleset_paths().valuesets
#: Distinct (value set, system, code) look-ups remembered per Terminology. Real data uses a
#: few thousand codes; the cap keeps memory bounded whatever a file throws at the reader.
_LOOKUP_CACHE_MAX = 100_000
_MISS = object()

ICD10_SYSTEMS = frozenset({"http://hl7.org/fhir/sid/icd-10-cm", "http://hl7.org/fhir/sid/icd-10"})
STATUSES = frozenset({"V", "V2", "UNVERIFIED", "PROPOSAL"})


@dataclass(frozen=True)
class Concept:
    valueset: str
    system: str
    code: str
    display: str
    status: str
    properties: Mapping[str, Any] = field(default_factory=dict)
    match: str = "exact"

    def get(self, name: str, default: Any = None) -> Any:
        return self.properties.get(name, default)


@dataclass(frozen=True)
class TextRule:
    contains: str
    properties: Mapping[str, Any]


@dataclass
class ValueSet:
    id: str
    title: str
    path: Path
    exact: dict[tuple[str, str], Concept] = field(default_factory=dict)
    prefixes: list[Concept] = field(default_factory=list)
    texts: list[TextRule] = field(default_factory=list)
    data: Mapping[str, Any] = field(default_factory=dict)


NDC_SYSTEM = "http://hl7.org/fhir/sid/ndc"
# The 10-digit NDC comes as 4-4-2, 5-3-2 or 5-4-1 (labeler-product-package); the 11-digit
# (HIPAA) form pads the short segment with a leading zero to 5-4-2. Both spellings occur in
# real data, with and without hyphens; one form is compared.
_NDC_WIDTHS = (5, 4, 2)


def _norm_ndc(code: str) -> str:
    parts = code.split("-")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        if all(len(p) <= w for p, w in zip(parts, _NDC_WIDTHS)):
            return "".join(p.zfill(w) for p, w in zip(parts, _NDC_WIDTHS))
    return code.replace("-", "")


def _norm_code(system: str, code: str) -> str:
    code = str(code).strip()
    if system in ICD10_SYSTEMS:
        return code.replace(".", "").upper()
    if system == NDC_SYSTEM:
        return _norm_ndc(code)
    return code


class Terminology:
    """All value sets of one rules directory."""

    def __init__(self, valuesets: dict[str, ValueSet], aliases: dict[str, str], content_hash: str):
        self._valuesets = valuesets
        self._aliases = aliases
        self.content_hash = content_hash
        # Every Observation of a record is looked up, most of them with the same few vital-sign
        # and lab codes; the answer depends only on the arguments, so it is remembered.
        # Entries are written whole (one dict store), so sharing between threads is safe.
        self._lookups: dict[tuple, Any] = {}

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path) -> "Terminology":
        directory = Path(directory)
        if not directory.is_dir():
            raise RulesError(f"value set directory not found: {directory}")
        digest = hashlib.sha256()
        aliases: dict[str, str] = {}
        raw: list[tuple[Path, dict]] = []
        for path in sorted(directory.glob("*.yaml")):
            text = path.read_bytes()
            digest.update(path.name.encode() + b"\0" + text)
            try:
                doc = yaml.safe_load(text) or {}
            except yaml.YAMLError as exc:
                raise RulesError(f"{path}: not valid YAML: {exc}") from exc
            if not isinstance(doc, dict):
                raise RulesError(f"{path}: expected a mapping at the top level")
            if path.name == "systems.yaml":
                for entry in doc.get("systems", []):
                    uri = entry["uri"]
                    aliases[entry["alias"]] = uri
                    aliases[uri] = uri
                    for other in entry.get("also", []):
                        aliases[other] = uri
                continue
            raw.append((path, doc))
        valuesets: dict[str, ValueSet] = {}
        for path, doc in raw:
            vs = cls._build(path, doc, aliases)
            if vs.id in valuesets:
                raise RulesError(f"{path}: value set id {vs.id!r} already defined in {valuesets[vs.id].path}")
            valuesets[vs.id] = vs
        cls._check_unverified(valuesets, aliases)
        return cls(valuesets, aliases, digest.hexdigest())

    @staticmethod
    def _check_unverified(valuesets: dict[str, ValueSet], aliases: dict[str, str]) -> None:
        """A code the specification marks UNVERIFIED is used only as UNVERIFIED (unverified.yaml)."""
        listed = valuesets.get("unverified")
        if listed is None:
            return
        for entry in listed.data.get("codes") or []:
            system = aliases.get(entry["system"], entry["system"])
            code = _norm_code(system, str(entry["code"]))
            for vs in valuesets.values():
                for concept in list(vs.exact.values()) + vs.prefixes:
                    if concept.system == system and concept.code == code and concept.status != "UNVERIFIED":
                        raise RulesError(
                            f"{vs.path}: {code} is marked UNVERIFIED in the specification ({entry.get('where')}) "
                            f"but listed as {concept.status}"
                        )

    @staticmethod
    def _build(path: Path, doc: dict, aliases: dict[str, str]) -> ValueSet:
        vs_id = doc.get("id")
        if not vs_id:
            raise RulesError(f"{path}: missing 'id'")
        vs = ValueSet(id=vs_id, title=doc.get("title", vs_id), path=path, data=doc)
        for i, entry in enumerate(doc.get("concepts", []) or []):
            where = f"{path}: concepts[{i}]"
            try:
                system_key = entry["system"]
                code = str(entry["code"])
            except (KeyError, TypeError) as exc:
                raise RulesError(f"{where}: needs 'system' and 'code'") from exc
            system = aliases.get(system_key, system_key)
            status = str(entry.get("status", "V"))
            if status not in STATUSES:
                raise RulesError(f"{where}: status {status!r} is not one of {sorted(STATUSES)}")
            if status == "UNVERIFIED" and not entry.get("unverified_ok", False):
                raise RulesError(
                    f"{where}: code {code} is UNVERIFIED; set 'unverified_ok: true' with a 'note' to use it knowingly"
                )
            concept = Concept(
                valueset=vs_id,
                system=system,
                code=_norm_code(system, code),
                display=str(entry.get("display", "")),
                status=status,
                properties=dict(entry.get("properties", {}) or {}),
                match=entry.get("match", "exact"),
            )
            if concept.match == "prefix":
                vs.prefixes.append(concept)
            elif concept.match == "exact":
                key = (system, concept.code)
                if key in vs.exact:
                    raise RulesError(f"{where}: duplicate code {code} in {system}")
                vs.exact[key] = concept
            else:
                raise RulesError(f"{where}: match must be 'exact' or 'prefix'")
        vs.prefixes.sort(key=lambda c: len(c.code), reverse=True)
        for entry in doc.get("texts", []) or []:
            vs.texts.append(TextRule(contains=str(entry["contains"]).lower(), properties=dict(entry["properties"])))
        return vs

    # -- look-ups --------------------------------------------------------------------------
    def valueset(self, vs_id: str) -> ValueSet:
        try:
            return self._valuesets[vs_id]
        except KeyError:
            raise RulesError(f"unknown value set {vs_id!r}") from None

    @property
    def valueset_ids(self) -> list[str]:
        return sorted(self._valuesets)

    def system(self, alias_or_uri: str) -> str:
        return self._aliases.get(alias_or_uri, alias_or_uri)

    def lookup(self, vs_id: str, system: str | None, code: str | None) -> Concept | None:
        if not system or code is None:
            return None
        if type(system) is not str or type(code) is not str:
            # Not cached: 1, 1.0 and True are one dict key but three different codes.
            return self._lookup(vs_id, system, code)
        key = (vs_id, system, code)
        hit = self._lookups.get(key, _MISS)
        if hit is _MISS:
            hit = self._lookup(vs_id, system, code)
            if len(self._lookups) < _LOOKUP_CACHE_MAX:
                self._lookups[key] = hit
        return hit

    def _lookup(self, vs_id: str, system: str, code: str) -> Concept | None:
        vs = self.valueset(vs_id)
        system = self._aliases.get(system, system)
        norm = _norm_code(system, code)
        hit = vs.exact.get((system, norm))
        if hit is not None:
            return hit
        for concept in vs.prefixes:
            if concept.system == system and norm.startswith(concept.code):
                return concept
        return None

    def match(self, vs_id: str, codeable: Any) -> list[Concept]:
        """Every concept of the value set that a CodeableConcept, Coding or list of Codings carries."""
        found: list[Concept] = []
        # The usual shape, a CodeableConcept with a list of Codings, without building a list.
        codings = codeable.get("coding") if isinstance(codeable, dict) else None
        for coding in codings if isinstance(codings, list) else _codings(codeable):
            if not isinstance(coding, dict):
                continue
            hit = self.lookup(vs_id, coding.get("system"), coding.get("code"))
            if hit is not None and hit not in found:
                found.append(hit)
        return found

    def first(self, vs_id: str, codeable: Any) -> Concept | None:
        hits = self.match(vs_id, codeable)
        return hits[0] if hits else None

    def firsts(self, vs_ids: tuple[str, ...], codeable: Any) -> tuple[Concept | None, ...]:
        """`tuple(self.first(v, codeable) for v in vs_ids)`, in one pass over the codings.

        Every Observation of a record is asked about three value sets; one remembered answer
        per coding does it in one look-up where three `first` calls take three.
        """
        found: list[Concept | None] = [None] * len(vs_ids)
        codings = codeable.get("coding") if isinstance(codeable, dict) else None
        for coding in codings if isinstance(codings, list) else _codings(codeable):
            if not isinstance(coding, dict):
                continue
            system, code = coding.get("system"), coding.get("code")
            if not system or code is None:
                continue
            if type(system) is str and type(code) is str:
                key = (vs_ids, system, code)
                hits = self._lookups.get(key, _MISS)
                if hits is _MISS:
                    hits = tuple(self.lookup(v, system, code) for v in vs_ids)
                    if len(self._lookups) < _LOOKUP_CACHE_MAX:
                        self._lookups[key] = hits
            else:
                hits = tuple(self.lookup(v, system, code) for v in vs_ids)
            for i, hit in enumerate(hits):
                if found[i] is None and hit is not None:
                    found[i] = hit
        return tuple(found)

    def match_text(self, vs_id: str, text: str | None) -> Mapping[str, Any] | None:
        if not text:
            return None
        lowered = text.lower()
        for rule in self.valueset(vs_id).texts:
            if rule.contains in lowered:
                return rule.properties
        return None


@functools.lru_cache(maxsize=None)
def default_terminology() -> Terminology:
    """The shipped value sets, loaded once per process."""
    return Terminology.load(DEFAULT_VALUESETS)


def _codings(codeable: Any) -> Iterable[dict]:
    if not codeable:
        return ()
    if isinstance(codeable, dict):
        if "coding" in codeable:
            return [c for c in codeable.get("coding") or [] if isinstance(c, dict)]
        if "code" in codeable:
            return [codeable]
        return ()
    if isinstance(codeable, list):
        out: list[dict] = []
        for item in codeable:
            out.extend(_codings(item))
        return out
    return ()
