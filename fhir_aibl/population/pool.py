"""Assess a population on every core: worker processes, each with its own engine, output as one process gives it.

    items = assess_population(paths, as_of=..., workers=4, payload="contract", problems=problems,
                              on_warning=print_warning)

yields one payload per assessed patient, sorted by patient as `iter_records` sorts them,
appends every problem to `problems` in the order one process meets them (reading problems
first, in read order; then each patient's, in patient order) and calls `on_warning` for
each data-quality warning in the order one process prints them. The bytes a command writes
from these are the bytes it writes with one process (tests/population).

How the work is shared (shards.py has the details):

1. The input is cut into pieces (plan.py): large NDJSON files into line-aligned byte ranges.
   The workers count the lines of the ranges (so that every error names its true line) and
   index the pieces, each piece's entries split into partitions by patient.
2. The workers look for a resource filed under two patients anywhere in the run. That needs
   one decision over the whole input, which one process makes (sources.py); so if there is
   one (rare: a resource moved between patients) the run is done by one process, here, and
   said so on stderr. It is also done by one process if the workers do not share a hash
   secret (they do: every worker is forked from one forkserver).
3. The workers assess the partitions (several per worker, for balance when the machine is
   shared), each writing its patients' items in patient order to a file; this process
   merges the partitions' files by patient and yields.

Memory: each process holds one piece's index or one patient's record at a time, plus the
reader's merge buffers; items go through files, so no process holds the population.

A worker that dies (a crash in native code, the out-of-memory killer) loses no patient but
possibly the one it was assessing: every partition not finished is resumed after its last
finished patient; the patient in flight in each is first assessed alone, so that the one
whose assessment kills a process is found, reported as an error for that patient, and
skipped, and every other patient is assessed. An unexpected exception while assessing one
patient is that patient's error (one process would stop the run). If processes keep dying
without any progress, the run stops with an error.
"""

from __future__ import annotations

import heapq
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..errors import AiblError, EvaluationError
from . import shards
from .plan import number_lines, plan

#: Partitions per worker: a worker that finishes early takes another partition.
PARTITIONS_PER_WORKER = 4
#: Rounds in a row in which a process dies and no partition gets further: then the run stops.
MAX_IDLE_CRASHES = 3


