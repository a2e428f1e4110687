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
run. A `urn:` medicationReference is rewritten to `Medication/<id>` the same way. Those are
the only mutations of the parsed input.

Medications: a Medication (or Substance) names no patient. Wherever it is (a Bundle entry,
an NDJSON Medication file, before or after what references it), the first pass indexes it
(`references.MedicationIndex`: in full only if a rule could read it, else a hash of its
id); the second pass gives every medication resource that references one a copy of it as a
contained Medication (fhir_aibl/references.py, docs/medications.md). A reference that
resolves to nothing is left as it is, and the facts stage flags it `medication-unresolved`.

Anything a relevant resource says about its patient that is none of the above
(a Group, a conditional `Patient?identifier=...`, an unresolvable `urn:uuid:`, only an
identifier or display) is reported as `NoUsableDataError` ("no patient reference").

Records: a Patient seen in several files is one record. The same resource (type/id)
seen twice is kept once: the higher `meta.versionId` (compared as numbers), else the
later `meta.lastUpdated`, else the first one read. A group with resources but no
Patient resource is still a record, as is a Patient with nothing else: whether that is
enough to assess is the assessment's decision, not the reader's.

What is validated, and why only that
------------------------------------
Validating a resource against the `fhir.resources.R4B` pydantic models costs about
100 µs (DESIGN.md: a 50-Observation bundle validates in 6 ms and parses in 0.07 ms), and
DESIGN.md's rule is "parse what you use". So the reader validates a resource only if the
facts stage can read it, as `facts.reads_resource` decides with the value sets the records
will be assessed with (the same functions the extractor calls before it reads anything, so
the two cannot drift apart):

- the Patient, and every FamilyMemberHistory (its status alone can exclude it);
- an Observation whose code or a component's code is recognised (a DXA result, BMI,
  smoking status, a laboratory or vital-sign concept the rules read, a family history
  finding);
- a Condition whose code is in the conditions value set;
- a medication whose code, or whose contained Medication's code or ingredients, names a
  drug of a class the rules read;
- any resource on which that test itself fails (malformed beyond what it can look at).

Everything else of a relevant type (a heart-rate Observation, a Condition or a drug the
value sets do not know) is not validated: the extractor returns as soon as it sees the code
is not one it reads, so such a resource can change no fact, no finding and no assessment,
and an error about it would tell the user nothing about the result. It is still grouped,
deduplicated and passed on in the record unchanged, as with `validate=False`. Resources of
other types (Claims, Encounters, ...) are skipped unread before any of this.

A validated resource that fails becomes an `InvalidResourceError` naming its file and
`Type/id` with the first few pydantic messages, and is dropped; the patient's other
resources still go through (R4B is identical to R4 for these types).

Errors never escape: unreadable paths, non-JSON, JSON that is not FHIR and invalid
resources all become `InputError`s in `ReadResult.problems` (or are yielded by
`iter_records`), each with `.source` (the file, plus `:<line>` for NDJSON) and,
where there is one, `.resource` (`Observation/123`, or `entry[4]` inside a Bundle).

Memory: two passes, so that a Bulk export of any size reads in bounded memory
---------------------------------------------------------------------------------
A Bulk export puts a patient's Observations in one file and the Patient in another, so no
record is complete before the last file is read. Holding every parsed resource until then
grows with the export (about 3 kB of Python objects per resource: 100,000 patients of 150
resources would be 45 GB). Instead:

1. The first pass reads every file in order, as described above, and yields the reading
   problems as it meets them. Of each relevant resource it keeps an index entry: its
   patient, its place in read order and, for an NDJSON line, the file, offset, length and
   CRC-32 of the line (the parsed line is dropped); a resource from a Bundle or a JSON file
   is kept parsed (it may have been rewritten, see above). When the entries reach
   `SPOOL_LIMIT` (a Bundle resource counts `INLINE_WEIGHT`), they are sorted by (patient,
   read order) and spilled to a temporary file (a private `tempfile.mkdtemp` directory,
   removed when the reader finishes or is closed), with the hash of each resource's
   `Type/id` and of its patient in 64 partition files.
2. Between the passes, the partitions show which `Type/id`s appear under two patients
   (rare: a resource moved between patients); only those are decided globally, with the
   same rule as within one patient (below).
3. The second pass merges the sorted runs (at most 64 files at once; more are merged
   first), so each patient's entries arrive together and in read order; it reads that
   patient's NDJSON lines again (adjacent lines in one read), checks each line's CRC, and
   builds, validates and yields the record. A line whose CRC no longer matches (the file
   changed between the passes) is reported as an `InputError` and never used: offsets
   into a changed file could point at another patient's data.

