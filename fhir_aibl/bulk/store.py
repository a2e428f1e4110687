"""The per-patient store of `run --bulk --incremental` (docs/bulk.md): whole records from incremental exports.

An incremental export (`_since`) holds only what changed. The store keeps the latest copy
of every resource of the population, by patient, so that the changes merge into whole
records; and each patient's last assessment, so that a patient nothing changed for is not
assessed again on the same date.

One SQLite file (`store.sqlite` in the output folder), from the standard library:

- memory stays flat: a run holds one resource, one patient or one assessment at a time,
  whatever the population; every look-up is an index;
- one transaction per run: a run changes the store inside it and commits only when it is
  complete (`commit`), so an interrupted run leaves the store as the last complete run left
  it, and running again resumes from there;
- tables: `resources` (type, id, patient, read order, JSON), `refs` (which Medication or
  Substance a resource references, to find the patients of a changed Medication),
  `assessments` (patient, as-of date, ruleset, the assessment as JSON) and `meta` (the
  transaction time of the last complete export, and what it exported).

Merging follows the reader's "newest wins" rule (`sources.is_newer`): a copy replaces the
stored one unless the stored one is newer by `meta.versionId` or `meta.lastUpdated`; a tie
goes to the later export (it is later by construction). An update to `entered-in-error`,
`refuted` or `stopped` is an update like any other, and takes effect.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import AiblError
from ..references import MEDICATION_TYPES, MEDICATION_USE_TYPES, parse_reference
from ..sources import RELEVANT_TYPES, is_newer, patient_id

STORE = "store.sqlite"
SCHEMA = 1

_TABLES = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources(
    rtype TEXT NOT NULL, rid TEXT NOT NULL, patient TEXT, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (rtype, rid));
CREATE INDEX IF NOT EXISTS resources_patient ON resources(patient, seq);
CREATE TABLE IF NOT EXISTS refs(rtype TEXT NOT NULL, rid TEXT NOT NULL, target TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS refs_source ON refs(rtype, rid);
CREATE INDEX IF NOT EXISTS refs_target ON refs(target);
CREATE TABLE IF NOT EXISTS assessments(
    patient TEXT PRIMARY KEY, as_of TEXT NOT NULL, ruleset TEXT NOT NULL, body TEXT NOT NULL);
"""


class StoreError(AiblError):
    code = "bulk-store"


