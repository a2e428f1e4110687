"""The reader streams (issue 6): spilling its index to disk changes memory, never results.

`iter_records(..., spool_limit=n)` spills the index of the first pass to sorted temporary
files every n entries; these tests compare every spill size with the all-in-memory read on
real, generated and adversarial input (the same resource under two patients, versions,
bad lines, Bundles beside NDJSON), and check the safety net for a file that changes
between the two passes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fhir_aibl import synth
from fhir_aibl.errors import InputError
from fhir_aibl.sources import PatientRecord, iter_records

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HUGE = 10**9


def snapshot(paths, *, validate: bool = False, spool_limit: int = HUGE) -> list:
    """Everything iter_records yields, in order, as comparable values."""
    out = []
    for item in iter_records(paths, validate=validate, spool_limit=spool_limit):
        if isinstance(item, PatientRecord):
            out.append(("record", item.patient_ref, json.dumps(item.resources), tuple(item.sources)))
        else:
            out.append(("problem", type(item).__name__, str(item)))
    return out


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth.generate(synth.SynthSettings(patients=25, seed=11, out=out))
    return out


@pytest.mark.parametrize("limit", [1, 7, 500])
def test_spilling_the_synthetic_population_changes_nothing(population, limit):
    expected = snapshot([population])
    assert [x[0] for x in expected].count("record") == 25
    assert snapshot([population], spool_limit=limit) == expected


def test_spilling_the_fixtures_with_validation_changes_nothing():
    fixtures = ROOT / "fixtures" / "bundles"
    assert snapshot([fixtures], validate=True, spool_limit=3) == snapshot([fixtures], validate=True)


@pytest.mark.parametrize("name", ["synthea-r4-bulk-10-patients", "fhir-r4-spec-examples", "mcode-stu4-examples"])
def test_spilling_real_data_changes_nothing(name):
    path = DATA / name
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (expected ../shared/data beside the repository)")
    assert snapshot([path], spool_limit=5) == snapshot([path])


def _obs(rid, pid, version=None, note="x"):
    res = {"resourceType": "Observation", "id": rid, "status": "final", "subject": {"reference": f"Patient/{pid}"},
           "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]}, "note": [{"text": note}]}
    if version is not None:
        res["meta"] = {"versionId": str(version)}
    return res


def test_a_newer_version_under_another_patient_moves_there_when_spilled(tmp_path):
    lines = [
        _obs("o1", "a", 1, "first"),
        {"resourceType": "Patient", "id": "a"},
        _obs("o1", "b", 3, "moved"),   # newer, other patient: moves to b at its own position
        _obs("o2", "b", 1),
        _obs("o1", "a", 2, "stale"),   # older than the kept v3: ignored
        _obs("o1", "b", 4, "latest"),  # newer, same patient: replaces v3 in place
    ]
    path = tmp_path / "Observation.ndjson"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    expected = snapshot([path])
    for limit in (1, 2, 3):
        assert snapshot([path], spool_limit=limit) == expected
    records = {r.patient_ref: r for r in iter_records([path], spool_limit=1, validate=False) if isinstance(r, PatientRecord)}
    assert [r["id"] for r in records["Patient/a"].resources] == ["a"]
    assert [(r["id"], r["note"][0]["text"]) for r in records["Patient/b"].resources] == [("o1", "latest"), ("o2", "x")]


_pids = st.sampled_from(["p1", "p2", "p3"])
_resource = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["Observation", "Condition", "Patient", "Encounter"]),
        "id": st.none() | st.sampled_from(["a", "b", "c"]),
        "pid": _pids,
        "subject": st.sampled_from(["rel", "abs", "hist", "group"]),
        "meta": st.none() | st.integers(1, 3).map(lambda v: {"versionId": str(v)})
        | st.integers(1, 9).map(lambda d: {"lastUpdated": f"2020-01-0{d}T00:00:00Z"}),
    }
)
_file = st.tuples(st.sampled_from(["ndjson", "bundle", "json"]), st.lists(_resource, max_size=8), st.booleans())


def _build(spec: dict, n: int) -> dict:
    res: dict = {"resourceType": spec["type"]}
    if spec["type"] == "Patient":
        res["id"] = spec["pid"]
    elif spec["id"]:
        res["id"] = spec["id"]
    if spec["type"] != "Patient":
        ref = {"rel": f"Patient/{spec['pid']}", "abs": f"https://x.org/fhir/Patient/{spec['pid']}",
               "hist": f"Patient/{spec['pid']}/_history/2", "group": "Group/g"}[spec["subject"]]
        res["subject"] = {"reference": ref}
    if spec["meta"]:
        res["meta"] = spec["meta"]
    res["note"] = [{"text": f"n{n}"}]
    return res


@settings(max_examples=60, deadline=None)
@given(files=st.lists(_file, min_size=1, max_size=4), limit=st.integers(1, 6))
def test_any_spill_size_gives_the_in_memory_answer(files, limit):
    with tempfile.TemporaryDirectory() as tmp:
        n = 0
        for i, (kind, specs, junk) in enumerate(files):
            resources = []
            for spec in specs:
                n += 1
                resources.append(_build(spec, n))
            if kind == "ndjson":
                lines = [json.dumps(r) for r in resources] + (["{not json"] if junk else [])
                Path(tmp, f"f{i}.ndjson").write_text("\n".join(lines))
            elif kind == "bundle":
                bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
                Path(tmp, f"f{i}.json").write_text(json.dumps(bundle))
            elif resources:
                Path(tmp, f"f{i}.json").write_text(json.dumps(resources[0]))
        assert snapshot([tmp], spool_limit=limit) == snapshot([tmp])


def test_a_file_changed_between_the_passes_never_lends_its_lines_to_another_patient(tmp_path):
    path = tmp_path / "Observation.ndjson"
    first = [_obs("o1", "p1", note="p1 data"), _obs("o2", "p2", note="p2 data")]
    path.write_text("\n".join(json.dumps(x) for x in first) + "\n")
    items = iter_records([path], validate=False)
    rec1 = next(items)
    assert rec1.patient_ref == "Patient/p1"
    # Same length, lines swapped: p2's offset now holds p1's line.
    path.write_text("\n".join(json.dumps(x) for x in reversed(first)) + "\n")
    rest = list(items)
    assert all(not isinstance(x, PatientRecord) or "p1 data" not in json.dumps(x.resources) for x in rest)
    problems = [x for x in rest if isinstance(x, InputError)]
    assert problems and "changed while being read" in problems[0].message
    assert problems[0].source == f"{path}:2"


def test_temporary_files_are_removed_even_when_the_reader_stops_early(population, monkeypatch):
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(*args, **kwargs):
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    items = iter_records([population], validate=False, spool_limit=50)
    next(items)
    assert made and Path(made[0]).exists()
    items.close()
    assert not Path(made[0]).exists()
    list(iter_records([population], validate=False, spool_limit=50))
    assert len(made) == 2 and not Path(made[1]).exists()