So peak memory is bounded by `SPOOL_LIMIT` (about 100 MB of index at the default), the
largest single JSON file and one patient's record, whatever the number of patients, and
temporary disk use is about 100 bytes per NDJSON resource. An input that fits under the
limit is never written to disk. The results are the same, in the same order, whatever the
limit (tests/test_sources_streaming.py). The cost is parsing each NDJSON line twice.
"""

from __future__ import annotations

import heapq
import itertools
import os
import pickle
import re
import shutil
import tempfile
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
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
from .facts import medication_reading
from .references import (
    MEDICATION_TYPES,
    MEDICATION_USE_TYPES,
    REF_RE,
    URN_PREFIXES,
    MedicationIndex,
    fullurl_index,
    normalise_medication_reference,
    urn_id,
)
from .jsoninput import JsonInputError, Rejected, loads_isolating, reparse
from .jsoninput import NotJsonError as _NotJson
from .terminology import Terminology, default_terminology
from .validation import ValidationMemo, needs_validation, salvage, salvaged_note

__all__ = [
    "DROP",
    "RELEVANT_TYPES",
    "SPOOL_LIMIT",
    "KeyedLine",
    "PatientRecord",
    "ReadResult",
    "decide_duplicates",
    "is_newer",
    "iter_records",
    "key_line",
    "medication_index",
    "patient_id",
    "patient_records",
    "read_paths",
]

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
        # a DXA done, ordered or declined without a result on record (facts `dxa_record`)
        "DiagnosticReport",
        "Procedure",
        "ServiceRequest",
    }
)

#: Elements that point at the patient, in the order they are tried.
_PATIENT_ELEMENTS = ("subject", "patient")

# The reference forms (fhir_aibl/references.py, one place for every input path).
_REF_RE = REF_RE
_ID_RE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_URN_PREFIXES = URN_PREFIXES
_BOM = b"\xef\xbb\xbf"


@dataclass
class PatientRecord:
    """One patient's resources, ready for the facts stage."""

    patient_ref: str  #: "Patient/<id>"
    resources: list[dict] = field(default_factory=list)  #: the Patient first if present, then read order
    sources: list[str] = field(default_factory=list)  #: files the resources came from, in read order
    #: `Type/id` of the patient's resources left out because they could not be read (each also
    #: an error of the run); the rules must not take what they said for absent
    unreadable: list[str] = field(default_factory=list)


@dataclass
class ReadResult:
    patients: list[PatientRecord]  #: sorted by patient_ref
    problems: list[InputError]  #: every rejected file, line or resource, in the order met


def read_paths(
    paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    validate: bool = True,
    terminology: Terminology | None = None,
) -> ReadResult:
    """Read every path and group the relevant resources by patient. Never raises `InputError`."""
    patients: list[PatientRecord] = []
    problems: list[InputError] = []
    for item in iter_records(paths, validate=validate, terminology=terminology):
        if isinstance(item, PatientRecord):
            patients.append(item)
        else:
            problems.append(item)
    return ReadResult(patients=patients, problems=problems)


def iter_records(
    paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    *,
    validate: bool = True,
    spool_limit: int | None = None,
    terminology: Terminology | None = None,
) -> Iterator[PatientRecord | InputError]:
    """Yield problems met while reading, then one `PatientRecord` per patient, sorted by patient_ref.

    Records cannot be yielded before the last file is read, because a Bulk export puts a
    patient's Observations in a different file from the Patient. So reading is two passes
    (see "Memory" in the module docstring): the first reads every file in order, yields the
    reading problems and keeps only a small index entry per relevant resource, spilled to
    sorted temporary files when there are many; the second merges those by patient and
    builds one record at a time. Validation runs lazily, record by record, as records are
    yielded; a record's validation problems are yielded just before it.

    `validate` checks the resources the facts stage reads, as `terminology` (the value sets
    the records will be assessed with; default: the shipped ones) recognises them: see
    "What is validated" in the module docstring. Pass the assessor's terminology when
    assessing with other value sets, so that what is read is what was validated.

    `spool_limit` is how much index to hold before spilling it to disk (default
    `SPOOL_LIMIT`; an NDJSON line counts 1, a resource from a Bundle or JSON file, held
    parsed, counts `INLINE_WEIGHT`). It changes memory and temporary disk use, never results.
    """
    spool = _Spool(SPOOL_LIMIT if spool_limit is None else spool_limit, terminology or default_terminology())
    try:
        for path in _expand(paths):
            for problem in _read_file(path, spool):
                yield problem
        if validate:
            yield from spool.records(validate=_validation_filter(terminology or default_terminology()))
        else:
            yield from spool.records(validate=None)
    finally:
        spool.close()


# --------------------------------------------------------------------------- paths and files


def expand_paths(paths: Iterable[str | os.PathLike[str]] | str | os.PathLike[str]) -> Iterator[Path]:
    """The files `iter_records` reads for `paths`, in the order it reads them (directories expanded)."""
    return _expand(paths)


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


def _read_file(path: Path, grouping: _Spool) -> Iterator[InputError]:
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
        obj = loads_isolating(data[3:] if data.startswith(_BOM) else data)
    except JsonInputError as exc:
        yield _json_problem(exc, source)
        return
    del data  # the bytes are not needed once parsed; keep one copy of a large file, not two
    yield from _read_object(obj, source, source, grouping)


