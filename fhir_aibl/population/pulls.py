"""`fhir-aibl run --workers N`: several patients pulled, assessed and written back at once, in worker processes.

The run itself is unchanged (fhir/runner.py decides everything about a patient, in the
order of the patient list, and when to stop); only `Runner.process(pid)` runs elsewhere.
`ParallelPatients` keeps up to `window` patients in flight in N worker processes, each with
its own FHIR client (its own connection pool, its own token), its own `Runner` and its own
`Assessor` (its own engine), and hands their outcomes back in the order the run asks for
them. So a patient's outcome is the one one process gives (its request counts included:
each worker reads its server's CapabilityStatement before its first patient, as the run
does before its first), and the report lists patients in the same order.

What differs from one process, and only when the run stops early (the server refused the
credentials, or was away for several patients in a row): the patients already in flight
when that is decided are finished and reported with their real outcome (they may have
been written), instead of "not attempted"; at most `window - 1` of them.

A worker that dies (a crash in native code) fails the patient it was processing, not the
run: the patients in flight are processed again one at a time, so the one that stops a
process is found and failed ("the worker process stopped"), and the others get their
outcome; then the run goes on with every worker.
"""

from __future__ import annotations

import argparse
import collections
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any

from ..fhir.errors import AuthError
from ..fhir.runner import PatientOutcome, Runner

_RUNNER: Runner | None = None
_READY = False


def _init(args: argparse.Namespace, environ: dict | None, as_of: Any) -> None:
    global _RUNNER
    from ..assess import Assessor
    from ..cli import fewer_collections
    from ..fhir.command import build_client

    fewer_collections().__enter__()  # the command's collector thresholds, for the life of the worker
    from ..careplan import catalogue_for

    catalogue = catalogue_for(args.rules) if args.write_back else None
    client = build_client(args, environ=environ)
    _RUNNER = Runner(client, Assessor(args.rules), as_of=as_of, write_back=args.write_back, catalogue=catalogue)


def _process(pid: str) -> tuple[PatientOutcome | None, str | None, list[str]]:
    """(outcome, None, run warnings) or (None, why the credentials were refused, run warnings)."""
    global _READY
    assert _RUNNER is not None, "_init was not called"
    try:
        if not _READY:
            _RUNNER.client.capabilities()  # before the first patient, as Runner.run does: no patient's request
            _READY = True
        outcome = _RUNNER.process(pid)
    except AuthError as exc:
        return None, str(exc), list(_RUNNER.puller.warnings_once)
    return outcome, None, list(_RUNNER.puller.warnings_once)


class ParallelPatients:
    """Outcomes of `Runner.process` from worker processes, asked for in the run's order."""

    def __init__(self, args: argparse.Namespace, environ: dict | None, as_of: Any, ids: list[str], workers: int,
                 window: int | None = None, process: Any = None):
        self._init_args = (args, environ, as_of)
        self._process = process or _process  # a module-level function (it is sent to the workers by name)
        self.workers = workers
        self.window = window or 2 * workers
        self.todo = collections.deque(ids)
        self.flight: dict[str, Future] = {}
        self.warnings: list[str] = []
        self._executor = self._new_executor(workers)

    def _new_executor(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers, mp_context=get_context("forkserver"), initializer=_init, initargs=self._init_args
        )

    def _fill(self) -> None:
        while self.todo and len(self.flight) < self.window:
            pid = self.todo.popleft()
            self.flight[pid] = self._executor.submit(self._process, pid)

    def outcome(self, pid: str) -> PatientOutcome:
        """`Runner.process(pid)`, run in a worker; raises AuthError as it would."""
        self._fill()
        if pid not in self.flight:  # asked out of order: run it now (never happens in Runner.run)
            self.flight[pid] = self._executor.submit(self._process, pid)
        return self._result(pid)

    def settle(self, pid: str) -> PatientOutcome | None:
        """After the run stopped: the outcome of a patient already in flight, None if it never started."""
        self.todo.clear()
        if pid not in self.flight:
            return None
        try:
            return self._result(pid)
        except AuthError as exc:
            return PatientOutcome(patient_id=pid, status="failed", reason=f"credentials refused: {exc}")

    def _result(self, pid: str) -> PatientOutcome:
        future = self.flight[pid]
        try:
            outcome, refused, warnings = future.result()
        except BrokenProcessPool:
            return self._after_crash(pid)
        del self.flight[pid]
        for warning in warnings:
            if warning not in self.warnings:
                self.warnings.append(warning)
        if refused is not None:
            raise AuthError(refused)
        assert outcome is not None
        return outcome

    def _after_crash(self, pid: str) -> PatientOutcome:
        """A worker died: every patient in flight again, one at a time, so the one that stops a process is found."""
        pending = list(self.flight)
        self.flight.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
        redone: dict[str, Future] = {}
        for other in pending:
            self._executor = self._new_executor(1)
            future = self._executor.submit(self._process, other)
            try:
                future.result()
            except BrokenProcessPool:
                failed: Future = Future()
                failed.set_result(
                    (
                        PatientOutcome(
                            patient_id=other,
                            status="failed",
                            reason="the worker process processing this patient stopped (twice, the second time alone)",
                        ),
                        None,
                        [],
                    )
                )
                future = failed
            except Exception:
                pass  # the future holds it; _result raises or reports it as before
            self._executor.shutdown(wait=True)
            redone[other] = future
        self._executor = self._new_executor(self.workers)
        self.flight = redone
        return self._result(pid)

    def close(self) -> None:
        self.todo.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
