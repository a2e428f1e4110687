"""What the worker processes run: index a piece, look for resources under two patients, assess a partition.

These are the file reader's own two passes (fhir_aibl/sources.py, "Memory"), cut along
other lines so that every process has a share of each:

1. `index_piece` (the first pass, one piece at a time): the reader's own code indexes the
   piece's lines into the reader's own index entries, numbered in read order
   (`piece.index << 32` + the order within the piece), and writes them out sorted, split
   into partitions by patient (a CRC-32 of the patient id, the same in every process), plus
   the (resource key, patient) hashes the reader uses to find a resource filed under two
   patients, and the Medications the piece holds (they name no patient; every partition
   resolves references against those of every piece, merged in read order). It returns the
   reading problems of the piece, in the order met.
2. `cross_patient` (between the passes): whether any resource key appears under two
   patients. Rare; the runner then falls back to one process (see pool.py).
3. `assess_partition` (the second pass, one partition at a time): merges the partition's
   entries of every piece by (patient, read order), so each patient's entries arrive
   together in the order one process reads them, builds the record with the reader's own
   code (CRC check, de-duplication, validation), assesses it with `assess_record`, and
   writes one item per patient, in patient order, to a file: the patient's problems,
   warnings and result. Before each patient it writes a marker naming it, so that if the
   process dies the runner knows whose assessment was in flight.

Each worker process has its own `Assessor`, built when it first assesses (so its own
durable_rules engine); nothing is shared between processes but files in the run's private
temporary folder.
"""

from __future__ import annotations

import datetime as dt
import itertools
import pickle
import zlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import sources
from ..assess import Assessor, assess_record, record_problems
from ..errors import AiblError, EvaluationError, InputError
from ..validation import ValidationMemo
from .plan import Piece, count_lines

#: Key-hash partitions for the search for resources under two patients.
KEY_PARTITIONS = 64
#: Hashed in every worker: equal answers mean one hash secret, so key hashes compare across processes.
PROBE = "fhir-aibl population probe"


@dataclass(frozen=True)
class RunConfig:
    """What every worker needs to know about the run (pickled once per process)."""

    files: tuple[str, ...]  #: every file read, in read order: index entries name files by position
    tmp: str  #: the run's private temporary folder
    partitions: int
    as_of: dt.date
    payload: str  #: "contract", "explained" or "assessment": what an item carries
    rules_path: str | None = None
    mode: str = "default"
    #: builds the worker's Assessor (module-level, so that it pickles by name); None: Assessor(rules, mode)
    assessor_factory: Callable[..., Assessor] | None = None
    spool_limit: int = sources.SPOOL_LIMIT


@dataclass
class PieceIndex:
    problems: list[InputError]
    probe: int
    entries: int