def _read_ndjson(
    path: Path, source: str, grouping: _Spool, start_at: int = 0, end_at: int | None = None, first_line: int = 1
) -> Iterator[InputError]:
    """Index the lines of an NDJSON file; with `start_at`/`end_at`, only the lines that begin in that byte range.

    A range begins at the start of a line, `first_line` being its number (the population
    runner reads one file in several ranges, each in its own process: fhir_aibl/population).
    """
    with path.open("rb") as fh:
        fh.seek(start_at)
        offset = start_at
        for lineno, line in enumerate(fh, start=first_line):
            if end_at is not None and offset >= end_at:
                break
            start = offset
            offset += len(line)
            if lineno == 1 and line.startswith(_BOM):
                line = line[3:]
                start += 3
            if not line or line.isspace():
                continue  # a trailing newline or blank separator line is not an error
            where = f"{source}:{lineno}"
            try:
                obj = loads_isolating(line)
            except JsonInputError as exc:
                yield _json_problem(exc, where, lineno)
                continue
            # Where the line is, so that the second pass reads it again instead of holding it.
            at = (lineno, start, len(line), zlib.crc32(line))
            if type(obj) is dict and obj.get("resourceType") == "Bundle":
                yield from _read_bundle(obj, where, source, "", grouping)
                continue
            # the usual line, one resource: indexed without a generator per line
            problem = _index_resource(obj, where, source, grouping, line=at)
            if problem is not None:
                yield problem


def _json_problem(exc: JsonInputError, where: str, lineno: int | None = None) -> InputError:
    """A file or line refused as it was parsed (jsoninput): not JSON, nested too deep, a duplicate key."""
    if isinstance(exc, _NotJson):
        return NotJsonError(f"line {lineno} is {exc}" if lineno else str(exc), source=where)
    line = f"line {lineno}: " if lineno else ""
    return InvalidResourceError(f"{line}not valid FHIR JSON: {exc}", source=where)


def _read_object(obj: Any, where: str, file: str, grouping: _Spool) -> Iterator[InputError]:
    if isinstance(obj, dict) and obj.get("resourceType") == "Bundle":
        yield from _read_bundle(obj, where, file, "", grouping)
        return
    problem = _index_resource(obj, where, file, grouping)
    if problem is not None:
        yield problem


def _index_resource(
    obj: Any, where: str, file: str, grouping: _Spool, line: tuple[int, int, int, int] | None = None
) -> InputError | None:
    """A JSON value that is not a Bundle: indexed if it is a relevant resource, an error if it is no resource."""
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        kind = "a JSON object" if isinstance(obj, dict) else f"JSON {type(obj).__name__}"
        return NotFhirError(f"not a FHIR resource or Bundle: {kind} without a resourceType", source=where)
    if obj["resourceType"] in RELEVANT_TYPES:
        return grouping.add(obj, where, file, label=None, urns=None, line=line)
    if obj["resourceType"] in MEDICATION_TYPES:
        grouping.medications.add(obj)  # names no patient: indexed for the references to it
    return None


# --------------------------------------------------------------------------- Bundles


def _read_bundle(bundle: dict, where: str, file: str, prefix: str, grouping: _Spool) -> Iterator[InputError]:
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        yield NotFhirError("Bundle.entry is not a list", source=where, resource=prefix.rstrip(".") or None)
        return
    # First pass: fullUrl -> (type, id), so that references may point forward in the Bundle.
    urns = fullurl_index(entries)
    for index, entry in enumerate(entries):
        label = f"{prefix}entry[{index}]"
        if not isinstance(entry, dict):
            yield NotFhirError("Bundle entry is not a JSON object", source=where, resource=label)
            continue
        resource = entry.get("resource")
        if resource is None:
            continue  # DELETE/GET requests and bare responses carry no resource
        if isinstance(resource, Rejected):  # refused as it was parsed: nested too deep, a duplicate key
            named = f"{resource.resource_type}/{resource.id}" if resource.resource_type and resource.id else None
            yield InvalidResourceError(
                f"not valid FHIR JSON: {resource.error}", source=where, resource=f"{label} ({named})" if named else label
            )
            continue
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            yield NotFhirError("Bundle entry resource has no resourceType", source=where, resource=label)
            continue
        rtype = resource["resourceType"]
        if rtype == "Bundle":
            yield from _read_bundle(resource, where, file, label + ".", grouping)
            continue
        if rtype in MEDICATION_TYPES:
            grouping.medications.add(resource, full_url=entry.get("fullUrl"), urns=urns)
            continue
        if rtype not in RELEVANT_TYPES:
            continue
        if rtype in MEDICATION_USE_TYPES:
            normalise_medication_reference(resource, urns)
        if "id" not in resource:
            from_urn = urn_id(entry.get("fullUrl"))
            if from_urn:
                resource["id"] = from_urn  # stable evidence reference: Observation/<uuid>
        problem = grouping.add(resource, where, file, label=_label(resource, label), urns=urns)
        if problem is not None:
            yield problem


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
        if value.startswith("Patient/") and _ID_RE.fullmatch(value, 8):
            return value[8:], ""  # the usual relative form, as the full pattern below would read it
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