class Store:
    """The store in one folder; `begin` a run, `commit` it when complete (else nothing is kept)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / STORE
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)
            self.db.executescript(_TABLES)
            schema = self.meta("schema")
            if schema is None:
                self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
            elif schema != str(SCHEMA):
                raise StoreError(f"{self.path} is a store of another version ({schema}); remove it to start over")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} cannot be used ({exc}); remove it to start over") from exc
        self._seq = 0

    # -- the run's transaction -------------------------------------------------------------
    def begin(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:  # another run holds it (SQLite waits 5 s first)
            raise StoreError(f"{self.path} is in use by another run ({exc})") from exc
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS changed(patient TEXT PRIMARY KEY)")
        self.db.execute("DELETE FROM changed")
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS to_assess(patient TEXT PRIMARY KEY)")
        self.db.execute("DELETE FROM to_assess")
        self._seq = self.db.execute("SELECT coalesce(max(seq), 0) FROM resources").fetchone()[0]

    def commit(self, transaction_time: str, export: dict, members: list[str] | None = None) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('transactionTime', ?)", (transaction_time,))
        if members is None:
            self.db.execute("DELETE FROM meta WHERE key = 'members'")
        else:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('members', ?)", (json.dumps(members),))
        self.db.execute("INSERT OR REPLACE INTO meta VALUES ('export', ?)", (json.dumps(export, sort_keys=True),))
        self.db.execute("COMMIT")

    def close(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.db.close()

    # -- what the last complete run left -----------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @property
    def transaction_time(self) -> str | None:
        return self.meta("transactionTime")

    def export_settings(self) -> dict | None:
        value = self.meta("export")
        return json.loads(value) if value else None

    # -- merging an export -------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every resource and assessment (a full export replaces the store)."""
        for table in ("resources", "refs", "assessments"):
            self.db.execute(f"DELETE FROM {table}")  # noqa: S608 - fixed table names
        self._seq = 0

    def merge(self, resource: dict) -> bool:
        """Merge one exported resource; False if it is not one the store keeps (no type, no patient)."""
        rtype = resource.get("resourceType")
        if not isinstance(rtype, str):
            return False
        kept = rtype in RELEVANT_TYPES or rtype == "CarePlan"
        if rtype in MEDICATION_TYPES:
            patient = None
        elif kept:
            patient = patient_id(resource)
            if patient is None:
                return False  # the reader reports it; it belongs to no record
        else:
            return False
        rid = resource.get("id")
        body = json.dumps(resource, separators=(",", ":"), ensure_ascii=False)
        if not isinstance(rid, str) or not rid:
            rid = "#" + hashlib.sha256(body.encode()).hexdigest()  # no id: no later copy can replace it
        row = self.db.execute("SELECT patient, seq, body FROM resources WHERE rtype = ? AND rid = ?", (rtype, rid)).fetchone()
        if row is not None:
            old = json.loads(row[2])
            if is_newer(old, resource):
                return True  # the store already has a newer copy
            if rtype != "CarePlan":
                self._changed(row[0])  # the patient it belonged to (a resource may move to another)
            self.db.execute(
                "UPDATE resources SET patient = ?, body = ? WHERE rtype = ? AND rid = ?", (patient, body, rtype, rid)
            )
        else:
            self._seq += 1
            self.db.execute("INSERT INTO resources VALUES (?, ?, ?, ?, ?)", (rtype, rid, patient, self._seq, body))
        if rtype != "CarePlan":  # a CarePlan is what fhir-aibl wrote: no change to an assessment
            self._changed(patient)
            if patient is None:
                self._referrers_changed(f"{rtype}/{rid}", set())
        self.db.execute("DELETE FROM refs WHERE rtype = ? AND rid = ?", (rtype, rid))
        for target in _references(resource):
            self.db.execute("INSERT INTO refs VALUES (?, ?, ?)", (rtype, rid, target))
        return True

    def _changed(self, patient: str | None) -> None:
        if patient is not None:
            self.db.execute("INSERT OR IGNORE INTO changed VALUES (?)", (patient,))

    def _referrers_changed(self, target: str, seen: set[str]) -> None:
        """Every patient whose medication resources reference `target` (through Medications too) changed."""
        if target in seen:
            return
        seen.add(target)
        for rtype, rid in self.db.execute("SELECT rtype, rid FROM refs WHERE target = ?", (target,)).fetchall():
            if rtype in MEDICATION_TYPES:
                self._referrers_changed(f"{rtype}/{rid}", seen)
                continue
            row = self.db.execute("SELECT patient FROM resources WHERE rtype = ? AND rid = ?", (rtype, rid)).fetchone()
            if row is not None:
                self._changed(row[0])

    def mark_all_changed(self) -> None:
        self.db.execute("INSERT OR IGNORE INTO changed SELECT DISTINCT patient FROM resources WHERE patient IS NOT NULL")

    # -- reading -----------------------------------------------------------------------------
    def changed(self) -> set[str]:
        """The patients this run's export changed (a few; held as a set)."""
        return {row[0] for row in self.db.execute("SELECT patient FROM changed")}

    def is_changed(self, patient: str) -> bool:
        return self.db.execute("SELECT 1 FROM changed WHERE patient = ?", (patient,)).fetchone() is not None

    def assess(self, patient: str) -> None:
        """Note that this run assesses the patient (a table, not a set: a new date means everyone)."""
        self.db.execute("INSERT OR IGNORE INTO to_assess VALUES (?)", (patient,))

    def assessing(self, patient: str) -> bool:
        return self.db.execute("SELECT 1 FROM to_assess WHERE patient = ?", (patient,)).fetchone() is not None

    def patients(self) -> Iterator[str]:
        """Every patient with a resource other than a CarePlan, sorted as the reader sorts them."""
        cursor = self.db.execute(
            "SELECT DISTINCT patient FROM resources WHERE patient IS NOT NULL AND rtype != 'CarePlan' ORDER BY patient"
        )
        for (patient,) in _batches(cursor):
            yield patient

    def resources_of(self, patient: str, *, careplans: bool = False) -> Iterator[dict]:
        """The patient's resources in the order first read (CarePlans only, or everything but CarePlans)."""
        op = "=" if careplans else "!="
        cursor = self.db.execute(
            f"SELECT body FROM resources WHERE patient = ? AND rtype {op} 'CarePlan' ORDER BY seq", (patient,)  # noqa: S608
        )
        for (body,) in cursor.fetchall():
            yield json.loads(body)

    def medications(self) -> Iterator[dict]:
        placeholders = ",".join("?" * len(MEDICATION_TYPES))
        cursor = self.db.execute(
            f"SELECT body FROM resources WHERE rtype IN ({placeholders}) ORDER BY seq",  # noqa: S608
            tuple(sorted(MEDICATION_TYPES)),
        )
        for (body,) in _batches(cursor):
            yield json.loads(body)

    # -- assessments ---------------------------------------------------------------------------
    def assessment(self, patient: str) -> tuple[str, str, str] | None:
        """(as-of date, ruleset, assessment JSON) of the patient's last assessment, or None."""
        return self.db.execute(
            "SELECT as_of, ruleset, body FROM assessments WHERE patient = ?", (patient,)
        ).fetchone()

    def keep_assessment(self, patient: str, as_of: str, ruleset: str, body: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO assessments VALUES (?, ?, ?, ?)", (patient, as_of, ruleset, body))

    def forget_assessment(self, patient: str) -> None:
        self.db.execute("DELETE FROM assessments WHERE patient = ?", (patient,))


class CarePlans:
    """The patients' fhir-aibl CarePlans from the store, as `bulk.writeback.BulkWriter` asks for them."""

    def __init__(self, store: Store, base_url: str):
        self.store = store
        self.base_url = base_url

    def get(self, patient: str, default: list | None = None) -> list[dict]:
        from ..careplan import IDENTIFIER_SYSTEM

        plans = [
            plan for plan in self.store.resources_of(patient, careplans=True)
            if any((i or {}).get("system") == IDENTIFIER_SYSTEM for i in plan.get("identifier") or [])
        ]
        return sorted(plans, key=lambda plan: str(plan.get("id"))) or (default if default is not None else [])


def _references(resource: dict) -> list[str]:
    """The Medications and Substances a resource references (medicationReference, ingredient.itemReference)."""
    values: list[object] = []
    if resource.get("resourceType") in MEDICATION_USE_TYPES:
        ref = resource.get("medicationReference")
        values.append(ref.get("reference") if isinstance(ref, dict) else None)
    if resource.get("resourceType") in MEDICATION_TYPES:
        for ingredient in resource.get("ingredient") or []:
            ref = ingredient.get("itemReference") if isinstance(ingredient, dict) else None
            values.append(ref.get("reference") if isinstance(ref, dict) else None)
    out = []
    for value in values:
        target = parse_reference(value)
        if target is not None and target[0] in MEDICATION_TYPES:
            out.append(f"{target[0]}/{target[1]}")
    return out


def _batches(cursor: sqlite3.Cursor, size: int = 1000) -> Iterable[tuple]:
    while True:
        rows = cursor.fetchmany(size)
        if not rows:
            return
        yield from rows
