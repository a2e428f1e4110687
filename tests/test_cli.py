"""The `fhir-aibl` command, through `fhir_aibl.cli.main` (and once as a real process)."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

from fhir_aibl import cli
from fhir_aibl.assessment import CONTRACT_FIELDS

from .conftest import FIXTURES, ROOT

BUNDLES = FIXTURES / "bundles"
AS_OF = "2026-06-01"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# --------------------------------------------------------------------------- inputs


def bad_observation_bundle() -> dict:
    """A good Patient and AI statement, and an Observation whose value is not a number."""
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"resource": {"resourceType": "Patient", "id": "bad1", "gender": "female", "birthDate": "1960-01-01"}},
            {
                "resource": {
                    "resourceType": "MedicationStatement",
                    "id": "bad1-ai",
                    "status": "active",
                    "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "199224"}]},
                    "subject": {"reference": "Patient/bad1"},
                    "effectivePeriod": {"start": "2025-01-01"},
                }
            },
            {
                "resource": {
                    "resourceType": "Observation",
                    "id": "bad1-dxa",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "38267-1"}]},
                    "subject": {"reference": "Patient/bad1"},
                    "effectiveDateTime": "2026-01-01",
                    "valueQuantity": {"value": "abc", "unit": "{T-score}"},
                }
            },
        ],
    }


@pytest.fixture
def mixed_dir(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(BUNDLES / "V10.json", d / "a-good.json")
    (d / "b-not-json.json").write_text("this is { not JSON\n")
    (d / "c-no-type.json").write_text(json.dumps({"id": "x", "status": "final"}))
    patient = {"resourceType": "Patient", "id": "nd1", "gender": "female", "birthDate": "1950-05-05"}
    (d / "d-export.ndjson").write_text(json.dumps(patient) + "\n{\"resourceType\": \"Observation\", broken\n")
    (d / "e-bad-obs.json").write_text(json.dumps(bad_observation_bundle()))
    return d


GOOD_PATIENTS = {"Patient/v10", "Patient/nd1", "Patient/bad1"}


def check_mixed_output(code: int, out: str, err: str, d: Path) -> None:
    assert code == 1
    assert "Traceback" not in err and "Traceback" not in out
    errors = error_lines(err)
    assert len(errors) == 4, err
    by_file = {name: [e for e in errors if name in e] for name in
               ("b-not-json.json", "c-no-type.json", "d-export.ndjson", "e-bad-obs.json")}
    assert all(len(v) == 1 for v in by_file.values()), errors
    assert str(d / "b-not-json.json") in by_file["b-not-json.json"][0]
    assert "JSON" in by_file["b-not-json.json"][0]
    assert "resourceType" in by_file["c-no-type.json"][0]
    assert "d-export.ndjson:2" in by_file["d-export.ndjson"][0]  # the bad line, by number
    bad = by_file["e-bad-obs.json"][0]
    assert "Observation/bad1-dxa" in bad and "valueQuantity" in bad
    assert not any("a-good.json" in e for e in errors)
    data = json.loads(out)
    assert {d["patient"] for d in data} == GOOD_PATIENTS
    for item in data:
        assert list(item) == list(CONTRACT_FIELDS)
    bad1 = next(d for d in data if d["patient"] == "Patient/bad1")
    assert bad1["ai_status"] == "active"
    # read without its malformed value: a scan whose result cannot be read, never a number
    assert bad1["category"] != "low" and "dxa-obtain-result" in bad1["recommendations"]
    assert "read without valueQuantity" in bad


def test_assess_mixed_directory(capsys, mixed_dir):
    code, out, err = run(capsys, "assess", mixed_dir, "--format", "json", "--as-of", AS_OF)
    check_mixed_output(code, out, err, mixed_dir)
    data = {d["patient"]: d for d in json.loads(out)}
    assert (data["Patient/v10"]["ai_status"], data["Patient/v10"]["category"]) == ("active", "high")
    assert (data["Patient/nd1"]["ai_status"], data["Patient/nd1"]["category"]) == ("none", "not-applicable")


def test_assess_mixed_directory_as_a_real_process(mixed_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fhir_aibl.cli", "assess", str(mixed_dir), "--format", "json", "--as-of", AS_OF],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    check_mixed_output(proc.returncode, proc.stdout, proc.stderr, mixed_dir)


def test_missing_path_is_reported_and_the_rest_assessed(capsys, tmp_path):
    code, out, err = run(capsys, "assess", tmp_path / "nope.json", BUNDLES / "V10.json", "--format", "json",
                         "--as-of", AS_OF)
    assert code == 1
    [line] = error_lines(err)
    assert "nope.json" in line
    assert [d["patient"] for d in json.loads(out)] == ["Patient/v10"]


# --------------------------------------------------------------------------- good input and formats


def test_all_good_input_exits_0(capsys):
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json", BUNDLES / "V11.json", "--format", "json",
                         "--as-of", AS_OF)
    assert code == 0, err
    assert error_lines(err) == []
    data = json.loads(out)
    assert [d["patient"] for d in data] == ["Patient/v10", "Patient/v11"]
    assert all(list(d) == list(CONTRACT_FIELDS) for d in data)


def test_table_format(capsys):
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json", "--as-of", AS_OF)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["patient", "AI", "category"]
    row = next(line for line in lines if line.startswith("Patient/v10"))
    assert row.split()[1:3] == ["active", "high"]
    assert "-2.1 (LS)" in row
    assert f"as of {AS_OF}" in lines[-1]
    assert "1 assessed, 0 rejected" in lines[-1]


def fhir_output(capsys, *paths: Path) -> dict:
    code, out, err = run(capsys, "assess", *paths, "--format", "fhir", "--as-of", AS_OF)
    assert code == 0, err
    return json.loads(out)


def test_fhir_format_is_a_valid_transaction_bundle(capsys):
    data = fhir_output(capsys, BUNDLES / "V10.json", BUNDLES / "V11.json")
    bundle = Bundle.model_validate(data)
    assert bundle.type == "transaction"
    by_patient: dict[str, list[str]] = {}
    for entry in data["entry"]:
        res = entry["resource"]
        assert entry["request"]["method"] == "POST"
        assert entry["request"]["ifNoneExist"]
        assert entry["request"]["url"] == res["resourceType"]
        by_patient.setdefault(res["subject"]["reference"], []).append(res["resourceType"])
    assert {k: sorted(v) for k, v in by_patient.items()} == {
        "Patient/v10": ["CarePlan", "RiskAssessment"],
        "Patient/v11": ["CarePlan", "RiskAssessment"],
    }


def test_fhir_identifiers_are_stable(capsys):
    def ids(data: dict) -> list:
        return [
            (e["fullUrl"], e["request"]["ifNoneExist"], json.dumps(e["resource"].get("identifier"), sort_keys=True))
            for e in data["entry"]
        ]

    first = fhir_output(capsys, BUNDLES / "V10.json")
    second = fhir_output(capsys, BUNDLES / "V10.json")
    assert ids(first) == ids(second)
    assert all(e["resource"].get("identifier") for e in first["entry"])


def test_explain(capsys):
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json", "--format", "json", "--explain", "--as-of", AS_OF)
    assert code == 0, err
    [item] = json.loads(out)
    assert list(item)[: len(CONTRACT_FIELDS)] == list(CONTRACT_FIELDS)
    assert item["as_of"] == AS_OF
    ruleset = item["ruleset"]
    assert ruleset["version"] in ruleset["name"]
    assert re.fullmatch(r"[0-9a-f]{12}", ruleset["content_hash"])
    assert ruleset["content_hash"] in ruleset["name"]
    recs = [f for f in item["findings"] if f["kind"] == "recommendation"]
    assert sorted(f["code"] for f in recs) == sorted(item["recommendations"])
    for f in recs:
        assert f["rules"] and f["evidence"], f
        assert set(f["rules"]) <= set(item["rules"])
        assert set(f["evidence"]) <= set(item["evidence"])


def test_json_without_explain_is_the_contract_only(capsys):
    code, out, _ = run(capsys, "assess", BUNDLES / "V10.json", "--format", "json", "--as-of", AS_OF)
    assert code == 0
    [item] = json.loads(out)
    assert list(item) == list(CONTRACT_FIELDS)


def test_default_as_of_is_today(capsys):
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json")
    assert code == 0, err
    assert f"as of {dt.date.today().isoformat()}" in out.splitlines()[-1]


# --------------------------------------------------------------------------- nothing can run: exit 2


@pytest.mark.parametrize("value", ["2026-13-01", "yesterday", "01/06/2026"])
def test_bad_as_of_exits_2(capsys, value):
    with pytest.raises(SystemExit) as exc:
        cli.main(["assess", str(BUNDLES / "V10.json"), "--as-of", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--as-of" in err and value in err
    assert "Traceback" not in err


def test_unknown_format_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["assess", str(BUNDLES / "V10.json"), "--format", "xml"])
    assert exc.value.code == 2


def rules_copy(tmp_path: Path) -> Path:
    """A rules directory beside which a broken or missing rule file can be named."""
    d = tmp_path / "rules"
    shutil.copytree(ROOT / "rules" / "valuesets", d / "valuesets")
    return d


def test_missing_rules_file_exits_2(capsys, tmp_path):
    missing = rules_copy(tmp_path) / "missing.yaml"
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json", "--rules", missing)
    assert code == 2
    assert err.startswith("fatal:") and "missing.yaml" in err
    assert "Traceback" not in err


def test_missing_rules_file_anywhere_is_named(capsys, tmp_path):
    code, _, err = run(capsys, "assess", BUNDLES / "V10.json", "--rules", tmp_path / "typo.yaml")
    assert code == 2 and err.startswith("fatal:")
    assert "typo.yaml" in err


def test_broken_yaml_rules_exits_2(capsys, tmp_path):
    broken = rules_copy(tmp_path) / "aibl.yaml"
    broken.write_text("id: aibl\nrules: [\n  - id: X {\n")
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json", "--rules", broken)
    assert code == 2
    assert err.startswith("fatal:") and "aibl.yaml" in err
    assert "Traceback" not in err
    assert out == ""


def test_rules_copy_loads(capsys, tmp_path):
    # The copy of the shipped rule file works from elsewhere: the failures above are the file's, not the place's.
    d = rules_copy(tmp_path)
    shutil.copy(ROOT / "rules" / "aibl.yaml", d / "aibl.yaml")
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json", "--rules", d / "aibl.yaml", "--as-of", AS_OF)
    assert code == 0, err
    assert "Patient/v10" in out


# --------------------------------------------------------------------------- a patient with nothing usable


def test_patient_with_no_usable_data_is_rejected(capsys, tmp_path):
    ghost = {
        "resourceType": "Observation",
        "id": "ghost-hr",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": "Patient/ghost"},
        "effectiveDateTime": "2026-01-01",
        "valueQuantity": {"value": 70, "unit": "/min"},
    }
    (tmp_path / "ghost.json").write_text(json.dumps(ghost))
    code, out, err = run(capsys, "assess", tmp_path / "ghost.json", BUNDLES / "V10.json", "--format", "json",
                         "--as-of", AS_OF)
    assert code == 1
    [line] = error_lines(err)
    assert "Patient/ghost" in line and "ghost.json" in line and "nothing to assess" in line
    assert [d["patient"] for d in json.loads(out)] == ["Patient/v10"]
    assert "Traceback" not in err


# --------------------------------------------------------------------------- demo


def test_demo(capsys, tmp_path):
    out_dir = tmp_path / "demo"
    code, out, err = run(capsys, "demo", "--out", out_dir)
    assert code == 0, err
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0].startswith("fhir-aibl demo:") and "as of 2026-06-01" in lines[0]
    header = next(line for line in lines if line.startswith("patient "))
    assert header.split()[:3] == ["patient", "AI", "category"]
    m = re.search(r"^(\d+) patients assessed, 0 inputs rejected\.$", out, re.M)
    assert m
    n_fixtures = len(list(BUNDLES.glob("*.json")))
    assert int(m.group(1)) == n_fixtures  # the worked examples shipped with the package, and nothing else
    written = re.findall(r": (\S+\.json)$", out, re.M)
    assert sorted(Path(p).name for p in written) == ["assessments.json", "careplans-bundle.json"]
    for p in written:
        assert Path(p).parent == out_dir and Path(p).is_file()
    bundle = Bundle.model_validate(json.loads((out_dir / "careplans-bundle.json").read_text()))
    assert bundle.type == "transaction"
    assert len(bundle.entry) == 2 * int(m.group(1))
    assessments = json.loads((out_dir / "assessments.json").read_text())
    assert len(assessments) == int(m.group(1))
    assert all(a["as_of"] == "2026-06-01" and a["ruleset"]["name"] for a in assessments)
    assert "Patient/v10" in {a["patient"] for a in assessments}


# --------------------------------------------------------------------------- streamed JSON


def test_streamed_json_array_is_byte_for_byte_json_dumps():
    import io

    from hypothesis import given, settings
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
    values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                          max_leaves=20)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(values, max_size=5))
    def check(items):
        out = io.StringIO()
        cli.write_json_array(iter(items), out)
        assert out.getvalue() == json.dumps(items, indent=2) + "\n"

    check()


def test_json_output_is_streamed_per_patient(capsys, monkeypatch):
    """The command never holds every result: it writes each as it is assessed."""
    seen = []
    real = cli.write_json_array

    def spy(items, out):
        assert not isinstance(items, (list, tuple))
        seen.append(True)
        real(items, out)

    monkeypatch.setattr(cli, "write_json_array", spy)
    code, out, err = run(capsys, "assess", BUNDLES / "V10.json", BUNDLES / "V11.json", "--format", "json", "--as-of", AS_OF)
    assert code == 0 and seen
    assert [d["patient"] for d in json.loads(out)] == ["Patient/v10", "Patient/v11"]


def test_assess_restores_the_collector_thresholds(capsys):
    import gc

    before = gc.get_threshold()
    code, _out, _err = run(capsys, "assess", BUNDLES / "V10.json", "--format", "json", "--as-of", AS_OF)
    assert code == 0 and gc.get_threshold() == before