def default_workers() -> int:
    """The cores this process may run on (what `taskset` allows), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


#: Without --workers, an input smaller than this is read by one process: starting the workers
#: (a forkserver, then each worker's rulebook and engine) costs more than a few MB take to assess.
SMALL_INPUT = 8 << 20


def choose_workers(paths: Any, requested: int | None) -> int:
    """`requested` if given; else every core for an input of `SMALL_INPUT` or more, one process below that."""
    if requested is not None:
        return requested
    from ..sources import expand_paths

    total = 0
    for path in expand_paths(paths):
        try:
            total += path.stat().st_size
        except OSError:
            pass
        if total >= SMALL_INPUT:
            return default_workers()
    return 1


@dataclass
class _Partition:
    index: int
    segments: list[str] = field(default_factory=list)
    after: str | None = None  #: the last patient settled (assessed, or reported as having stopped a process)
    done: bool = False


class _Fallback(Exception):
    """The run needs one process (see step 2 above)."""


def assess_population(
    paths: Any,
    *,
    as_of: Any,
    workers: int,
    payload: str,
    problems: list[AiblError],
    on_warning: Callable[[str], None],
    rules_path: Path | None = None,
    mode: str = "default",
    assessor_factory: Callable[..., Any] | None = None,
    one_process: Callable[[], Iterator[shards.Item]] | None = None,
    notice: Callable[[str], None] | None = None,
) -> Iterator[Any]:
    """See the module docstring. `one_process` yields the items of the whole run in this process (the fallback)."""
    notice = notice or (lambda text: print(text, file=sys.stderr))
    tmp = tempfile.mkdtemp(prefix="fhir-aibl-population-")
    try:
        files, pieces = plan(paths, workers)
        config = shards.RunConfig(
            files=tuple(dict.fromkeys(str(f) for f in files)),
            tmp=tmp,
            partitions=max(1, workers * PARTITIONS_PER_WORKER),
            as_of=as_of,
            payload=payload,
            rules_path=str(rules_path) if rules_path else None,
            mode=mode,
            assessor_factory=assessor_factory,
        )
        try:
            items = _run(config, pieces, workers, problems)
        except _Fallback as why:
            if one_process is None:
                raise AiblError(f"the run needs one process: {why}") from None
            notice(f"note: {why}; assessed by one process")
            items = one_process()
        for item in items:
            for warning in item.warnings:
                on_warning(warning)
            problems.extend(item.problems)
            if item.payload is not None:
                yield item.payload
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _executor(config: shards.RunConfig, workers: int) -> ProcessPoolExecutor:
    # forkserver: every worker starts from one clean process (not a copy of this one, its engine
    # and threads), and all of them share that process's hash secret
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("forkserver"), initializer=shards.init_worker, initargs=(config,)
    )


def _run(config: shards.RunConfig, pieces: list, workers: int, problems: list[AiblError]) -> Iterator[shards.Item]:
    executor = _executor(config, workers)
    try:
        ranged = [p for p in pieces if p.ranged]
        counts = dict(_map(executor, shards.lines_in, ranged)) if ranged else {}
        pieces = number_lines(pieces, counts)
        indexes = _map(executor, shards.index_piece, pieces)
        if len({index.probe for index in indexes}) > 1:
            raise _Fallback("the worker processes hash differently")
        if any(_map(executor, shards.cross_patient, range(shards.KEY_PARTITIONS), len(pieces))):
            raise _Fallback("a resource is filed under two patients, which only one reading of the whole input decides")
        for index in indexes:
            problems.extend(index.problems)
        partitions = [_Partition(i) for i in range(config.partitions)]
        executor = _assess_partitions(executor, config, partitions, len(pieces))
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
    streams = [shards.iter_items(p.segments) for p in partitions]
    return heapq.merge(*streams, key=lambda item: item.pid)


def _map(executor: ProcessPoolExecutor, fn: Callable, items: Any, *extra: Any) -> list:
    """`fn(item, *extra)` for every item, in order; a dead worker is a fault of the run (nothing is assessed yet)."""
    try:
        futures = [executor.submit(fn, item, *extra) for item in items]
        return [f.result() for f in futures]
    except BrokenProcessPool as exc:
        raise AiblError(f"a worker process stopped while reading the input: {exc}") from None


def _assess_partitions(
    executor: ProcessPoolExecutor, config: shards.RunConfig, partitions: list[_Partition], pieces: int
) -> ProcessPoolExecutor:
    """Assess every partition, resuming after a dead worker; returns the executor in use at the end."""
    idle = 0
    attempt = 0
    while True:
        attempt += 1
        futures: dict[Future, _Partition] = {}
        for part in partitions:
            if not part.done:
                out = str(Path(config.tmp) / f"items-{part.index:04d}-{attempt:03d}")
                part.segments.append(out)
                futures[executor.submit(shards.assess_partition, part.index, pieces, out, part.after)] = part
        broken = False
        for future in as_completed(futures):
            try:
                future.result()
                futures[future].done = True
            except BrokenProcessPool:
                broken = True
        if not broken:
            return executor
        executor.shutdown(wait=True, cancel_futures=True)
        executor = _executor(config, 1)  # one process while finding out which patient stops it
        progress = False
        for part in partitions:
            if part.done:
                continue
            items, begun = shards.read_items(part.segments[-1])
            if items:
                part.after, progress = items[-1].pid, True
            if begun is None:
                continue
            # the patient in flight, alone: did its assessment stop the process?
            out = str(Path(config.tmp) / f"items-{part.index:04d}-{attempt:03d}-alone")
            part.segments.append(out)
            try:
                executor.submit(shards.assess_partition, part.index, pieces, out, None, begun).result()
            except BrokenProcessPool:
                executor.shutdown(wait=True)
                executor = _executor(config, 1)
                shards.write_items(out, [_stopped(begun, config)])
            part.after, progress = begun, True
        executor.shutdown(wait=True)
        executor = _executor(config, _workers_of(config))
        idle = 0 if progress else idle + 1
        if idle >= MAX_IDLE_CRASHES:
            raise AiblError("worker processes keep stopping before assessing anyone; nothing more can be done")


def one_process_items(paths: Any, assessor: Any, as_of: Any, payload: str) -> Iterator[shards.Item]:
    """The whole run in this process, as `iter_records` and one assessor give it: the fallback."""
    from ..errors import InputError
    from ..sources import iter_records

    for outcome in iter_records(paths, terminology=assessor.terminology):
        if isinstance(outcome, InputError):
            yield shards.Item("", problems=[outcome])
        else:
            yield shards.make_item(outcome.patient_ref[8:], [outcome], assessor, as_of, payload)


def _workers_of(config: shards.RunConfig) -> int:
    return max(1, config.partitions // PARTITIONS_PER_WORKER)


def _stopped(pid: str, config: shards.RunConfig) -> shards.Item:
    return shards.Item(
        pid,
        problems=[
            EvaluationError(
                "not assessed: the worker process assessing this patient stopped (twice, the second time alone); "
                "the other patients were assessed",
                resource=f"Patient/{pid}",
            )
        ],
    )