def patient_id(resource: dict) -> str | None:
    """The id of the patient a resource outside any Bundle belongs to, as the reader groups it; None if none."""
    return _patient_id(resource, None)[0]


def _label(resource: dict, entry_label: str | None) -> str:
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        return f"{resource['resourceType']}/{rid}"
    return entry_label or resource["resourceType"]


# --------------------------------------------------------------------------- grouping

#: Index entries held in memory before they are spilled to a sorted temporary file.
SPOOL_LIMIT = 400_000
#: A resource held parsed (from a Bundle or a JSON file) weighs this many NDJSON index entries.
INLINE_WEIGHT = 16
#: Entries per pickled chunk of a spilled run: what the merge holds per run.
_CHUNK = 1024
#: Partitions of the key-hash files used to find resources that appear under two patients.
_KEY_PARTITIONS = 64
#: Runs merged at once (open files); more runs are first merged into fewer, larger ones.
_FAN_IN = 64
_DROP = -1


@dataclass
class _Item:
    resource: dict
    where: str  # file, or file:line for NDJSON
    file: str
    label: str | None  # None: Type/id of the resource


class _Spool:
    """Relevant resources by patient, streamed: an index in memory or in sorted runs on disk.

    Entry tuples sort by (patient id, read order); both are unique together, so sorting
    never compares further. An NDJSON line is indexed, not kept: (pid, seq, key hash, file,
    line number, offset, length, crc32); a resource from a Bundle or JSON file is kept
    parsed (it may have been rewritten: urn references, ids from fullUrls): (pid, seq, key
    hash, file, where, label, resource). The key hash is hash((type, id)), None without an id.
    """

    def __init__(self, limit: int, terminology: Terminology | None = None) -> None:
        self.limit = max(1, limit)
        # Medications and Substances of the whole input, for the medicationReferences to them
        # (fhir_aibl/references.py): in full only those a rule could read, else a hash.
        self.medications = MedicationIndex(keep=_medication_keep(terminology or default_terminology()))
        self.files: list[str] = []
        self._file_index: dict[str, int] = {}
        self.buffer: list[tuple] = []
        self.weight = 0
        self.seq = 0
        self.runs: list[Path] = []
        self.tmp: Path | None = None
        self._fds: dict[int, int] = {}
        self._names = itertools.count()
        self._memo = ValidationMemo()  # shapes that passed validation, for this reading only

    # -- first pass ------------------------------------------------------------------------
    def add(self, resource: dict, where: str, file: str, *, label: str | None, urns: dict | None,
            line: tuple[int, int, int, int] | None = None) -> InputError | None:
        """Index one relevant resource, or say why not. `label` None means `Type/id` (worked out only if needed)."""
        pid, why = _patient_id(resource, urns)
        if pid is None:
            return NoUsableDataError(f"no patient reference ({why})", source=where, resource=label or _label(resource, None))
        fidx = self._file_index.get(file)
        if fidx is None:
            fidx = self._file_index[file] = len(self.files)
            self.files.append(file)
        rid = resource.get("id")
        khash = hash((resource["resourceType"], rid)) if isinstance(rid, str) and rid else None
        self.seq += 1
        if line is not None:
            self.buffer.append((pid, self.seq, khash, fidx, *line))
            self.weight += 1
        else:
            self.buffer.append((pid, self.seq, khash, fidx, where, label or _label(resource, None), resource))
            self.weight += INLINE_WEIGHT
        if self.weight >= self.limit:
            self._spill()
        return None

    def _spill(self) -> None:
        if self.tmp is None:
            self.tmp = Path(tempfile.mkdtemp(prefix="fhir-aibl-spool-"))
        self.buffer.sort()
        path = self.tmp / f"run-{len(self.runs):05d}"
        with path.open("wb") as fh:
            for i in range(0, len(self.buffer), _CHUNK):
                pickle.dump(self.buffer[i : i + _CHUNK], fh, protocol=pickle.HIGHEST_PROTOCOL)
        self.runs.append(path)
        self._spill_keys(self.buffer)
        self.buffer = []
        self.weight = 0

    def _spill_keys(self, entries: list[tuple]) -> None:
        """(key hash, patient hash) of every entry with an id, partitioned by key hash."""
        assert self.tmp is not None
        parts: list[tuple[array, array]] = [(array("q"), array("q")) for _ in range(_KEY_PARTITIONS)]
        for entry in entries:
            khash = entry[2]
            if khash is not None:
                keys, pids = parts[khash % _KEY_PARTITIONS]
                keys.append(khash)
                pids.append(hash(entry[0]))
        for i, (keys, pids) in enumerate(parts):
            if keys:
                with (self.tmp / f"keys-{i:03d}").open("ab") as fh:
                    keys.tofile(fh)
                with (self.tmp / f"pids-{i:03d}").open("ab") as fh:
                    pids.tofile(fh)

    # -- between the passes: resources seen under two patients --------------------------------
    def _cross_patient_keys(self) -> set[int]:
        """Key hashes seen under more than one patient: only those need a global decision."""

        def scan(keys: Iterable[int], pids: Iterable[int], into: set[int]) -> None:
            owner: dict[int, int] = {}
            for khash, phash in zip(keys, pids):
                known = owner.setdefault(khash, phash)
                if known != phash:
                    into.add(khash)

        cross: set[int] = set()
        if not self.runs:
            with_ids = [e for e in self.buffer if e[2] is not None]
            scan((e[2] for e in with_ids), (hash(e[0]) for e in with_ids), cross)
            return cross
        if self.buffer:
            self._spill_keys(self.buffer)  # the tail joins the partitions; it stays in memory
        assert self.tmp is not None
        for i in range(_KEY_PARTITIONS):
            kpath, ppath = self.tmp / f"keys-{i:03d}", self.tmp / f"pids-{i:03d}"
            if not kpath.exists():
                continue
            keys, pids = array("q"), array("q")
            keys.frombytes(kpath.read_bytes())
            pids.frombytes(ppath.read_bytes())
            scan(keys, pids, cross)
        return cross

    def _decide_cross(self, cross: set[int]) -> dict[int, int]:
        """read order -> position (kept) or _DROP, for every occurrence of a cross-patient key.

        Replays `add` as the in-memory reader did: the first occurrence is kept; a newer one
        replaces it in place within the same patient, or moves to its own patient at its own
        position; an older or equal one is ignored.
        """
        occurrences: dict[tuple[str, str], list[tuple[int, str, dict]]] = {}
        for entry in self._all_entries():
            if entry[2] in cross:
                resource = self._load([entry])[0]
                if resource is not None:
                    occurrences.setdefault((resource["resourceType"], resource["id"]), []).append((entry[1], entry[0], resource))
        decisions: dict[int, int] = {}
        for occ in occurrences.values():
            decisions.update(decide_duplicates(occ))
        return decisions

    # -- second pass -----------------------------------------------------------------------
    def _all_entries(self) -> Iterator[tuple]:
        """Every entry, merged by (patient id, read order)."""
        self.buffer.sort()
        if not self.runs:
            yield from self.buffer
            return
        yield from heapq.merge(*(self._read_run(path) for path in self.runs), self.buffer)

    @staticmethod
    def _read_run(path: Path) -> Iterator[tuple]:
        with path.open("rb") as fh:
            while True:
                try:
                    chunk = pickle.load(fh)  # our own file, written above in a private directory
                except EOFError:
                    return
                yield from chunk

    def _load(self, entries: list[tuple]) -> list[dict | None]:
        """The resources of index entries: NDJSON lines read again (adjacent lines in one read)."""
        out: list[dict | None] = [None] * len(entries)
        lines: list[tuple[int, int, int, int, int]] = []  # (file, offset, length, crc, index)
        for i, entry in enumerate(entries):
            if isinstance(entry[6], dict):
                out[i] = entry[6]
            else:
                lines.append((entry[3], entry[5], entry[6], entry[7], i))
        lines.sort()
        j = 0
        while j < len(lines):
            fidx, start = lines[j][0], lines[j][1]
            k, end = j, lines[j][1] + lines[j][2]
            while k + 1 < len(lines) and lines[k + 1][0] == fidx and lines[k + 1][1] == end:
                k += 1
                end += lines[k][2]
            data = os.pread(self._fd(fidx), end - start, start)
            for _f, off, length, crc, i in lines[j : k + 1]:
                raw = data[off - start : off - start + length]
                if len(raw) == length and zlib.crc32(raw) == crc:
                    try:
                        out[i] = reparse(raw)  # the same bytes (CRC) that passed jsoninput in the first pass
                    except ValueError:
                        pass
            j = k + 1
        return out

    def _fd(self, fidx: int) -> int:
        fd = self._fds.get(fidx)
        if fd is None:
            fd = self._fds[fidx] = os.open(self.files[fidx], os.O_RDONLY)
        return fd

    def _merge_runs(self) -> None:
        """Merge runs until at most _FAN_IN remain, so the final merge keeps few files open."""
        assert self.tmp is not None
        while len(self.runs) > _FAN_IN:
            batch, self.runs = self.runs[:_FAN_IN], self.runs[_FAN_IN:]
            path = self.tmp / f"merged-{next(self._names):05d}"
            with path.open("wb") as fh:
                chunk: list[tuple] = []
                for entry in heapq.merge(*(self._read_run(run) for run in batch)):
                    chunk.append(entry)
                    if len(chunk) == _CHUNK:
                        pickle.dump(chunk, fh, protocol=pickle.HIGHEST_PROTOCOL)
                        chunk = []
                if chunk:
                    pickle.dump(chunk, fh, protocol=pickle.HIGHEST_PROTOCOL)
            for run in batch:
                run.unlink()
            self.runs.append(path)

    def records(self, *, validate: Callable[[dict], bool] | None) -> Iterator[PatientRecord | InputError]:
        """One record per patient; `validate`, if given, says which resources to validate."""
        if self.runs:
            self._merge_runs()
        cross = self._cross_patient_keys()
        decisions = self._decide_cross(cross) if cross else {}
        for pid, group in itertools.groupby(self._all_entries(), key=lambda e: e[0]):
            yield from self._record(pid, list(group), decisions, validate)

    def _record(
        self, pid: str, entries: list[tuple], decisions: dict[int, int], validate: Callable[[dict], bool] | None
    ) -> Iterator[PatientRecord | InputError]:
        resources = self._load(entries)
        files = self.files
        # key -> [position, resource, entry]; the first occurrence keeps its position, a newer one replaces it
        chosen: dict[tuple, list] = {}
        for entry, resource in zip(entries, resources):
            if resource is None:  # an NDJSON line that changed between the two passes: never guess
                yield InputError("changed while being read; line not used", source=f"{files[entry[3]]}:{entry[4]}")
                continue
            seq = entry[1]
            decision = decisions.get(seq) if decisions else None
            if decision == _DROP:
                continue
            rid = resource.get("id")
            key: tuple = (resource["resourceType"], rid) if isinstance(rid, str) and rid else ("", seq)
            if decision is not None:
                chosen[key] = [decision, resource, entry]
                continue
            known = chosen.get(key)
            if known is None:
                chosen[key] = [seq, resource, entry]
            elif _is_newer(resource, known[1]):
                known[1], known[2] = resource, entry  # keep the original position in read order
        if not chosen:
            return
        ordered = sorted(chosen.values(), key=lambda c: c[0])
        sources = list(dict.fromkeys(files[entry[3]] for _pos, _res, entry in ordered))  # read order
        # The Patient first; the rest keep read order (sort is stable).
        ordered.sort(key=lambda c: c[1]["resourceType"] != "Patient")
        kept: list[dict] = []
        unreadable: list[str] = []
        for _pos, resource, entry in ordered:
            if resource["resourceType"] in MEDICATION_USE_TYPES and "medicationReference" in resource:
                resource = self.medications.inline(resource)  # a Medication elsewhere in the input, contained
            if validate is not None and validate(resource):
                problem = _validate(self._item(resource, entry), self._memo)
                if problem is not None:
                    yield problem
                    if problem.salvaged is None:
                        unreadable.append(_label(resource, None))
                        continue
                    resource = problem.salvaged  # read without its invalid elements (validation.salvage)
            kept.append(resource)
        yield PatientRecord(patient_ref=f"Patient/{pid}", resources=kept, sources=sources, unreadable=unreadable)

    def _item(self, resource: dict, entry: tuple) -> _Item:
        """Where a resource came from, for its error report: file:line of an NDJSON line, else the Bundle entry."""
        file = self.files[entry[3]]
        if isinstance(entry[6], dict):
            return _Item(resource, entry[4], file, entry[5])
        return _Item(resource, f"{file}:{entry[4]}", file, None)  # label None: Type/id, worked out if needed

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.buffer = []
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def _medication_keep(terminology: Terminology) -> Callable[[dict], bool]:
    """Which Medications the index holds in full: those whose code, ingredients or text the facts
    stage would read when contained, and those with an ingredient reference to follow."""
    def keep(medication: dict) -> bool:
        ingredients = medication.get("ingredient")
        if isinstance(ingredients, list) and any(isinstance(i, dict) and "itemReference" in i for i in ingredients):
            return True
        as_medication = {**medication, "resourceType": "Medication", "id": "m"}  # a Substance: its code
        if medication.get("resourceType") == "Substance":
            as_medication.pop("ingredient", None)
        probe = {"resourceType": "MedicationStatement", "medicationReference": {"reference": "#m"}, "contained": [as_medication]}
        try:
            found = medication_reading(probe, terminology)
        except Exception:  # malformed beyond what the test can look at: hold it, validation will say
            return True
        return found is not None and found[2] != "unresolved"

    return keep


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


