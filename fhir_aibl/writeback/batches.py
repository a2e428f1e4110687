"""Writing a population back in batches: several patients' writes in one transaction.

For each batch of patients (`batch_size`, 25 by default):

1. their existing fhir-aibl CarePlans are read in one search,
   `CarePlan?patient=a,b,...&identifier=urn:fhir-aibl:careplan|` (one search per patient
   where the server refuses that one);
2. each patient's write is decided by the connector's decision (fhir/writeback.py:
   `plan_write`, or `plan_write_resources` for CarePlans given ready-made): unchanged
   patients cost nothing more;
3. the writes of the batch go in one transaction Bundle, each patient's entries as they
   would go alone (conditional creates on the business identifier, versioned revocations,
   the Provenance). A server whose CapabilityStatement has no `transaction` gets each
   patient's writes as `run --write-back` sends them.

A transaction is atomic, so a refusal says nothing about which patient caused it: a batch
the server refuses (4xx) is split in two and each half sent again, down to the one patient
whose write is refused, who alone fails. A 413 (too large) halves the batch size for the rest
of the run. An outage (5xx, 429, a lost answer) fails the patients of that batch, whose write
may have been applied: the journal does not confirm them, and a rerun decides again from
what the server then holds, writing nothing twice; three batches in a row stop the run.
Refused credentials (401) stop the run at once: nothing more is attempted.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..careplan import IDENTIFIER_SYSTEM, Catalogue
from ..errors import AiblError
from ..fhir.client import FhirClient, SearchSpec
from ..fhir.errors import AuthError, Conflict, FhirError, IgnoredParameter, NotSupported, PageLimit, ServerError
from ..fhir.pull import patient_of
from ..fhir.writeback import (
    WriteModes,
    WritePlan,
    apply_plan,
    check_answers,
    identifier_of,
    outcome_of,
    plan_write,
    plan_write_resources,
)
from .inputs import Item
from .journal import Journal, content_hash

DEFAULT_BATCH = 25
#: batches in a row failed by an outage before the run stops
OUTAGE_STOP = 3
#: batches whose one search is checked against a search for one of its patients, until one has a CarePlan
PROBES = 3
_FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@dataclass
class Tally:
    total: int = 0
    done: int = 0
    written: int = 0
    unchanged: int = 0
    #: of the unchanged: confirmed by the journal of an earlier run, not asked again
    confirmed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    requests: int = 0
    setup_requests: int = 0
    write_requests: int = 0
    batches: int = 0
    #: why the run stopped before every patient was attempted
    stopped: str = ""
    notes: list[str] = field(default_factory=list)


class PopulationWriter:
    def __init__(
        self,
        client: FhirClient,
        catalogue: Catalogue,
        journal: Journal,
        *,
        batch_size: int = DEFAULT_BATCH,
        now: dt.datetime | None = None,
        on_batch: Callable[[Tally], None] | None = None,
        recheck: bool = False,
    ):
        self.client = client
        self.catalogue = catalogue
        self.journal = journal
        self.now = now or dt.datetime.now(dt.timezone.utc)
        self.on_batch = on_batch
        self.recheck = recheck
        caps = client.capabilities()
        self.modes = WriteModes.discover(client.profile, caps)
        self.batched = self.modes.transaction and batch_size > 1
        self.limit = batch_size
        self.patient_param = next(
            (name for name in ("patient", "subject") if caps.search_param("CarePlan", name) is not False), "patient"
        )
        self.by_identifier = caps.search_param("CarePlan", "identifier") is not False
        self.one_search = True  #: the existing CarePlans of a batch in one search, until the server refuses it
        self.one_search_verified = False
        self.probes = 0
        self.outages = 0
        self.tally = Tally()
        self.tally.setup_requests = client.stats.requests

    # -- the run -----------------------------------------------------------------------------
    def run(self, items: Sequence[Item]) -> Tally:
        tally = self.tally
        tally.total = len(items)
        todo: list[Item] = []
        for item in items:
            record = None if self.recheck else self.journal.confirmed(item.patient, item.identifier)
            if record is not None:
                tally.unchanged += 1
                tally.confirmed += 1
                tally.done += 1
            else:
                todo.append(item)
        start = 0
        while start < len(todo):
            if tally.stopped:
                for item in todo[start:]:
                    self._fail(item, f"not attempted: {tally.stopped}", journal=False)
                break
            chunk = todo[start : start + self.limit]
            start += len(chunk)
            before = self.client.stats.requests
            self._batch(chunk)
            tally.write_requests += self.client.stats.requests - before
            tally.batches += 1
            self.journal.sync()
            if self.on_batch:
                self.on_batch(tally)
        tally.requests = self.client.stats.requests
        return tally

    def _batch(self, items: list[Item]) -> None:
        valid = []
        for item in items:
            if not _FHIR_ID.match(item.patient.split("/", 1)[1]):
                self._fail(item, "write-back: the patient reference is not Patient/<a FHIR id>")
            else:
                valid.append(item)
        try:
            existing = self._existing([i.patient.split("/", 1)[1] for i in valid])
        except AuthError as exc:
            self._stop(valid, exc)
            return
        except FhirError as exc:
            for item in valid:
                self._fail(item, f"reading the existing CarePlans: {exc}")
            self._outage()
            return
        plans: list[tuple[Item, WritePlan]] = []
        for item in valid:
            try:
                plan = self._plan(item, existing.get(item.patient.split("/", 1)[1], []))
            except AiblError as exc:
                self._fail(item, f"write-back: {exc}")
                continue
            except Exception as exc:  # noqa: BLE001 - resources of a shape no check foresaw: this patient fails
                self._fail(item, f"write-back: unexpected error ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            if plan.bundle is None:
                self._done(item, plan, None, "unchanged")
            else:
                plans.append((item, plan))
        if not plans:
            return
        if self.batched:
            self._send(plans)
            return
        for n, (item, plan) in enumerate(plans):
            try:
                outcome = apply_plan(self.client, plan, self.modes)
            except AuthError as exc:
                self._stop([i for i, _ in plans[n:]], exc)
                return
            except AiblError as exc:
                self._fail(item, _reason(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a server answer nobody foresaw: this patient fails
                self._fail(item, f"write-back: unexpected error ({type(exc).__name__}: {str(exc)[:200]})")
                continue
            self._done(item, plan, outcome.careplan_id, "written")

    def _plan(self, item: Item, existing: list[dict]) -> WritePlan:
        if item.assessment is not None:
            return plan_write(item.assessment, existing, self.catalogue, modes=self.modes,
                              base_url=self.client.base_url, now=self.now)
        return plan_write_resources(dict(item.risk or {}), dict(item.plan or {}), existing, source=item.source,
                                    modes=self.modes, base_url=self.client.base_url, now=self.now)

    # -- reading what the server holds -------------------------------------------------------------
    def _existing(self, ids: list[str]) -> dict[str, list[dict]]:
        """fhir-aibl's CarePlans of these patients, any status, by patient id, sorted by id."""
        if not ids:
            return {}
        found: dict[str, dict[str, dict]] = {}
        wanted = set(ids)
        searches = [ids] if self.one_search and len(ids) > 1 else [[i] for i in ids]
        for group in searches:
            try:
                plans = self.client.search(self._spec(group))
            except (IgnoredParameter, NotSupported, PageLimit, ServerError) as exc:
                if len(group) == 1 or (
                    isinstance(exc, ServerError) and (exc.status >= 500 or exc.status == 429)
                ):
                    raise
                self.one_search = False  # this server does not take several patients at once
                self.tally.notes.append(f"the server refused one search for several patients ({exc}): one a patient")
                return self._existing(ids)
            for plan in plans:
                if plan.get("resourceType") != "CarePlan" or not plan.get("id") or identifier_of(plan) is None:
                    continue
                pid = patient_of(plan, self.client.base_url)
                if pid in wanted:  # never another patient's plan, whatever the server answered
                    found.setdefault(pid, {})[plan["id"]] = plan
        result = {pid: [plans[k] for k in sorted(plans)] for pid, plans in found.items()}
        if len(searches) == 1 and len(ids) > 1 and not self.one_search_verified:
            self._check_one_search(ids, result)
            if not self.one_search:
                return self._existing(ids)
        return result

    def _check_one_search(self, ids: list[str], result: dict[str, list[dict]]) -> None:
        """A server that took `patient=a,b` for one id named "a,b" (or for "a") would answer too
        little, and a patient's earlier CarePlan would not be revoked. The answer is trusted once
        it names CarePlans of two patients; until then (at most PROBES batches) a patient it
        gave none is asked alone, and must have none."""
        if len(result) >= 2:
            self.one_search_verified = True
            return
        if self.probes >= PROBES:
            return
        self.probes += 1
        probe = next(pid for pid in reversed(ids) if pid not in result)
        if self._existing_one(probe):
            self.one_search = False
            self.tally.notes.append("the server's answer to one search for several patients missed CarePlans: "
                                    "one search a patient")

    def _existing_one(self, pid: str) -> list[str]:
        return [
            plan["id"] for plan in self.client.search(self._spec([pid]))
            if plan.get("resourceType") == "CarePlan" and plan.get("id") and identifier_of(plan) is not None
            and patient_of(plan, self.client.base_url) == pid
        ]

    def _spec(self, ids: list[str]) -> SearchSpec:
        params = [(self.patient_param, ",".join(ids))]
        if self.by_identifier:
            params.append(("identifier", f"{IDENTIFIER_SYSTEM}|"))
        params.append(("_count", str(max(self.client.profile.page_size, 4 * len(ids)))))
        return SearchSpec("CarePlan", tuple(params))

    # -- sending -----------------------------------------------------------------------------------
    def _send(self, plans: list[tuple[Item, WritePlan]], *, again: bool = True) -> None:
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [entry for _item, plan in plans for entry in plan.bundle["entry"]],  # type: ignore[index]
        }
        try:
            answers = self.client.transaction(bundle, what=f"write-back transaction of {len(plans)} patients")
        except AuthError as exc:
            self._stop([item for item, _ in plans], exc)
            return
        except ServerError as exc:
            if exc.status == 413 and len(plans) > 1:
                half = len(plans) // 2
                if half < self.limit:
                    self.limit = half
                    self.tally.notes.append(f"the server refused a batch as too large: {half} patients a batch from then on")
                self._send(plans[:half])
                self._send(plans[half:])
                return
            if 400 <= exc.status < 500 and exc.status != 429:
                if len(plans) > 1:  # which patient's write? split and ask again
                    half = len(plans) // 2
                    self._send(plans[:half])
                    self._send(plans[half:])
                elif isinstance(exc, Conflict) and again:
                    self._decide_again(plans[0][0], exc)
                else:
                    self._fail(plans[0][0], _reason(exc))
                return
            self._fail_outage(plans, exc)
            return
        except FhirError as exc:
            self._fail_outage(plans, exc)
            return
        self.outages = 0
        start = 0
        for item, plan in plans:
            part = answers[start : start + len(plan.bundle["entry"])]  # type: ignore[index]
            start += len(part)
            try:
                check_answers(plan, part)
            except FhirError as exc:
                self._fail(item, _reason(exc))
                continue
            self._done(item, plan, outcome_of(plan, part).careplan_id, "written")

    def _decide_again(self, item: Item, conflict: FhirError) -> None:
        """A 409/412 for one patient: a CarePlan changed since it was read (a clinician's edit, a
        racing run). Read it again and decide again, once, as `run --write-back` does."""
        try:
            existing = self._existing([item.patient.split("/", 1)[1]])
            plan = self._plan(item, existing.get(item.patient.split("/", 1)[1], []))
        except AuthError as exc:
            self._stop([item], exc)
            return
        except AiblError as exc:
            self._fail(item, f"{_reason(conflict)}; read again: {exc}")
            return
        if plan.bundle is None:
            self._done(item, plan, None, "unchanged")
        else:
            self._send([(item, plan)], again=False)

    # -- outcomes ----------------------------------------------------------------------------------
    def _done(self, item: Item, plan: WritePlan, careplan: str | None, outcome: str) -> None:
        tally = self.tally
        tally.done += 1
        if outcome == "written":
            tally.written += 1
        else:
            tally.unchanged += 1
        content = content_hash([e["resource"] for e in plan.bundle["entry"]]) if plan.bundle else ""
        self.journal.record(item.patient, item.identifier, outcome, action=plan.action,
                            careplan=careplan or plan.careplan_id, content=content)

    def _fail(self, item: Item, reason: str, *, journal: bool = True) -> None:
        self.tally.done += 1
        self.tally.failed.append((item.patient, reason))
        if journal:
            self.journal.record(item.patient, item.identifier, "failed", reason=reason)

    def _fail_outage(self, plans: list[tuple[Item, WritePlan]], exc: FhirError) -> None:
        for item, _plan in plans:
            self._fail(item, _reason(exc) + "; it may have been applied: a rerun will find it and write nothing twice")
        self._outage()

    def _outage(self) -> None:
        self.outages += 1
        if self.outages >= OUTAGE_STOP:
            self.tally.stopped = f"the server failed {self.outages} batches in a row"

    def _stop(self, items: list[Item], exc: AuthError) -> None:
        for item in items:
            self._fail(item, f"credentials refused: {exc}")
        self.tally.stopped = "the server refused the credentials"


def _reason(exc: AiblError) -> str:
    return f"write-back: {exc}"


class Progress:
    """A line on stderr every `every` patients or `seconds` seconds: done/total, outcomes, rate."""

    def __init__(self, write: Callable[[str], None], *, every: int = 100, seconds: float = 10.0):
        self.write = write
        self.every = every
        self.seconds = seconds
        self.started = time.monotonic()
        self.last_time = self.started
        self.last_done = 0

    def __call__(self, tally: Tally, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and tally.done - self.last_done < self.every and now - self.last_time < self.seconds:
            return
        if final and tally.done == self.last_done:
            return
        self.last_time, self.last_done = now, tally.done
        rate = tally.done / max(now - self.started, 1e-9)
        self.write(
            f"write-back: {tally.done}/{tally.total} patients, written {tally.written}, "
            f"unchanged {tally.unchanged}, failed {len(tally.failed)}, {rate:.1f} patients/s"
        )
