"""`assess --engine spark` (Spark local[2]) gives what `assess` gives, patient by patient.

One Spark run over a synthetic population (Bulk NDJSON, some patients as transaction
Bundles on one line), the worked examples written as Bulk NDJSON, a line that is not JSON
and an Observation filed under two patients; one over the worked examples with every
medication by reference to a separate Medication file. Each compared with `assess --format
json` (one worker and two), `assess --format fhir` and the CSV worklist.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
from pathlib import Path

import pytest

from fhir_aibl.cli import main

from .populations import by_reference, fixture_resources, write_ndjson

AS_OF = "2026-06-01"
PATIENTS = 200


def _main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["assess", *args, "--as-of", AS_OF])
    return code, out.getvalue(), err.getvalue()


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(glob.glob(str(folder / "*.ndjson"))) for line in open(path)]


def _without_timestamps(resource: dict) -> dict:
    return {k: v for k, v in resource.items() if k != "created"}


class Run:
    """The Spark run's outputs beside the local engine's, for one input folder."""

    def __init__(self, folder: Path, out: Path) -> None:
        self.folder, self.out = folder, out
        self.code, _stdout, self.stderr = _main(str(folder), "--engine", "spark", "--out", str(out))
        self.local = {}
        for workers in ("1", "2"):
            worklist = out.parent / f"worklist-{workers}.csv"
            code, stdout, stderr = _main(str(folder), "--format", "json", "--workers", workers, "--worklist", str(worklist))
            self.local[workers] = (code, json.loads(stdout), stderr, worklist)
        code, stdout, _err = _main(str(folder), "--format", "fhir")
        self.fhir = [e["resource"] for e in json.loads(stdout).get("entry", [])]


@pytest.fixture(scope="module")
def population(spark, tmp_path_factory) -> Run:
    folder = tmp_path_factory.mktemp("population")
    assert main(["synth", "--patients", str(PATIENTS), "--seed", "7", "--out", str(folder), "--force"]) == 0
    resources = fixture_resources()
    # the same Observation under a second patient, newer: the reader keeps it there only
    moved = next(r for r in resources if r["resourceType"] == "Observation")
    other = next(r for r in resources if r["resourceType"] == "Patient" and f"Patient/{r['id']}" != moved["subject"]["reference"])
    resources.append({**moved, "subject": {"reference": f"Patient/{other['id']}"}, "meta": {"versionId": "99"}})
    write_ndjson(resources, folder, "fixtures")
    with (folder / "Observation.fixtures.ndjson").open("a") as fh:
        fh.write('{"resourceType": "Observation", "id": "broken"\n')
    return Run(folder, tmp_path_factory.mktemp("out") / "spark")


@pytest.fixture(scope="module")
def medications_by_reference(spark, tmp_path_factory) -> Run:
    folder = tmp_path_factory.mktemp("by-reference")
    write_ndjson(by_reference(fixture_resources()), folder)
    return Run(folder, tmp_path_factory.mktemp("out") / "spark")


@pytest.mark.parametrize(
    "name, workers",
    [
        ("population", "1"),
        ("population", "2"),
        ("medications_by_reference", "1"),
        ("medications_by_reference", "2"),
    ],
)
def test_every_assessment_is_the_local_engines(request, name, workers):
    run: Run = request.getfixturevalue(name)
    code, local, _stderr, _worklist = run.local[workers]
    spark = _lines(run.out / "assessments")
    assert len(spark) == len({a["patient"] for a in spark})  # one line per patient
    assert {a["patient"]: a for a in spark} == {a["patient"]: a for a in local}
    assert run.code == code


def test_the_population_is_all_there(population):
    spark = _lines(population.out / "assessments")
    assert len(spark) >= PATIENTS + 30  # the synthetic patients and the worked examples
    assert "assessed" in population.stderr and "worklist:" in population.stderr


def test_medications_resolved_by_reference(medications_by_reference, population):
    by_ref = {a["patient"]: a["ai_status"] for a in _lines(medications_by_reference.out / "assessments")}
    inline = {a["patient"]: a["ai_status"] for a in _lines(population.out / "assessments") if a["patient"] in by_ref}
    assert (medications_by_reference.folder / "Medication.000.ndjson").exists()
    assert by_ref == inline  # the same aromatase inhibitor status, read through the references
    assert sum(status == "active" for status in by_ref.values()) >= 10


@pytest.mark.parametrize("name", ["population", "medications_by_reference"])
def test_careplans_and_risk_assessments_are_the_local_engines(request, name):
    run: Run = request.getfixturevalue(name)
    for rtype in ("CarePlan", "RiskAssessment"):
        spark = sorted((_without_timestamps(r) for r in _lines(run.out / rtype)), key=lambda r: r["identifier"][0]["value"])
        local = sorted(
            (_without_timestamps(r) for r in run.fhir if r["resourceType"] == rtype), key=lambda r: r["identifier"][0]["value"]
        )
        assert len(spark) == len(_lines(run.out / "assessments"))
        assert spark == local


@pytest.mark.parametrize("name", ["population", "medications_by_reference"])
def test_parquet_worklist_is_the_csv_worklist(request, name, spark):
    from pyspark.sql.types import IntegerType, StringType

    run: Run = request.getfixturevalue(name)
    table = spark.read.parquet(str(run.out / "worklist.parquet"))
    assert [f.name for f in table.schema.fields] == [
        "priority", "patient", "category", "aromatase_inhibitor", "care_gaps", "safety_concerns"
    ]
    assert [type(f.dataType) for f in table.schema.fields] == [IntegerType] + [StringType] * 5
    assert len(glob.glob(str(run.out / "worklist.parquet" / "*.parquet"))) == 1
    rows = [[str(v) for v in row] for row in table.collect()]  # the file's order
    with open(run.local["1"][3], newline="") as fh:
        expected = list(csv.reader(fh))[1:]
    assert rows == expected
    assert len(rows) > 5


def test_a_bad_line_is_reported_and_the_rest_assessed(population):
    code, local, stderr, _worklist = population.local["1"]
    assert code == 1 and population.code == 1
    problems = _lines(population.out / "problems")
    texts = {p["text"] for p in problems if p["severity"] == "error"}
    broken = [line for line in stderr.splitlines() if "Observation.fixtures.ndjson:" in line and "not JSON" in line]
    assert broken and set(broken) <= texts  # the same file, line and reason as `assess`
    assert broken[0] in population.stderr
    errors = {line for line in stderr.splitlines() if line.startswith("error: ")}
    assert errors == texts  # every error `assess` reports, and no other
    warnings = {line for line in stderr.splitlines() if line.startswith("warning: ")}
    assert warnings == {p["text"] for p in problems if p["severity"] == "warning"}


def test_a_resource_under_two_patients_is_kept_where_the_reader_keeps_it(population):
    moved = next(r for r in fixture_resources() if r["resourceType"] == "Observation")
    reference = f"Observation/{moved['id']}"
    spark = {a["patient"]: a for a in _lines(population.out / "assessments")}
    holders = [p for p, a in spark.items() if reference in a["evidence"]]
    local = {a["patient"]: a for a in population.local["1"][1]}
    assert holders == [p for p, a in local.items() if reference in a["evidence"]]
    assert moved["subject"]["reference"] not in holders  # the older copy is dropped


def test_outputs_are_never_written_over(population):
    code, _stdout, stderr = _main(str(population.folder), "--engine", "spark", "--out", str(population.out))
    assert code == 2
    assert "already holds" in stderr