def is_newer(new: dict, old: dict) -> bool:
    """The reader's "newest wins" rule for two copies of one resource (Type/id): True if `new` replaces `old`."""
    return _is_newer(new, old)


def _instant(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None  # FHIR instants carry a zone


# --------------------------------------------------------------------------- validation

_MAX_REASONS = 3


def _validation_filter(terminology: Terminology) -> Callable[[dict], bool]:
    """Which resources to validate: `validation.needs_validation` with the reading's value sets."""
    return lambda resource: needs_validation(resource, terminology)


def _validate(item: _Item, memo: ValidationMemo | None = None) -> InvalidResourceError | None:
    """Why the resource fails validation, or None; the error's `salvaged` is the resource without its
    invalid elements when losing them can only make it say less (validation.salvage), else None."""
    from pydantic import ValidationError

    resource = item.resource
    exc = (memo or ValidationMemo(limit=0)).problem(resource)
    if exc is None:
        return None
    label = item.label or _label(resource, None)
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_input=False)
        reasons = [f"{_loc(err['loc'])}: {err['msg']}" for err in errors[:_MAX_REASONS]]
        more = f" (+{len(errors) - _MAX_REASONS} more)" if len(errors) > _MAX_REASONS else ""
        text = f"fails FHIR R4 validation: {'; '.join(reasons)}{more}"
    else:  # fhir.resources raises ValueError/TypeError for a few root-level checks
        text = f"fails FHIR R4 validation: {_first_line(exc)}"
    kept = salvage(resource, exc)
    error = InvalidResourceError(text + salvaged_note(kept), source=item.where, resource=label)
    error.salvaged = kept.resource if kept is not None else None
    return error


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(resource)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


