"""`assess --workers N`: the same bytes as one process, on every stream, and no patient lost to a bad one."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import pytest

from fhir_aibl import synth
from fhir_aibl.cli import FIXTURES_DIR, main
from fhir_aibl.errors import AiblError
from fhir_aibl.population import assess_population, choose_workers, plan as plan_module
from fhir_aibl.population import pool

from . import crashers

AS_OF = "2026-06-01"


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    # a CarePlan's `created` is the time it was written, the one thing two runs may not share
    return code, re.sub(r'"created": "[^"]*"', '"created": "<now>"', out), err


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    """A small synthetic population, with lines that fail in three ways appended to its NDJSON files."""
    out = tmp_path_factory.mktemp("population")
    synth.generate(synth.SynthSettings(patients=60, seed=5, out=out))
    observations = sorted(out.glob("Observation*.ndjson"))[0]
    with observations.open("a") as fh:
        fh.write("{not json\n")
        fh.write(json.dumps({"resourceType": "Observation", "id": "bad-status", "status": "nonsense",
                             "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5"}]},
                             "valueQuantity": {"value": "seventeen"},
                             "subject": {"reference": "Patient/no-such-patient"}}) + "\n")
        first = json.loads((out / "Patient.000.ndjson").read_text().splitlines()[0])["id"]
        fh.write(json.dumps({"resourceType": "Observation", "id": "odd-unit", "status": "final",
                             "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5"}]},
                             "valueQuantity": {"value": 17, "unit": "kg/m2"},
                             "subject": {"reference": f"Patient/{first}"}}) + "\n")
        fh.write(json.dumps({"resourceType": "Observation", "id": "orphan", "status": "final",
                             "code": {"text": "x"}}) + "\n")
    return out


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of a few kB, so that even a small population is read in many line ranges at once."""
    monkeypatch.setattr(plan_module, "MIN_RANGE", 20_000)
    monkeypatch.setattr(plan_module, "MAX_RANGE", 60_000)


@pytest.mark.parametrize("fmt", ["json", "table", "fhir"])
def test_worked_examples_same_bytes_as_one_process(capsys, fmt):
    one = run(capsys, ["assess", str(FIXTURES_DIR), "--as-of", AS_OF, "--format", fmt, "--workers", "1"])
    two = run(capsys, ["assess", str(FIXTURES_DIR), "--as-of", AS_OF, "--format", fmt, "--workers", "2"])
    assert one[1]  # something was written
    assert two == one


def test_medications_in_a_file_of_their_own_resolve_in_every_worker(capsys, tmp_path, small_pieces):
    """A Bulk export keeps Medications in Medication.ndjson, indexed by one process; every worker must
    see them. Before: each worker assessed with an empty medication index, so a patient whose
    aromatase inhibitor was given by reference read as on none (not applicable: hidden)."""
    from ..spark.populations import by_reference, fixture_resources, write_ndjson

    write_ndjson(by_reference(fixture_resources()), tmp_path / "export")
    one = run(capsys, ["assess", str(tmp_path / "export"), "--as-of", AS_OF, "--format", "json", "--workers", "1"])
    two = run(capsys, ["assess", str(tmp_path / "export"), "--as-of", AS_OF, "--format", "json", "--workers", "2"])
    assert two == one
    expected = json.loads((FIXTURES_DIR.parent / "expected.json").read_text())
    got = {a["patient"].split("/")[1].upper(): a["ai_status"] for a in json.loads(one[1])}
    on_one = [name for name, e in expected.items() if isinstance(e, dict) and e.get("ai_status") in ("active", "planned")]
    assert on_one and all(got.get(name) == expected[name]["ai_status"] for name in on_one)


@pytest.mark.parametrize("extra", [["--format", "json"], ["--format", "json", "--explain"], ["--format", "table"], ["--format", "fhir"]])
def test_population_same_bytes_as_one_process(capsys, population, small_pieces, extra):
    one = run(capsys, ["assess", str(population), "--as-of", AS_OF, "--workers", "1", *extra])
    three = run(capsys, ["assess", str(population), "--as-of", AS_OF, "--workers", "3", *extra])
    assert three == one
    code, out, err = one
    assert code == 1  # the lines appended above are rejected, the rest assessed
    assert "is not JSON" in err and "fails FHIR R4 validation" in err and "no patient reference" in err
    assert "warning: " in err  # the synthetic population is messy on purpose


