"""`fhir-aibl run --workers N` against the real test FHIR server: the same outcomes as one process."""

from __future__ import annotations

import argparse
import datetime as dt
import os

import pytest

from fhir_aibl.fhir import command
from fhir_aibl.fhir.runner import PatientOutcome
from fhir_aibl.population import pulls

from ..fhir.conftest import AS_OF, fresh_server, loaded_server, run_command, sekmet_base_url, sekmet_seed  # noqa: F401

CRASH = "v06"


def crash_on_v06(pid: str):
    """`pulls._process`, except that processing Patient/v06 kills the worker."""
    if pid == CRASH:
        os._exit(3)
    return pulls._process(pid)


def test_run_all_with_workers_is_one_process_run(loaded_server):
    one = run_command("--fhir-base", loaded_server, "--all", "--as-of", AS_OF, "--format", "json", "--workers", "1")
    two = run_command("--fhir-base", loaded_server, "--all", "--as-of", AS_OF, "--format", "json", "--workers", "2")
    assert one.code == two.code
    assert len(one.json()) > 40
    assert two.stdout == one.stdout

    def lines(run):
        return [line for line in run.stderr.splitlines() if not line.startswith("round trips")]

    assert lines(two) == lines(one)  # warnings, failures, counts by status: the same
    # Each worker learns on its first patient what the server refuses (a batch of searches,
    # here): at most one request more per extra worker.
    requests = [int(run.stderr.split(" per patient (")[1].split(" ")[0]) for run in (one, two)]
    assert requests[0] <= requests[1] <= requests[0] + 1


def test_written_by_workers_is_what_one_process_would_write(fresh_server):
    first = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back", "--workers", "2")
    assert first.code == 0, first.stderr
    assert "written 0" not in first.stderr
    again = run_command("--fhir-base", fresh_server, "--all", "--as-of", AS_OF, "--write-back", "--workers", "1")
    assert again.code == 0, again.stderr
    found = int(again.stderr.split("patients found ")[1].split(",")[0])
    assert f"unchanged {found}, failed 0" in again.stderr


def test_a_dead_worker_fails_only_its_patient(loaded_server):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(["--fhir-base", loaded_server, "--patient", "v01", "v06", "v07", "v08", "--as-of", AS_OF])
    ids = ["v01", "v06", "v07", "v08"]
    parallel = pulls.ParallelPatients(args, {}, dt.date.fromisoformat(AS_OF), ids, 2, process=crash_on_v06)
    try:
        outcomes: list[PatientOutcome] = [parallel.outcome(pid) for pid in ids]
    finally:
        parallel.close()
    by_id = {o.patient_id: o for o in outcomes}
    assert by_id[CRASH].status == "failed" and "worker process" in by_id[CRASH].reason
    for pid in ("v01", "v07", "v08"):
        assert by_id[pid].status == "assessed" and by_id[pid].assessment is not None


def test_workers_default_to_one():
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    assert command._workers(parser.parse_args(["--fhir-base", "http://x", "--all"]), None) == 1
    assert command._workers(parser.parse_args(["--fhir-base", "http://x", "--all", "--workers", "3"]), None) == 3
    # a session seam (tests, embedding) cannot cross into other processes
    assert command._workers(parser.parse_args(["--fhir-base", "http://x", "--all", "--workers", "3"]), object()) == 1