# --------------------------------------------------------------------------- engines that group by patient themselves
#
# An engine that shuffles lines by patient itself (Apache Spark: fhir_aibl/spark) still reads
# with the reader's own code, so that its records cannot drift from `iter_records`':
# `key_line` is the first pass for one NDJSON line (which patient, or a Medication, or why
# not); `decide_duplicates` is the global decision for a `Type/id` filed under two patients;
# `medication_index` holds the Medications the first pass would hold; `patient_records` is the
# second pass (grouping, de-duplication "newest wins", medication references resolved,
# validation of what the rules read) over one patient's resources held in memory.

#: What `decide_duplicates` says of an occurrence that is not kept.
DROP = _DROP


@dataclass(frozen=True)
class KeyedLine:
    """What the first pass makes of one NDJSON line (`key_line`)."""

    #: "resource" (of `patient`), "medication" (names no patient), "bundle" (a whole Bundle on the
    #: line: its entries' `patients`, `keys` and `medications`), "skipped" (a type no rule reads), "problem"
    kind: str
    patient: str | None = None  #: the patient id of a "resource"
    key: str | None = None  #: `Type/id` of a "resource" or "medication" with an id
    problems: tuple[InputError, ...] = ()  #: why the line, or entries of its Bundle, are not used
    patients: tuple[str, ...] = ()  #: a "bundle": the patient ids of its entries, sorted
    keys: tuple[tuple[str, str], ...] = ()  #: a "bundle": (`Type/id`, patient id) of its entries with an id
    medications: tuple[dict, ...] = ()  #: a "bundle": its Medications and Substances, as the reader indexes them