def test_line_numbers_of_ranges_are_the_file_lines(capsys, population, small_pieces):
    files, pieces = plan_module.plan([population], 2)
    ranged = [p for p in pieces if p.ranged]
    assert len(ranged) > 3
    _code, _out, err = run(capsys, ["assess", str(population), "--as-of", AS_OF, "--workers", "2", "--format", "json"])
    observations = sorted(population.glob("Observation*.ndjson"))[0]
    lineno = observations.read_bytes().splitlines().index(b"{not json") + 1
    assert lineno > 1000
    assert f"{observations}:{lineno}: line {lineno} is not JSON" in err


def test_a_crashing_patient_loses_no_other_patient(population, tmp_path, small_pieces):
    data = tmp_path / "data"
    shutil.copytree(population, data)
    for pid in ("crash-me", "raise-me"):
        (data / f"{pid}.json").write_text(json.dumps({"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1950-01-01"}))
    kwargs = dict(as_of=dt.date(2026, 6, 1), payload="contract", on_warning=lambda note: None)
    expected_problems: list[AiblError] = []
    expected = list(assess_population([population], workers=2, problems=expected_problems, **kwargs))
    problems: list[AiblError] = []
    got = list(assess_population([data], workers=2, problems=problems, assessor_factory=crashers.FaultyAssessor, **kwargs))
    assert [a["patient"] for a in got] == [a["patient"] for a in expected]  # everyone else, in order
    assert got == expected
    stopped = [p for p in problems if p.resource == crashers.CRASH]
    assert len(stopped) == 1 and "stopped" in str(stopped[0])
    raised = [p for p in problems if p.resource == crashers.RAISE]
    assert len(raised) == 1 and "RuntimeError: boom" in str(raised[0])
    assert len(problems) == len(expected_problems) + 2


def test_a_resource_under_two_patients_is_decided_by_one_process(capsys, tmp_path):
    """The one decision over the whole input: the run falls back to one process, and says so."""
    moved = {"resourceType": "Observation", "id": "moved", "status": "final",
             "code": {"coding": [{"system": "http://loinc.org", "code": "39156-5"}]},
             "valueQuantity": {"value": 17, "unit": "kg/m2", "system": "http://unitsofmeasure.org", "code": "kg/m2"},
             "effectiveDateTime": "2026-01-01"}
    lines = [
        {"resourceType": "Patient", "id": "a", "gender": "female", "birthDate": "1950-01-01"},
        {"resourceType": "Patient", "id": "b", "gender": "female", "birthDate": "1951-01-01"},
        {**moved, "subject": {"reference": "Patient/a"}, "meta": {"versionId": "1"}},
        {**moved, "subject": {"reference": "Patient/b"}, "meta": {"versionId": "2"}},
    ]
    (tmp_path / "x.ndjson").write_text("".join(json.dumps(line) + "\n" for line in lines))
    one = run(capsys, ["assess", str(tmp_path), "--as-of", AS_OF, "--format", "json", "--workers", "1"])
    two = run(capsys, ["assess", str(tmp_path), "--as-of", AS_OF, "--format", "json", "--workers", "2"])
    assert two[1] == one[1] and two[0] == one[0]
    assert "note: a resource is filed under two patients" in two[2]
    assert two[2].replace(two[2].splitlines()[0] + "\n", "", 1) == one[2]


def test_the_workers_use_the_rule_file_and_mode_asked_for(capsys):
    argv = ["assess", str(FIXTURES_DIR), "--as-of", AS_OF, "--format", "json", "--explain", "--mode", "hadji"]
    one = run(capsys, [*argv, "--workers", "1"])
    two = run(capsys, [*argv, "--workers", "2"])
    assert two == one and "-hadji" in one[1]


def test_missing_paths_are_errors_in_their_place(capsys, tmp_path):
    argv = ["assess", str(tmp_path / "nothing-here.json"), str(FIXTURES_DIR / "V06.json"), "--as-of", AS_OF, "--format", "json"]
    assert run(capsys, [*argv, "--workers", "2"]) == run(capsys, [*argv, "--workers", "1"])


def test_workers_default(tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "default_workers", lambda: 7)
    small = tmp_path / "small.json"
    small.write_text("{}")
    assert choose_workers([small], None) == 1  # not worth starting processes for
    assert choose_workers([small], 3) == 3
    big = tmp_path / "big.ndjson"
    big.write_bytes(b" " * pool.SMALL_INPUT)
    assert choose_workers([small, big], None) == 7


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["assess", str(FIXTURES_DIR), "--workers", "0"])
    assert exc.value.code == 2
    assert "positive" in capsys.readouterr().err
