"""The file source: FHIR R4 JSON from paths -> one record per patient.

What it reads
-------------
Each path given to `read_paths` / `iter_records` may be:

- a FHIR Bundle in JSON, of any `Bundle.type` (collection, searchset, transaction,
  batch, transaction-response, batch-response, document, message, history);
  Bundles nested inside an entry (a batch-response answering searches) are read too;
- a single resource in JSON;
- an NDJSON file (`*.ndjson`, one resource per line, the Bulk Data export layout
  `Patient.000.ndjson`, `Observation.ndjson`, ...); every line is read on its own, so a
  bad line is reported with its line number and the other lines still count;
- a directory: every `*.json` and `*.ndjson` below it, recursively, in sorted order
  (names beginning with "." are skipped: editor and VCS litter, not exports).

Only `RELEVANT_TYPES` are kept; every other resource type (Encounter, Claim,
Organization, OperationOutcome, ...) is skipped without comment.

Grouping by patient: the reference rules
----------------------------------------
A Patient belongs to itself (`Patient/<id>`). Any other kept resource belongs to the
patient named by its `subject` or else its `patient` element. A reference names a
patient in any of these forms:

- `Patient/123`;
- `https://server/fhir/Patient/123`: an absolute URL; the trailing `Type/id` is taken;
- `Patient/123/_history/2`: a versioned reference; the version is dropped (evidence
  carries versions through `meta.versionId`, which is never touched);
- `urn:uuid:...` / `urn:oid:...`: resolved through the `fullUrl`s of the entries of the
  same Bundle to that entry's `resourceType/id`. Such references mean nothing outside
  their Bundle, so the `reference` of `subject`/`patient` is rewritten to
  `Patient/<id>`, and later stages see one form only.

A Bundle entry without `resource.id` whose `fullUrl` is a `urn:uuid:`/`urn:oid:`
(transactions that POST new resources) gets that uuid/oid as its id: it is written into
`resource["id"]`, so that evidence such as `Observation/<uuid>` is stable from run to
run. Those two changes are the only mutations of the parsed input.

Anything a relevant resource says about its patient that is none of the above
(a Group, a conditional `Patient?identifier=...`, an unresolvable `urn:uuid:`, only an
identifier or display) is reported as `NoUsableDataError` ("no patient reference").

Records: a Patient seen in several files is one record. The same resource (type/id)
seen twice is kept once: the higher `meta.versionId` (compared as numbers), else the
later `meta.lastUpdated`, else the first one read. A group with resources but no
Patient resource is still a record, as is a Patient with nothing else: whether that is
enough to assess is the assessment's decision, not the reader's.

Why validation comes after selection
------------------------------------
Validating a resource against the `fhir.resources.R4B` pydantic models costs about
100 µs (DESIGN.md: a 50-Observation bundle validates in 6 ms and parses in 0.07 ms).
A Synthea bundle is mostly Claims, Encounters and ExplanationOfBenefits the rules never
read, so the reader selects the relevant resources first and validates only those
(R4B is identical to R4 for these types). A resource that fails becomes an
`InvalidResourceError` naming its file and `Type/id` with the first few pydantic
messages, and is dropped; the patient's other resources still go through.

Errors never escape: unreadable paths, non-JSON, JSON that is not FHIR and invalid
resources all become `InputError`s in `ReadResult.problems` (or are yielded by
`iter_records`), each with `.source` (the file, plus `:<line>` for NDJSON) and,
where there is one, `.resource` (`Observation/123`, or `entry[4]` inside a Bundle).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import (
    InputError,
    InvalidResourceError,
    NoUsableDataError,
    NotFhirError,
    NotJsonError,
)

try:  # orjson parses a 700 kB Synthea bundle several times faster than json
    import orjson

    _loads = orjson.loads
    _JSON_ERRORS: tuple[type[Exception], ...] = (orjson.JSONDecodeError, UnicodeDecodeError, ValueError)
except ImportError:  # pragma: no cover - exercised only where orjson is absent
    import json

    _loads = json.loads
    _JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, ValueError)

__all__ = ["RELEVANT_TYPES", "PatientRecord", "ReadResult", "iter_records", "read_paths"]

#: The resource types the facts and rules read; everything else is skipped unread.
RELEVANT_TYPES = frozenset(
    {
        "Patient",
        "Observation",
        "MedicationStatement",
        "MedicationRequest",
        "MedicationAdministration",
        "Condition",
        "FamilyMemberHistory",
    }
)

#: Elements that point at the patient, in the order they are tried.
_PATIENT_ELEMENTS = ("subject", "patient")

# `Type/id` at the end of a relative or absolute reference, optionally `/_history/<vid>`.
# Ids follow the FHIR R4 id datatype: [A-Za-z0-9\-\.]{1,64}.
_REF_RE = re.compile(
    r"(?:^|/)(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?/?$"
)
_URN_PREFIXES = ("urn:uuid:", "urn:oid:")
_BOM = b"\xef\xbb\xbf"


@dataclass
class PatientRecord:
    """One patient's resources, ready for the facts stage."""

    patient_ref: str  #: "Patient/<id>"
    resources: list[dict] = field(default_factory=list)  #: the Patient first if present, then read order
    sources: list[str] = field(default_factory=list)  #: files the resources came from, in read order


