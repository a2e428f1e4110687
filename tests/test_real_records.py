"""Real records from ../shared/data: Synthea, mCODE, the FHIR R4 specification, Bulk NDJSON.

What the specification gives for each (CLINICAL.md sections 0, 3, 4):
- the 21 Synthea osteoporosis records: none has an aromatase inhibitor (SOURCE.md: that
  Synthea vintage predates the breast-cancer module), so each is `ai_status: none`,
  `category: not-applicable`, no recommendations (E1, G21), although several have DXA
  T-scores, osteoporosis, fractures and alendronate;
- mCODE Jenny M: an active anastrozole MedicationRequest (ingredient 84857) for left breast
  cancer, no DXA, born 1965 (61 at 2026-06-01), a current smoker: `active`, `indeterminate`
  with one risk factor (smoking), `dxa-now` (C-IND, S1);
- the Synthea Bulk NDJSON sample: no aromatase inhibitor either: not-applicable.
"""

from __future__ import annotations

import csv
import json

import pytest

from fhir_aibl.cli import main
from fhir_aibl.facts import extract_facts
from fhir_aibl.sources import read_paths

from .conftest import AS_OF, shared


def _run(capsys, *paths) -> tuple[int, list[dict], str]:
    code = main(["assess", *map(str, paths), "--as-of", AS_OF.isoformat(), "--format", "json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def test_synthea_osteoporosis_records(capsys):
    bundles = shared("synthea-r4-osteoporosis/bundles")
    manifest = {row["patient_id"]: row for row in csv.DictReader((bundles.parent / "manifest.csv").open())}
    code, results, err = _run(capsys, bundles)
    assert code == 0, err
    assert "Traceback" not in err
    assert {r["patient"] for r in results} == {f"Patient/{pid}" for pid in manifest}
    for r in results:
        assert (r["ai_status"], r["category"]) == ("none", "not-applicable"), r["patient"]
        assert r["recommendations"] == [] and r["flags"] == [] and r["risk_factors"] == []


def test_synthea_facts_are_read(assessor):
    """Not on an AI, but the facts are there: forearm T-scores (38265-5), alendronate, osteoporosis."""
    bundles = shared("synthea-r4-osteoporosis/bundles")
    records = read_paths(bundles).patients
    with_dxa = with_alendronate = 0
    for record in records:
        facts = extract_facts(record.patient_ref, record.resources, AS_OF, assessor.terminology)
        types = {f["t"] for f in facts.facts}
        with_dxa += any(f["t"] == "dxa" and f["site"] == "FA" and f["measure"] == "T" for f in facts.facts)
        with_alendronate += "antiresorptive" in types
        assert "ai_med" not in types
    assert with_dxa == 17  # manifest.csv: 17 records carry a 38265-5 T-score
    assert with_alendronate >= 11


def test_mcode_jenny_m(capsys):
    bundle = shared("mcode-stu4-examples/Bundle-mcode-patient-bundle-jenny-m.json")
    code, [r], err = _run(capsys, bundle)
    assert code == 0, err
    assert r["patient"] == "Patient/cancer-patient-jenny-m"
    assert (r["ai_status"], r["category"]) == ("active", "indeterminate")
    assert r["risk_factors"] == ["smoking"]
    assert sorted(r["recommendations"]) == ["ca-vitd", "dxa-now", "exercise"]
    assert "MedicationRequest/cancer-related-medication-request-anastrozole-jenny-m" in r["evidence"]


def test_bulk_ndjson(capsys):
    folder = shared("synthea-r4-bulk-10-patients")
    code, results, err = _run(capsys, folder)
    assert code == 0, err
    assert len(results) >= 10
    assert all(r["category"] == "not-applicable" for r in results)


def test_spec_observation_bmd_is_a_femur_bmd(assessor):
    path = shared("fhir-r4-spec-examples/Observation-bmd.json")
    [record] = read_paths(path).patients
    facts = extract_facts(record.patient_ref, record.resources, AS_OF, assessor.terminology)
    [dxa] = facts.of_type("dxa")
    assert (dxa["measure"], dxa["site"], dxa["value"]) == ("BMD", "FEMUR", pytest.approx(0.887))
    assert dxa["refs"] == ["Observation/bmd"]
