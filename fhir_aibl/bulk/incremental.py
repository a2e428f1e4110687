"""`run --bulk --incremental`: a nightly run that exports only what changed and still reports everyone.

    run = Incremental(args.out, full=args.full, settings=...)   # opens the store (bulk/store.py)
    since = run.since()                  # None: a full export (first run, --full, other export settings)
    run.merge(export_result)             # the changes into whole records; which patients changed
    paths = run.prepare(as_of, ruleset)  # the records to assess, as NDJSON in a work folder
    items = run.merged(new_assessments)  # everyone, in the reader's order: new and reused assessments
    run.commit(transaction_time)         # only when the run is complete

Who is assessed: a patient the export changed (any resource naming them, or a Medication
their medication resources reference); a patient whose last assessment is of another date or
another ruleset (time alone changes assessments: a DXA becoming stale, denosumab becoming
overdue, a birthday), from the stored record, without a request to the server; a patient
never assessed. Every other patient's last assessment is reused as it is. The records to
assess are written as NDJSON and read by the same reader as a full run, so an incremental
run reports what a full run of the same server state reports.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..assessment import Assessment
from .store import CarePlans, Store

WORK = "work"


def settings_of(args, level: str) -> dict:
    """What the store's export asks for: another level, Group, filter or ruleset types means a full export."""
    from .export import RULE_TYPES

    return {"level": level, "group": args.group, "types": list(RULE_TYPES) + ["CarePlan"],
            "filters": list(args.type_filter)}


@dataclass
class Counts:
    changed: int = 0  #: assessed because the export changed their record
    dated: int = 0  #: assessed again from the stored record: another date or ruleset, or never assessed
    reused: int = 0  #: the last assessment, as it was


class Incremental:
    def __init__(self, out: Path, *, full: bool, settings: dict):
        self.out = out
        self.store = Store(out)
        self.store.begin()
        self.settings = settings
        previous = self.store.export_settings()
        self.reason = ""  #: why this run exports everything
        if full:
            self.reason = "--full"
        elif self.store.transaction_time is None:
            self.reason = "no earlier complete run in this folder"
        elif previous != settings:
            self.reason = "the store was built by an export of other settings (level, Group, types or filters)"
        self.counts = Counts()
        self.work = out / WORK
        self._prepared = False
        self.members: list[str] | None = None  #: a Group's members, as read this run

    def since(self) -> str | None:
        return None if self.reason else self.store.transaction_time

    def since_for(self, client, group: str | None) -> str | None:
        """`since`, after checking a Group's members against the store's (one request): a Group export
        with `_since` need not give a new member's earlier records (the specification says it MAY), so
        a changed or unreadable membership means a full export, never a partial record."""
        if group:
            from ..errors import AiblError
            from ..fhir.population import group_members

            try:
                self.members = sorted(group_members(client, group).patient_ids)
            except AiblError as exc:
                self.members = None
                self.reason = self.reason or f"the Group's members could not be read to compare ({exc})"
            else:
                known = self.store.meta("members")
                if not self.reason and (known is None or json.loads(known) != self.members):
                    self.reason = "the Group's members changed"
        return self.since()

    def merge(self, files: Iterable[Path]) -> None:
        """Merge an export's files into the store (a full export replaces it). Lines the store
        cannot place (not JSON, no patient) go to the work folder, for the reader to report."""
        if self.reason:
            self.store.clear()
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        with (self.work / "unplaced.ndjson").open("w", encoding="utf-8") as unplaced:
            for path in files:
                with path.open("rb") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        try:
                            resource = json.loads(line)
                        except ValueError:
                            unplaced.write(line.decode("utf-8", errors="replace").rstrip("\n") + "\n")
                            continue
                        if not isinstance(resource, dict) or not self.store.merge(resource):
                            unplaced.write(json.dumps(resource) + "\n")

    def prepare(self, as_of: str, ruleset: str) -> list[Path]:
        """Write the records of the patients to assess into the work folder; return what to read."""
        store = self.store
        files: dict[str, object] = {}
        self._prepared = True
        try:
            for patient in store.patients():
                if store.is_changed(patient):
                    self.counts.changed += 1
                else:
                    known = store.assessment(patient)
                    if known is not None and known[0] == as_of and known[1] == ruleset:
                        self.counts.reused += 1
                        continue
                    self.counts.dated += 1
                store.assess(patient)
                for resource in store.resources_of(patient):
                    _write(files, self.work, resource)
            if self.counts.changed or self.counts.dated:
                for medication in store.medications():
                    _write(files, self.work, medication)
        finally:
            for fh in files.values():
                fh.close()  # type: ignore[attr-defined]
        return [self.work]

    def careplans(self, base_url: str) -> CarePlans:
        return CarePlans(self.store, base_url)

    def merged(self, assessments: Iterable[Assessment]) -> Iterator[Assessment]:
        """Everyone, sorted as the reader sorts: the new assessments (kept for the next run) and the reused ones."""
        assert self._prepared, "prepare first"
        store, fresh = self.store, iter(assessments)
        pending = next(fresh, None)
        for patient in store.patients():
            if not store.assessing(patient):
                known = store.assessment(patient)
                if known is not None:
                    yield Assessment.model_validate_json(known[2])
                continue
            while pending is not None and pending.patient[8:] < patient:
                yield self._keep(pending)  # not expected: the reader and the store group alike
                pending = next(fresh, None)
            if pending is not None and pending.patient[8:] == patient:
                yield self._keep(pending)
                pending = next(fresh, None)
            else:
                store.forget_assessment(patient)  # rejected this time: nothing old stands in for it
        while pending is not None:
            yield self._keep(pending)
            pending = next(fresh, None)

    def _keep(self, assessment: Assessment) -> Assessment:
        self.store.keep_assessment(
            assessment.patient[8:], assessment.as_of.isoformat(), assessment.ruleset.name, assessment.model_dump_json()
        )
        return assessment

    def commit(self, transaction_time: str) -> None:
        self.store.commit(transaction_time, self.settings, members=self.members)
        shutil.rmtree(self.work, ignore_errors=True)

    def summary(self) -> str:
        c = self.counts
        how = f"a full export ({self.reason})" if self.reason else f"changes since {self.store.transaction_time}"
        return (
            f"incremental: {how}; {c.changed} patients changed, {c.dated} re-assessed for the date, "
            f"{c.reused} reused, of {c.changed + c.dated + c.reused}"
        )

    def close(self) -> None:
        self.store.close()  # without a commit, the run leaves the store as it found it


def _write(files: dict, folder: Path, resource: dict) -> None:
    rtype = resource["resourceType"]
    fh = files.get(rtype)
    if fh is None:
        fh = files[rtype] = (folder / f"{rtype}.000.ndjson").open("w", encoding="utf-8")
    fh.write(json.dumps(resource, separators=(",", ":"), ensure_ascii=False) + "\n")
