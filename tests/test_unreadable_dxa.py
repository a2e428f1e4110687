"""A DXA result without a usable value never lets the category be low (section 0 safety invariant).

Worked example V13 without its hip fracture is low on the total hip's T-score -0.1. When the
lumbar spine result of the same scan (-0.5, the lowest site) is unreadable (a value that fails
validation is read without it) or recorded without a value, its true value could be lower:
the category is indeterminate, the result is obtained (the scan exists) and the flag says why.
A value-less DXA result older than the scan that graded the category changes nothing, nor does
the report of the graded scan itself, nor one beside a scan that already shows osteoporosis (high
stays high); the report of a later scan without its scores keeps the category from low.
The CDS card of the same record: tests/cds/test_unreadable_dxa.py.
"""

from __future__ import annotations

import copy
import json

import pytest

from fhir_aibl.cli import main

from .conftest import FIXTURES

AS_OF = "2026-06-01"


def v13_without_fracture() -> dict:
    bundle = json.loads((FIXTURES / "bundles" / "V13.json").read_text())
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"].get("id") != "v13-fx-hip"]
    return bundle


def resource(bundle: dict, rid: str) -> dict:
    return next(e["resource"] for e in bundle["entry"] if e["resource"].get("id") == rid)


def unreadable_spine(bundle: dict) -> dict:
    resource(bundle, "v13-dxa-ls")["valueQuantity"]["value"] = "-0.5"  # a string: fails validation
    return bundle


def valueless_spine(bundle: dict) -> dict:
    del resource(bundle, "v13-dxa-ls")["valueQuantity"]
    return bundle


def add_valueless_copy(bundle: dict, of: str, rid: str, date: str) -> dict:
    """A DXA Observation of the same kind as `of`, recorded without a value on `date`."""
    res = copy.deepcopy(resource(bundle, of))
    res["id"] = rid
    res["effectiveDateTime"] = date
    res.pop("valueQuantity", None)
    entry = next(e for e in bundle["entry"] if e["resource"].get("id") == of)
    bundle["entry"].append({**copy.deepcopy(entry), "resource": res, "fullUrl": entry.get("fullUrl", "").replace(of, rid)})
    return bundle


def add_report(bundle: dict, date: str) -> dict:
    """A DXA DiagnosticReport (the FHIR R4 example's code) without results, on `date`."""
    subject = resource(bundle, "v13-dxa-ls")["subject"]
    report = {
        "resourceType": "DiagnosticReport", "id": f"v13-dxa-report-{date}", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "38269-7"}], "text": "DXA BONE DENSITOMETRY"},
        "subject": subject, "effectiveDateTime": date,
    }
    bundle["entry"].append({"fullUrl": f"urn:uuid:report-{date}", "resource": report})
    return bundle


def assess_file(tmp_path, capsys, bundle: dict) -> tuple[int, dict]:
    path = tmp_path / "record.json"
    path.write_text(json.dumps(bundle))
    code = main(["assess", str(path), "--as-of", AS_OF, "--format", "json", "--explain"])
    [result] = json.loads(capsys.readouterr().out)
    return code, result


def test_without_the_fracture_v13_is_low(tmp_path, capsys):
    """The baseline of every case below: all three sites read, low with a DXA in 24 months."""
    code, got = assess_file(tmp_path, capsys, v13_without_fracture())
    assert code == 0
    assert got["category"] == "low" and "dxa-24m" in got["recommendations"]


@pytest.mark.parametrize("spoil", [unreadable_spine, valueless_spine], ids=["malformed-value", "no-value"])
@pytest.mark.parametrize("mode", ["default", "hadji"])
def test_an_unreadable_site_of_the_graded_scan_is_never_low(tmp_path, capsys, spoil, mode):
    bundle = spoil(v13_without_fracture())
    path = tmp_path / "record.json"
    path.write_text(json.dumps(bundle))
    code = main(["assess", str(path), "--as-of", AS_OF, "--format", "json", "--explain", "--mode", mode])
    [got] = json.loads(capsys.readouterr().out)
    assert code == (1 if spoil is unreadable_spine else 0)  # an invalid resource is an error, and still read
    assert got["category"] == "indeterminate"
    assert "dxa-obtain-result" in got["recommendations"]
    assert not {"dxa-24m", "dxa-12m", "dxa-now"} & set(got["recommendations"])
    assert "dxa-result-incomplete" in got["flags"]
    assert "CAT-FINAL-DXA-UNREAD" in got["rules"] and "CAT-FINAL-LOW" not in got["rules"]


def test_a_later_valueless_dxa_result_also_keeps_it_from_low(tmp_path, capsys):
    bundle = add_valueless_copy(v13_without_fracture(), "v13-dxa-ls", "v13-dxa-ls-later", "2026-04-20")
    _code, got = assess_file(tmp_path, capsys, bundle)
    assert got["category"] == "indeterminate"
    assert "dxa-obtain-result" in got["recommendations"] and "dxa-result-incomplete" in got["flags"]


def test_a_valueless_dxa_result_before_the_graded_scan_changes_nothing(tmp_path, capsys):
    bundle = add_valueless_copy(v13_without_fracture(), "v13-dxa-ls", "v13-dxa-ls-older", "2025-09-10")
    code, got = assess_file(tmp_path, capsys, bundle)
    assert code == 0
    assert got["category"] == "low" and "dxa-24m" in got["recommendations"]
    assert "dxa-result-incomplete" not in got["flags"] and "dxa-obtain-result" not in got["recommendations"]


def test_a_valueless_result_beside_osteoporosis_on_the_graded_scan_stays_high(tmp_path, capsys):
    bundle = valueless_spine(v13_without_fracture())
    resource(bundle, "v13-dxa-th")["valueQuantity"]["value"] = -2.8
    _code, got = assess_file(tmp_path, capsys, bundle)
    assert got["category"] == "high"
    assert "dxa-result-incomplete" not in got["flags"]
    assert "potent-ar" in got["recommendations"]


def test_with_age_unknown_too_the_result_is_obtained_not_a_12_month_interval(tmp_path, capsys):
    bundle = valueless_spine(v13_without_fracture())
    resource(bundle, "v13").pop("birthDate")
    _code, got = assess_file(tmp_path, capsys, bundle)
    assert got["category"] == "indeterminate"
    assert "dxa-obtain-result" in got["recommendations"] and "dxa-12m" not in got["recommendations"]
    assert {"dxa-result-incomplete", "age-unknown"} <= set(got["flags"])


def test_the_report_of_the_graded_scan_changes_nothing(tmp_path, capsys):
    """On the day of the graded scan a report is that scan, whose scores were read."""
    code, got = assess_file(tmp_path, capsys, add_report(v13_without_fracture(), "2026-02-15"))
    assert code == 0
    assert got["category"] == "low" and "dxa-24m" in got["recommendations"]
    assert "dxa-result-incomplete" not in got["flags"]


def test_the_report_of_a_later_scan_without_its_scores_keeps_it_from_low(tmp_path, capsys):
    _code, got = assess_file(tmp_path, capsys, add_report(v13_without_fracture(), "2026-04-20"))
    assert got["category"] == "indeterminate"
    assert "dxa-obtain-result" in got["recommendations"] and "dxa-result-incomplete" in got["flags"]