def key_line(line: bytes | str, where: str) -> KeyedLine:
    """One NDJSON line as the reader's first pass sees it; `where` names it (`file:line`) in problems.

    The same parser (`jsoninput`: not JSON, too deep, a duplicate key), the same relevant types
    and the same patient reference rules as `iter_records`. A Bundle on one line is read as the
    reader reads it (urn: references through its fullUrls) to say which patients it holds.
    """
    if isinstance(line, str):
        line = line.encode("utf-8", "surrogatepass")
    if line.startswith(_BOM):
        line = line[3:]
    try:
        obj = loads_isolating(line)
    except JsonInputError as exc:
        return KeyedLine("problem", problems=(_json_problem(exc, where, _line_number(where)),))
    if not isinstance(obj, dict) or not isinstance(obj.get("resourceType"), str):
        kind = "a JSON object" if isinstance(obj, dict) else f"JSON {type(obj).__name__}"
        return KeyedLine("problem", problems=(NotFhirError(f"not a FHIR resource or Bundle: {kind} without a resourceType", source=where),))
    rtype = obj["resourceType"]
    rid = obj.get("id")
    key = f"{rtype}/{rid}" if isinstance(rid, str) and rid else None
    if rtype == "Bundle":
        return _key_bundle(obj, where)
    if rtype in MEDICATION_TYPES:
        return KeyedLine("medication", key=key)
    if rtype not in RELEVANT_TYPES:
        return KeyedLine("skipped")
    pid, why = _patient_id(obj, None)
    if pid is None:
        problem = NoUsableDataError(f"no patient reference ({why})", source=where, resource=_label(obj, None))
        return KeyedLine("problem", problems=(problem,))
    return KeyedLine("resource", patient=pid, key=key)


def _key_bundle(bundle: dict, where: str) -> KeyedLine:
    spool = _Spool(1 << 62)
    spool.medications = MedicationIndex()  # every one held: the whole input's index decides which it keeps
    try:
        problems = tuple(_read_bundle(bundle, where, where.rsplit(":", 1)[0], "", spool))
        patients: set[str] = set()
        keys: list[tuple[str, str]] = []
        for record in spool.records(validate=None):
            if isinstance(record, PatientRecord):
                pid = record.patient_ref[8:]
                patients.add(pid)
                keys += [(_label(r, None), pid) for r in record.resources if isinstance(r.get("id"), str) and r["id"]]
        return KeyedLine("bundle", problems=problems, patients=tuple(sorted(patients)), keys=tuple(keys),
                         medications=tuple(spool.medications.held()))
    finally:
        spool.close()