@dataclass
class ReadResult:
    patients: list[PatientRecord]  #: sorted by patient_ref
    problems: list[InputError]  #: every rejected file, line or resource, in the order met


def read_paths(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], *, validate: bool = True) -> ReadResult:
    """Read every path and group the relevant resources by patient. Never raises `InputError`."""
    patients: list[PatientRecord] = []
    problems: list[InputError] = []
    for item in iter_records(paths, validate=validate):
        if isinstance(item, PatientRecord):
            patients.append(item)
        else:
            problems.append(item)
    return ReadResult(patients=patients, problems=problems)


def iter_records(
    paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str], *, validate: bool = True
) -> Iterator[PatientRecord | InputError]:
    """Yield problems met while reading, then one `PatientRecord` per patient, sorted by patient_ref.

    Memory: files are read one at a time (NDJSON one line at a time), and of each file only
    the relevant resources are kept, so the peak is the relevant resources of all inputs held
    once (no second copy: records share the parsed dicts) plus the largest single JSON file
    while it is being read. Records cannot be yielded before the last file is read, because
    a Bulk export puts a patient's Observations in a different file from the Patient; a
    patient-partitioned streaming mode for very large exports is a later issue.
    Validation runs lazily, record by record, as records are yielded; a record's validation
    problems are yielded just before it.
    """
    grouping = _Grouping()
    for path in _expand(paths):
        for problem in _read_file(path, grouping):
            yield problem
    yield from grouping.records(validate=validate)


# --------------------------------------------------------------------------- paths and files