@dataclass
class Item:
    """One patient's outcome, in the order one process would have produced it."""

    pid: str
    problems: list[AiblError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    payload: Any = None  #: None when the patient was not assessed (its problems say why)


_CONFIG: RunConfig | None = None
_ASSESSOR: Assessor | None = None


def init_worker(config: RunConfig) -> None:
    global _CONFIG, _ASSESSOR
    _CONFIG, _ASSESSOR = config, None
    from ..cli import fewer_collections

    # the command's collector thresholds, for the life of the worker (a fresh process has the defaults)
    fewer_collections().__enter__()


def _config() -> RunConfig:
    assert _CONFIG is not None, "init_worker was not called"
    return _CONFIG


def _assessor() -> Assessor:
    global _ASSESSOR
    if _ASSESSOR is None:
        config = _config()
        factory = config.assessor_factory or Assessor
        _ASSESSOR = factory(Path(config.rules_path) if config.rules_path else None, mode=config.mode)
    return _ASSESSOR


def partition_of(pid: str, partitions: int) -> int:
    return zlib.crc32(pid.encode("utf-8", "surrogatepass")) % partitions


def run_path(tmp: str, piece: int, part: int) -> Path:
    return Path(tmp) / f"piece-{piece:05d}" / f"part-{part:04d}"


def key_paths(tmp: str, piece: int, kpart: int) -> tuple[Path, Path]:
    base = Path(tmp) / f"piece-{piece:05d}"
    return base / f"keys-{kpart:03d}", base / f"pids-{kpart:03d}"


def medications_path(tmp: str, piece: int) -> Path:
    """The Medications and Substances one piece indexed (pickled `MedicationIndex.parts`)."""
    return Path(tmp) / f"piece-{piece:05d}" / "medications.pkl"


class _RunSpool(sources._Spool):
    """The reader's index, with the run's file numbering; its cross-patient search is done for the whole run."""

    def __init__(self, config: RunConfig, seq: int = 0) -> None:
        super().__init__(config.spool_limit)
        self.files = list(config.files)
        self._file_index = {name: i for i, name in enumerate(self.files)}
        self.seq = seq
        self._memo = _memo()  # one memo for all the partitions this process assesses


_MEMO: ValidationMemo | None = None


def _memo() -> ValidationMemo:
    global _MEMO
    if _MEMO is None:
        _MEMO = ValidationMemo()
    return _MEMO

    def _cross_patient_keys(self) -> set[int]:
        return set()  # `cross_patient` looked at every piece; the runner goes on only when it found none


# --------------------------------------------------------------------------- tasks


def lines_in(piece: Piece) -> tuple[int, int]:
    return piece.index, count_lines(piece)


def index_piece(piece: Piece) -> PieceIndex:
    """The first pass over one piece; its entries go to the partition files, its problems back to the runner."""
    config = _config()
    spool = _RunSpool(config, seq=piece.index << 32)
    problems: list[InputError] = []
    try:
        if piece.ranged:
            source = str(piece.path)
            try:
                problems.extend(
                    sources._read_ndjson(piece.path, source, spool, piece.start or 0, piece.end, piece.first_line)
                )
            except OSError as exc:
                problems.append(InputError(f"cannot read file: {exc.strerror or exc}", source=source))
        else:
            problems.extend(sources._read_file(piece.path, spool))
        count = _write_partitions(spool, piece.index, config)
        if len(spool.medications):  # Medications name no patient: every partition needs every piece's
            with medications_path(config.tmp, piece.index).open("wb") as fh:
                pickle.dump(spool.medications.parts(), fh, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        spool.close()
    return PieceIndex(problems=problems, probe=hash(PROBE), entries=count)


def _write_partitions(spool: _RunSpool, piece: int, config: RunConfig) -> int:
    folder = Path(config.tmp) / f"piece-{piece:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    chunks: dict[int, list[tuple]] = {}
    handles: dict[int, Any] = {}
    keys = [(array("q"), array("q")) for _ in range(KEY_PARTITIONS)]
    count = 0
    try:
        for entry in spool._all_entries():  # sorted by (patient, read order)
            count += 1
            part = partition_of(entry[0], config.partitions)
            chunk = chunks.setdefault(part, [])
            chunk.append(entry)
            if len(chunk) >= sources._CHUNK:
                fh = handles.get(part) or handles.setdefault(part, run_path(config.tmp, piece, part).open("wb"))
                pickle.dump(chunk, fh, protocol=pickle.HIGHEST_PROTOCOL)
                chunks[part] = []
            if entry[2] is not None:
                kk, pp = keys[entry[2] % KEY_PARTITIONS]
                kk.append(entry[2])
                pp.append(hash(entry[0]))
        for part, chunk in chunks.items():
            if chunk:
                fh = handles.get(part) or handles.setdefault(part, run_path(config.tmp, piece, part).open("wb"))
                pickle.dump(chunk, fh, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        for fh in handles.values():
            fh.close()
    for i, (kk, pp) in enumerate(keys):
        if kk:
            kpath, ppath = key_paths(config.tmp, piece, i)
            with kpath.open("wb") as fh:
                kk.tofile(fh)
            with ppath.open("wb") as fh:
                pp.tofile(fh)
    return count


def cross_patient(kpart: int, pieces: int) -> bool:
    """True if a resource key of this key partition appears under two patients anywhere in the run."""
    config = _config()
    owner: dict[int, int] = {}
    for piece in range(pieces):
        kpath, ppath = key_paths(config.tmp, piece, kpart)
        if not kpath.exists():
            continue
        keys, pids = array("q"), array("q")
        keys.frombytes(kpath.read_bytes())
        pids.frombytes(ppath.read_bytes())
        for khash, phash in zip(keys, pids):
            if owner.setdefault(khash, phash) != phash:
                return True
    return False


def assess_partition(part: int, pieces: int, out: str, after: str | None = None, only: str | None = None) -> int:
    """Assess the patients of one partition, in patient order, writing an `Item` each to `out`.

    `after`: skip the patients up to and including this one (resuming after a crash);
    `only`: assess this patient alone (finding out whether it is what stopped a process).
    Returns the number of items written.
    """
    config = _config()
    assessor = _assessor()
    validate = sources._validation_filter(assessor.terminology)
    spool = _RunSpool(config)
    spool.medications = _run_medications(spool.medications, config.tmp, pieces)
    spool.runs = [p for p in (run_path(config.tmp, i, part) for i in range(pieces)) if p.exists()]
    if spool.runs:
        spool.tmp = Path(out + ".merge")
        spool.tmp.mkdir(exist_ok=True)
    written = 0
    try:
        with open(out, "wb") as fh:
            for pid, group in itertools.groupby(spool._all_entries(), key=lambda e: e[0]):
                if (after is not None and pid <= after) or (only is not None and pid != only):
                    if only is not None and pid > only:
                        break
                    continue
                pickle.dump(("begin", pid), fh, protocol=pickle.HIGHEST_PROTOCOL)
                fh.flush()  # on disk before the work starts: if this process dies, the runner reads whose it was
                item = make_item(pid, spool._record(pid, list(group), {}, validate), assessor, config.as_of, config.payload)
                pickle.dump(("item", item), fh, protocol=pickle.HIGHEST_PROTOCOL)
                written += 1
    finally:
        spool.close()
    return written


_MEDICATIONS: tuple[tuple[str, int], Any] | None = None


def _run_medications(empty: Any, tmp: str, pieces: int) -> Any:
    """The Medications of every piece, merged in read order into `empty` once per process and run (a
    worker assesses several partitions): a Bulk export keeps them in a file of their own, which
    another process indexed; without them a drug given by reference would read as unresolved. The
    second pass only reads the index, so the partitions of one process share it."""
    global _MEDICATIONS
    if _MEDICATIONS is None or _MEDICATIONS[0] != (tmp, pieces):
        for i in range(pieces):
            path = medications_path(tmp, i)
            if path.exists():
                with path.open("rb") as fh:
                    empty.merge(*pickle.load(fh))
        _MEDICATIONS = ((tmp, pieces), empty)
    return _MEDICATIONS[1]


def make_item(pid: str, outcomes: Any, assessor: Assessor, as_of: dt.date, payload: str) -> Item:
    """One patient's reader outcomes (its problems, then its record), assessed into an `Item`."""
    item = Item(pid)
    for outcome in outcomes:
        if isinstance(outcome, AiblError):
            item.problems.append(outcome)
            continue
        try:
            result = assess_record(assessor, outcome, as_of)
        except AiblError as exc:
            item.problems.append(exc)
            continue
        except Exception as exc:  # a fault of this patient's assessment must not stop the others
            item.problems.append(
                EvaluationError(f"assessment failed: {type(exc).__name__}: {exc}", resource=outcome.patient_ref)
            )
            continue
        item.warnings = [str(note) for note in result.facts.problems]
        item.problems.extend(record_problems(result, outcome))
        assessment = result.assessment
        if payload == "contract":
            item.payload = assessment.contract()
        elif payload == "explained":
            item.payload = assessment.explained()
        else:
            item.payload = assessment
    return item


def read_items(path: str) -> tuple[list[Item], str | None]:
    """The items of a partition file, and the patient begun but not finished (a process stopped), if any."""
    items: list[Item] = []
    begun: str | None = None
    try:
        with open(path, "rb") as fh:
            while True:
                try:
                    kind, value = pickle.load(fh)  # our own file, in the run's private folder
                except (EOFError, pickle.UnpicklingError, ValueError, TypeError):
                    break  # the end, or the last write cut short
                if kind == "begin":
                    begun = value
                else:
                    items.append(value)
                    begun = None
    except FileNotFoundError:
        pass
    return items, begun


def write_items(path: str, items: list[Item]) -> None:
    with open(path, "wb") as fh:
        for item in items:
            pickle.dump(("item", item), fh, protocol=pickle.HIGHEST_PROTOCOL)


def iter_items(paths: list[str]) -> Any:
    """The items of a partition's files, in order (each file continues the one before)."""
    for path in paths:
        if not Path(path).exists():
            continue  # a task that never started before a process died
        with open(path, "rb") as fh:
            while True:
                try:
                    kind, value = pickle.load(fh)
                except (EOFError, pickle.UnpicklingError, ValueError, TypeError):
                    break
                if kind == "item":
                    yield value
