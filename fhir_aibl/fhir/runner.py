"""A run: select patients, then for each one pull, assess and (optionally) write back.

Every patient found ends in exactly one state: `assessed` (no write-back asked),
`written`, `unchanged` (the server already holds this assessment) or `failed` (with the
reason). One patient's failure never stops the others, with two exceptions that are
about the server, not the patient: credentials refused mid-run, and the server away for
`ClientSettings.max_consecutive_outages` patients in a row; then the remaining patients
are reported failed, "not attempted", and what was done stays done. A failed write is retried for
that patient only (`ClientSettings.write_attempts`), after pulling and assessing it
again, so the retry decides on what the server holds now (the earlier attempt may have
been applied and only its answer lost: then the retry finds the CarePlan it wrote, and
the patient is reported `written`, "confirmed after a lost response", not `unchanged`).
Anything unexpected while processing one patient (a server answer of a shape nobody
foresaw, a bug) fails that patient with the error's name, never the run. Patients are
processed one after another: the engine serialises evaluations anyway, and one request
at a time is what a hospital's FHIR server is least likely to throttle. With `parallel`
(`run --workers N`, fhir_aibl/population/pulls.py) N patients are in flight in worker
processes, each with its own engine, and their outcomes are taken in the same order.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..clinician_text import PatientValues
from ..assess import PATIENT_MISSING, Assessor
from ..assessment import Assessment
from ..careplan import Catalogue
from ..errors import AiblError, NoUsableDataError
from .client import FhirClient
from .errors import AuthError, Conflict, FhirError, RateLimited, TransportError, Unavailable
from .population import Population, group_members, select_population
from .pull import Puller
from .writeback import WriteModes, apply_plan, plan_write

log = logging.getLogger("fhir_aibl.fhir")

Status = Literal["assessed", "written", "unchanged", "failed"]
#: Write failures worth a fresh attempt: a version conflict (the plan changed since the pull),
#: the server busy or away, or a lost answer. A 400 is not: the same Bundle would fail again.
RETRYABLE_WRITE = (Conflict, Unavailable, RateLimited, TransportError)
#: Failures that say the server is away rather than anything about the patient.
OUTAGES = (Unavailable, RateLimited, TransportError)


@dataclass
class PatientOutcome:
    patient_id: str
    status: Status
    assessment: Assessment | None = None
    reason: str = ""
    pull_requests: int = 0
    write_requests: int = 0
    attempts: int = 1
    warnings: list[str] = field(default_factory=list)
    #: the failure was the server being unreachable or unavailable, not this patient's data
    outage: bool = False
    #: how a `written` status was established, when not by the write's own answer
    note: str = ""
    #: errors that do not stop this patient's assessment but make the run exit 1 (a missing Patient)
    problems: list[str] = field(default_factory=list)

    @property
    def patient_ref(self) -> str:
        return f"Patient/{self.patient_id}"


@dataclass
class RunReport:
    outcomes: list[PatientOutcome] = field(default_factory=list)
    population: Population | None = None
    #: requests before the first patient (CapabilityStatement) and for the population search
    setup_requests: int = 0
    warnings: list[str] = field(default_factory=list)
    #: why the run stopped before every patient was attempted (the server refused the
    #: credentials, or was away for several patients in a row); "" when it did not
    stopped: str = ""

    @property
    def found(self) -> int:
        return len(self.outcomes)

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[PatientOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def with_problems(self) -> list[PatientOutcome]:
        """Patients assessed (and written) despite an error in their record, e.g. no Patient resource."""
        return [o for o in self.outcomes if o.problems and o.status != "failed"]

    @property
    def assessments(self) -> list[Assessment]:
        return [o.assessment for o in self.outcomes if o.assessment is not None and o.status != "failed"]

    @property
    def pull_requests(self) -> int:
        return sum(o.pull_requests for o in self.outcomes)

    @property
    def write_requests(self) -> int:
        return sum(o.write_requests for o in self.outcomes)

    def pulls_per_patient(self) -> float | None:
        pulled = [o for o in self.outcomes if o.pull_requests]
        return sum(o.pull_requests for o in pulled) / len(pulled) if pulled else None

    def writes_per_written(self) -> float | None:
        written = self.count("written")
        return self.write_requests / written if written else None


class Runner:
    def __init__(
        self,
        client: FhirClient,
        assessor: Assessor,
        *,
        as_of: dt.date,
        write_back: bool = False,
        catalogue: Catalogue | None = None,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], dt.datetime] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ):
        if write_back and catalogue is None:
            raise ValueError("write-back needs the recommendation catalogue")
        self.client = client
        self.assessor = assessor
        self.as_of = as_of
        self.write_back = write_back
        self.catalogue = catalogue
        self.sleep = sleep
        self.now = now or (lambda: dt.datetime.now(dt.timezone.utc))
        self.on_progress = on_progress
        self.puller = Puller(client, careplans=write_back, terminology=assessor.terminology)
        self._modes: WriteModes | None = None
        #: given the run's patient ids, where their outcomes come from instead of `process` in this
        #: process (fhir_aibl/population/pulls.py: worker processes); None: here, one at a time
        self.parallel: Callable[[list[str]], Any] | None = None

    @property
    def modes(self) -> WriteModes:
        if self._modes is None:
            self._modes = WriteModes.discover(self.client.profile, self.client.capabilities())
        return self._modes

    def select(self) -> Population:
        return select_population(self.client, self.assessor.terminology)

    def run(self, patient_ids: Iterable[str] | None = None, *, group: str | None = None) -> RunReport:
        """Run over the given patients, the members of a FHIR Group (`group`), or the population (`None`).

        Raises FhirError only when nothing can run (no server, refused credentials, no
        population search); every per-patient problem ends in that patient's outcome.
        """
        report = RunReport()
        before = self.client.stats.requests
        caps = self.client.capabilities()
        if not caps.known:
            report.warnings.append(
                f"no usable CapabilityStatement ({caps.problem or 'none'}); using the profile's defaults"
            )
        if group is not None:
            report.population = group_members(self.client, group)
            ids = report.population.patient_ids
        elif patient_ids is None:
            report.population = self.select()
            report.warnings.extend(report.population.warnings)
            ids = report.population.patient_ids
        else:
            ids = list(dict.fromkeys(patient_ids))
        report.setup_requests = self.client.stats.requests - before
        parallel = self.parallel(ids) if self.parallel is not None and ids else None
        try:
            self._run_each(ids, report, parallel)
        finally:
            if parallel is not None:
                parallel.close()
        report.warnings.extend(self.puller.warnings_once)
        if parallel is not None:
            report.warnings.extend(w for w in parallel.warnings if w not in report.warnings)
        return report

    def _run_each(self, ids: list[str], report: RunReport, parallel: Any) -> None:
        stop_reason = ""
        outages = 0
        for done, pid in enumerate(ids, start=1):
            if stop_reason:
                # in flight in a worker when the run stopped: finished, so reported as it ended
                settled = parallel.settle(pid) if parallel is not None else None
                report.outcomes.append(
                    settled or PatientOutcome(patient_id=pid, status="failed", reason=f"not attempted: {stop_reason}")
                )
                continue
            try:
                outcome = self.process(pid) if parallel is None else parallel.outcome(pid)
            except AuthError as exc:
                # Credentials refused mid-run (revoked, expired key): every later patient would fail
                # the same way, so they are not attempted; what is done stays done and is reported.
                outcome = PatientOutcome(patient_id=pid, status="failed", reason=f"credentials refused: {exc}")
                stop_reason = "the server refused the credentials"
            report.outcomes.append(outcome)
            outages = outages + 1 if outcome.status == "failed" and outcome.outage else 0
            limit = self.client.settings.max_consecutive_outages
            if limit and outages >= limit and not stop_reason:
                stop_reason = f"the server was unreachable or unavailable for {outages} patients in a row"
            if self.on_progress:
                self.on_progress(done, len(ids))
        report.stopped = stop_reason

    def process(self, patient_id: str) -> PatientOutcome:
        """Pull, assess and (optionally) write one patient; every failure ends in the outcome,
        except refused credentials (AuthError), which are about the run."""
        outcome = PatientOutcome(patient_id=patient_id, status="failed")
        try:
            return self._process(patient_id, outcome)
        except AuthError:
            raise
        except Exception as exc:  # noqa: BLE001 - one patient's surprise must not sink the run
            # Not a FhirError or AiblError: an answer of a shape no check foresaw, or a bug.
            # The patient fails with the error's name; the traceback goes to the debug log.
            log.debug("unexpected error for a patient", exc_info=True)
            outcome.status = "failed"
            outcome.assessment = None
            outcome.reason = f"unexpected error ({type(exc).__name__}: {str(exc)[:200]})"
            return outcome

    def _process(self, patient_id: str, outcome: PatientOutcome) -> PatientOutcome:
        attempts = max(1, self.client.settings.write_attempts) if self.write_back else 1
        # The identifier an earlier attempt tried to write when its answer was an error: that
        # write may have been applied (a transaction is atomic: all of it or nothing); `lost`:
        # no whole answer came back at all (a status, even an error, is an answer).
        tried: str | None = None
        lost = False
        for attempt in range(1, attempts + 1):
            outcome.attempts = attempt
            before = self.client.stats.requests
            try:
                pulled = self.puller.pull(patient_id)
            except AuthError:
                raise  # the credentials are refused: every other patient would fail the same way
            except FhirError as exc:
                outcome.reason = f"pull: {exc}"
                outcome.outage = isinstance(exc, OUTAGES)
                return outcome
            finally:
                outcome.pull_requests += self.client.stats.requests - before
            outcome.warnings = list(pulled.warnings)
            try:
                result = self.assessor.assess(pulled.patient_ref, pulled.resources, self.as_of, pulled.unreadable)
                if not result.facts.facts:
                    raise NoUsableDataError(
                        "nothing to assess: no Patient and no recognised Observation, medication or Condition"
                    )
            except AiblError as exc:
                outcome.reason = f"assess: {exc}"
                return outcome
            outcome.warnings += list(result.facts.problems)
            outcome.problems = list(pulled.invalid) + ([PATIENT_MISSING] if result.patient_missing else [])
            outcome.assessment = result.assessment
            if not self.write_back:
                outcome.status = "assessed"
                return outcome
            before = self.client.stats.requests
            plan = None
            try:
                plan = plan_write(
                    result.assessment,
                    pulled.careplans,
                    self.catalogue,  # type: ignore[arg-type]
                    modes=self.modes,
                    base_url=self.client.base_url,
                    now=self.now(),
                    values=PatientValues(result.assessment, result.facts, pulled.resources),
                )
                written = apply_plan(self.client, plan, self.modes)
            except AuthError:
                raise
            except RETRYABLE_WRITE as exc:
                outcome.write_requests += self.client.stats.requests - before
                outcome.reason = f"write-back: {exc}"
                if plan is not None and plan.action != "unchanged":
                    tried, lost = plan.identifier, isinstance(exc, TransportError)
                if isinstance(exc, TransportError):
                    outcome.reason += "; it may have been applied: a rerun will find it and write nothing twice"
                if attempt < attempts:
                    self._pause_before_retry(exc, attempt)
                    continue
                outcome.outage = isinstance(exc, OUTAGES)
                return outcome
            except AiblError as exc:
                outcome.write_requests += self.client.stats.requests - before
                outcome.reason = f"write-back: {exc}"
                return outcome
            outcome.write_requests += written.requests
            outcome.reason = ""
            if plan.action != "unchanged":
                outcome.status = "written"
            elif tried == plan.identifier:
                # The server holds exactly what the failed attempt sent, and did not before it:
                # that attempt was applied, only its answer was lost (or refused after the fact).
                outcome.status = "written"
                outcome.note = "confirmed after a lost response" if lost else "confirmed after a failed answer"
            else:
                outcome.status = "unchanged"
            return outcome
        return outcome

    def _pause_before_retry(self, exc: FhirError, attempt: int) -> None:
        wait = getattr(exc, "retry_after", None)
        ceiling = self.client.settings.retry.retry_after_ceiling
        if wait is None or wait > ceiling:
            wait = self.client.http.backoff(attempt)
        if wait > 0:
            self.sleep(wait)