def _expand(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> Iterator[Path]:
    if isinstance(paths, (str, os.PathLike)):  # one path, not an iterable of characters
        paths = [paths]
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = [
                p
                for p in path.rglob("*")
                if p.suffix in (".json", ".ndjson")
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and p.is_file()
            ]
            yield from sorted(found)
        else:
            yield path


def _read_file(path: Path, grouping: _Grouping) -> Iterator[InputError]:
    source = str(path)
    if not path.exists():
        yield InputError("no such file or directory", source=source)
        return
    if not path.is_file():
        yield InputError("not a regular file", source=source)
        return
    try:
        if path.suffix == ".ndjson":
            yield from _read_ndjson(path, source, grouping)
            return
        data = path.read_bytes()
    except OSError as exc:
        yield InputError(f"cannot read file: {exc.strerror or exc}", source=source)
        return
    try:
        obj = _loads(data[3:] if data.startswith(_BOM) else data)
    except _JSON_ERRORS as exc:
        yield NotJsonError(f"not JSON: {_first_line(exc)}", source=source)
        return
    del data  # the bytes are not needed once parsed; keep one copy of a large file, not two
    yield from _read_object(obj, source, source, grouping)


def _read_ndjson(path: Path, source: str, grouping: _Grouping) -> Iterator[InputError]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            if lineno == 1 and line.startswith(_BOM):
                line = line[3:]
            if not line.strip():
                continue  # a trailing newline or blank separator line is not an error
            where = f"{source}:{lineno}"
            try:
                obj = _loads(line)
            except _JSON_ERRORS as exc:
                yield NotJsonError(f"line {lineno} is not JSON: {_first_line(exc)}", source=where)
                continue
            yield from _read_object(obj, where, source, grouping)


def _read_object(obj: Any, where: str, file: str, grouping: _Grouping) -> Iterator[InputError]:
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        kind = "a JSON object" if isinstance(obj, dict) else f"JSON {type(obj).__name__}"
        yield NotFhirError(f"not a FHIR resource or Bundle: {kind} without a resourceType", source=where)
        return
    if obj["resourceType"] == "Bundle":
        yield from _read_bundle(obj, where, file, "", grouping)
    elif obj["resourceType"] in RELEVANT_TYPES:
        yield from grouping.add(obj, where, file, label=_label(obj, None), urns=None)


# --------------------------------------------------------------------------- Bundles


def _read_bundle(bundle: dict, where: str, file: str, prefix: str, grouping: _Grouping) -> Iterator[InputError]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        yield NotFhirError("Bundle.entry is not a list", source=where, resource=prefix.rstrip(".") or None)
        return
    # First pass: fullUrl -> (type, id), so that references may point forward in the Bundle.
    urns: dict[str, tuple[str, str]] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        full_url, resource = entry.get("fullUrl"), entry.get("resource")
        if isinstance(full_url, str) and isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
            rid = resource.get("id") if isinstance(resource.get("id"), str) else _urn_id(full_url)
            if rid:
                urns[full_url] = (resource["resourceType"], rid)
    for index, entry in enumerate(entries):
        label = f"{prefix}entry[{index}]"
        if not isinstance(entry, dict):
            yield NotFhirError("Bundle entry is not a JSON object", source=where, resource=label)
            continue
        resource = entry.get("resource")
        if resource is None:
            continue  # DELETE/GET requests and bare responses carry no resource
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            yield NotFhirError("Bundle entry resource has no resourceType", source=where, resource=label)
            continue
        rtype = resource["resourceType"]
        if rtype == "Bundle":
            yield from _read_bundle(resource, where, file, label + ".", grouping)
            continue
        if rtype not in RELEVANT_TYPES:
            continue
        if "id" not in resource:
            urn_id = _urn_id(entry.get("fullUrl"))
            if urn_id:
                resource["id"] = urn_id  # stable evidence reference: Observation/<uuid>
        yield from grouping.add(resource, where, file, label=_label(resource, label), urns=urns)


def _urn_id(full_url: Any) -> str | None:
    if isinstance(full_url, str):
        for prefix in _URN_PREFIXES:
            if full_url.startswith(prefix) and len(full_url) > len(prefix):
                return full_url[len(prefix) :]
    return None


# --------------------------------------------------------------------------- references


def _patient_id(resource: dict, urns: dict[str, tuple[str, str]] | None) -> tuple[str | None, str]:
    """The patient id a resource belongs to, or (None, why not). Rewrites urn references."""
    if resource["resourceType"] == "Patient":
        rid = resource.get("id")
        return (rid, "") if isinstance(rid, str) and rid else (None, "Patient has no id")
    seen: list[str] = []
    for element in _PATIENT_ELEMENTS:
        ref = resource.get(element)
        if not isinstance(ref, dict):
            continue
        value = ref.get("reference")
        if not isinstance(value, str) or not value.strip():
            kind = "only an identifier" if "identifier" in ref else "no reference"
            seen.append(f"{element} has {kind}")  # logical references cannot be matched to a Patient here
            continue
        value = value.strip()
        if value.startswith(_URN_PREFIXES):
            target = urns.get(value) if urns is not None else None
            if target is None:
                seen.append(f"{element} {value!r} does not resolve inside its Bundle")
                continue
            if target[0] == "Patient":
                ref["reference"] = f"Patient/{target[1]}"  # one reference form for later stages
                return target[1], ""
            seen.append(f"{element} points to a {target[0]}")
            continue
        match = _REF_RE.search(value)
        if match and match["type"] == "Patient":
            return match["id"], ""
        seen.append(f"{element} points to a {match['type']}" if match else f"{element} {value!r} is not a literal reference")
    return None, "; ".join(seen) or "no subject or patient element"


def _label(resource: dict, entry_label: str | None) -> str:
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        return f"{resource['resourceType']}/{rid}"
    return entry_label or resource["resourceType"]


# --------------------------------------------------------------------------- grouping


@dataclass
class _Item:
    resource: dict
    where: str  # file, or file:line for NDJSON
    file: str
    label: str


class _Grouping:
    """Relevant resources by patient, with duplicates (same type/id) resolved as they arrive."""

    def __init__(self) -> None:
        # patient id -> {resource key -> item}; dict order is read order
        self._groups: dict[str, dict[tuple, _Item]] = {}
        self._owner: dict[tuple, str] = {}  # resource key -> patient id
        self._anon = 0

    def add(self, resource: dict, where: str, file: str, *, label: str, urns: dict | None) -> Iterator[InputError]:
        pid, why = _patient_id(resource, urns)
        if pid is None:
            yield NoUsableDataError(f"no patient reference ({why})", source=where, resource=label)
            return
        rid = resource.get("id")
        if isinstance(rid, str) and rid:
            key: tuple = (resource["resourceType"], rid)
        else:  # no id: cannot be a duplicate of anything we can name
            self._anon += 1
            key = (resource["resourceType"], None, self._anon)
        item = _Item(resource, where, file, label)
        old_pid = self._owner.get(key)
        if old_pid is not None:
            group = self._groups[old_pid]
            if not _is_newer(resource, group[key].resource):
                return  # the first one read, or the newer one, stays
            if old_pid == pid:
                group[key] = item  # keep the original position in read order
                return
            del group[key]  # a newer version moved to another patient
        self._owner[key] = pid
        self._groups.setdefault(pid, {})[key] = item

    def records(self, *, validate: bool) -> Iterator[PatientRecord | InputError]:
        for pid in sorted(self._groups):
            items = list(self._groups.pop(pid).values())
            if not items:
                continue
            sources = list(dict.fromkeys(it.file for it in items))  # read order, before the Patient moves up
            # The Patient first; the rest keep read order (sort is stable).
            items.sort(key=lambda it: it.resource["resourceType"] != "Patient")
            kept: list[dict] = []
            for it in items:
                problem = _validate(it) if validate else None
                if problem is None:
                    kept.append(it.resource)
                else:
                    yield problem
            yield PatientRecord(patient_ref=f"Patient/{pid}", resources=kept, sources=sources)
        self._owner.clear()


def _is_newer(new: dict, old: dict) -> bool:
    """True if `new` should replace `old`: higher versionId, else later lastUpdated, else no."""
    new_meta = new.get("meta") if isinstance(new.get("meta"), dict) else {}
    old_meta = old.get("meta") if isinstance(old.get("meta"), dict) else {}
    nv, ov = str(new_meta.get("versionId", "")), str(old_meta.get("versionId", ""))
    if nv.isdigit() and ov.isdigit() and int(nv) != int(ov):
        return int(nv) > int(ov)
    nt, ot = _instant(new_meta.get("lastUpdated")), _instant(old_meta.get("lastUpdated"))
    if nt is not None and ot is not None and nt != ot:
        return nt > ot
    return False


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None  # FHIR instants carry a zone


# --------------------------------------------------------------------------- validation

_MODELS: dict[str, Any] = {}
_MAX_REASONS = 3


def _model(resource_type: str) -> Any:
    model = _MODELS.get(resource_type)
    if model is None:
        # Imported on first use: loading the fhir.resources models costs ~0.5 s, and
        # validate=False callers should not pay it.
        from fhir.resources.R4B import get_fhir_model_class

        model = _MODELS[resource_type] = get_fhir_model_class(resource_type)
    return model


def _validate(item: _Item) -> InvalidResourceError | None:
    from pydantic import ValidationError

    resource = item.resource
    try:
        _model(resource["resourceType"]).model_validate(resource)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        reasons = [f"{_loc(err['loc'])}: {err['msg']}" for err in errors[:_MAX_REASONS]]
        more = f" (+{len(errors) - _MAX_REASONS} more)" if len(errors) > _MAX_REASONS else ""
        return InvalidResourceError(
            f"fails FHIR R4 validation: {'; '.join(reasons)}{more}", source=item.where, resource=item.label
        )
    except (ValueError, TypeError) as exc:  # fhir.resources raises these for a few root-level checks
        return InvalidResourceError(f"fails FHIR R4 validation: {_first_line(exc)}", source=item.where, resource=item.label)
    return None


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(resource)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