def _line_number(where: str) -> int | None:
    tail = where.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else None


def decide_duplicates(occurrences: Iterable[tuple[int, str, dict]]) -> dict[int, int]:
    """The reader's decision for one `Type/id` seen several times: (read order, patient id, resource) of
    each occurrence -> {read order: the position it is kept at, or `DROP`}.

    Replays the reader: the first occurrence is kept; a newer one (higher `meta.versionId`, else
    later `meta.lastUpdated`) replaces it in place within the same patient, or moves to its own
    patient at its own position; an older or equal one is ignored. Exactly one is kept.
    """
    occ = sorted(occurrences, key=lambda o: o[0])
    seq, pid, res = occ[0]
    pos = seq
    for nseq, npid, nres in occ[1:]:
        if not _is_newer(nres, res):
            continue
        if npid != pid:
            pos = nseq
        seq, pid, res = nseq, npid, nres
    return {oseq: pos if oseq == seq else _DROP for oseq, _pid, _res in occ}


def medication_index(medications: Iterable[dict | bytes | str], terminology: Terminology | None = None) -> MedicationIndex:
    """The Medications and Substances the reader's first pass would hold, given in read order
    (parsed, or NDJSON lines; anything else is ignored, as the reader ignores it here)."""
    index = MedicationIndex(keep=_medication_keep(terminology or default_terminology()))
    for item in medications:
        if isinstance(item, (bytes, str)):
            try:
                item = loads_isolating(item)
            except JsonInputError:
                continue  # reported where the line is read
        index.add(item)
    return index


#: One resource for `patient_records`: parsed, an NDJSON line, or (file, line number, either) to name it in problems.
RecordItem = dict | bytes | str | tuple[str, int, dict | bytes | str]


def patient_records(
    items: Iterable[RecordItem],
    medications: MedicationIndex | Iterable[dict | bytes | str] = (),
    *,
    validate: bool = True,
    terminology: Terminology | None = None,
    source: str = "input",
    patient: str | None = None,
) -> Iterator[PatientRecord | InputError]:
    """Records of resources held in memory, in read order: the reader's own second pass.

    Everything `iter_records` does with what it read is done here by the same code: grouping
    by patient, one `Type/id` kept ("newest wins"), a `medicationReference` resolved against
    `medications` (a `medication_index`, or the Medications themselves in read order), the
    resources the rules read validated with `terminology`'s value sets. Problems come first
    for each record, then the record; records are sorted by patient. An item that names
    several patients gives several records; a Bundle item is read as the reader reads one.

    A `(file, line, value)` item is named `file:line` in problems, as an NDJSON line is;
    other items are named `<source>:<n>`, their place in `items`. `medications`, when it is an
    index, is only read: a Bundle item's own Medications go into a copy.

    `patient` (an id): only that patient's record, with its problems; the reading problems of
    a Bundle item are left out (they concern the whole Bundle, and `key_line` reports them).
    """
    terminology = terminology or default_terminology()
    spool = _Spool(1 << 62, terminology)
    if isinstance(medications, MedicationIndex):
        spool.medications = medications
        shared = True
    else:
        spool.medications = medication_index(medications, terminology)
        shared = False
    problems: list[InputError] = []
    try:
        for n, item in enumerate(items, 1):
            if isinstance(item, tuple):
                file, lineno, value = item
                where = f"{file}:{lineno}"
            else:
                file, lineno, value, where = source, n, item, f"{source}:{n}"
            if isinstance(value, (bytes, str)):
                raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
                try:
                    value = loads_isolating(raw[3:] if raw.startswith(_BOM) else raw)
                except JsonInputError as exc:
                    problems.append(_json_problem(exc, where, lineno))
                    continue
            if shared and isinstance(value, dict) and value.get("resourceType") in ("Bundle", *MEDICATION_TYPES):
                spool.medications, shared = spool.medications.copy(), False  # the caller's index is only read
            if isinstance(value, dict) and value.get("resourceType") == "Bundle":
                found = list(_read_bundle(value, where, file, "", spool))
                if patient is None:
                    problems.extend(found)
                continue
            problem = _index_resource(value, where, file, spool)
            if problem is not None:
                problems.append(problem)
        yield from problems
        outcomes = spool.records(validate=_validation_filter(terminology) if validate else None)
        if patient is None:
            yield from outcomes
            return
        held: list[PatientRecord | InputError] = []
        for outcome in outcomes:  # problems come just before their record
            if isinstance(outcome, PatientRecord):
                if outcome.patient_ref == f"Patient/{patient}":
                    yield from held
                    yield outcome
                held = []
            else:
                held.append(outcome)
        yield from held  # problems after the last record: a line that changed (none for items in memory)
    finally:
        spool.close()
