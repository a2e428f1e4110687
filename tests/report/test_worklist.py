"""The bone-health worklist: who is on it, in which order, in plain language, the same from any path."""

from __future__ import annotations

import csv
import json
import re

import pytest

from fhir_aibl.cli import FIXTURES_DIR, main
from fhir_aibl.report.worklist import COLUMNS, SAFETY, Worklist, gaps_of, row_of

AS_OF = "2026-06-01"


def contract(**kw) -> dict:
    base = {"patient": "Patient/p", "ai_status": "active", "category": "low", "risk_factors": [],
            "recommendations": [], "flags": []}
    return {**base, **kw}


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"category": "high"}, ["high-untreated"]),
        ({"category": "high", "recommendations": ["adherence"]}, []),
        ({"category": "moderate"}, ["moderate-untreated"]),
        ({"category": "indeterminate", "recommendations": ["dxa-now"]}, ["indeterminate", "dxa-now"]),
        ({"flags": ["dxa-stale"], "recommendations": ["dxa-now"]}, ["dxa-overdue"]),
        ({"flags": ["alert-dmab-overdue"], "recommendations": ["dmab-transition"]}, ["dmab-overdue"]),
        ({"recommendations": ["dmab-transition"]}, ["dmab-stopped"]),
        ({"category": "high", "flags": ["hypocalcaemia"]}, ["high-untreated", "held"]),
        ({"ai_status": "planned", "category": "moderate"}, ["moderate-untreated"]),
        # after the aromatase inhibitor, denosumab still needs its follow-on: listed
        ({"ai_status": "stopped", "category": "not-applicable", "recommendations": ["dmab-transition"]}, ["dmab-stopped"]),
        ({"ai_status": "none", "category": "not-applicable", "flags": ["medication-unresolved"]}, ["medication-unresolved"]),
        ({"ai_status": "none", "category": "not-applicable"}, []),
        ({"category": "low", "recommendations": ["dxa-24m"]}, []),
    ],
)
def test_gaps(kw, expected):
    assert gaps_of(contract(**kw)) == expected


def test_order_and_plain_language(tmp_path):
    worklist = Worklist()
    worklist.add(contract(patient="Patient/b", category="moderate"))
    worklist.add(contract(patient="Patient/a", category="high", flags=["crcl-below-35"]))
    worklist.add(contract(patient="Patient/c", recommendations=["dmab-transition"]))
    worklist.add(contract(patient="Patient/d", ai_status="none", category="not-applicable"))
    path = tmp_path / "w.csv"
    assert worklist.write_csv(path) == 3
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == list(COLUMNS)
    assert [r["patient"] for r in rows] == ["c", "a", "b"]  # denosumab first, then high, then moderate
    assert rows[1]["safety_concerns"] == SAFETY["crcl-below-35"]
    text = path.read_text()
    assert not re.search(r"\b[A-Z]\d+-|dxa-now|crcl|Patient/|CLINICAL", text)  # no rule ids, codes or references


def test_every_patient_on_an_ai_with_a_gap_is_listed_once(capsys, tmp_path):
    path = tmp_path / "w.csv"
    main(["assess", str(FIXTURES_DIR), "--as-of", AS_OF, "--format", "json", "--worklist", str(path), "--workers", "1"])
    out, err = capsys.readouterr()
    listed = [r["patient"] for r in csv.DictReader(path.open())]
    assert len(listed) == len(set(listed))
    expected = {a["patient"][8:] for a in json.loads(out) if gaps_of(a)}
    assert set(listed) == expected and expected
    # on an aromatase inhibitor, or denosumab needing its follow-on, or a medication that could not be read
    on_ai = {
        a["patient"][8:] for a in json.loads(out)
        if a["ai_status"] in ("active", "planned") or "dmab-transition" in a["recommendations"]
        or "medication-unresolved" in a["flags"]
    }
    assert set(listed) <= on_ai
    assert f"worklist: {len(listed)} patients" in err


def test_the_same_worklist_from_any_format_and_any_number_of_workers(capsys, tmp_path):
    texts = []
    for i, extra in enumerate((["--format", "json", "--workers", "1"], ["--format", "table", "--workers", "2"],
                               ["--format", "json", "--explain", "--workers", "2"])):
        path = tmp_path / f"w{i}.csv"
        main(["assess", str(FIXTURES_DIR), "--as-of", AS_OF, "--worklist", str(path), *extra])
        capsys.readouterr()
        texts.append(path.read_text())
    assert texts[0] == texts[1] == texts[2]


def test_a_medication_that_could_not_be_read_and_denosumab_after_the_ai_are_listed():
    from fhir_aibl.report.worklist import gaps_of

    unread = {"patient": "Patient/u", "ai_status": "none", "category": "not-applicable",
              "recommendations": [], "flags": ["medication-unresolved"]}
    assert gaps_of(unread) == ["medication-unresolved"]
    after_ai = {"patient": "Patient/d", "ai_status": "stopped", "category": "not-applicable",
                "recommendations": ["dmab-transition", "ci-check", "ca-vitd", "dxa-12m"], "flags": []}
    assert gaps_of(after_ai) == ["dmab-stopped"]
    tamoxifen = {"patient": "Patient/t", "ai_status": "none", "category": "not-applicable", "recommendations": [], "flags": []}
    assert gaps_of(tamoxifen) == []
    incomplete = {"patient": "Patient/a", "ai_status": "active", "category": "indeterminate",
                  "recommendations": ["dxa-12m", "complete-record"], "flags": ["age-unknown"]}
    assert "record-incomplete" in gaps_of(incomplete)


def test_a_record_with_entries_that_could_not_be_read_is_on_the_worklist_whatever_its_category():
    """tests/test_unreadable_entries.py: the rules flag it record-unreadable; a high-risk patient
    on therapy has no other gap, and the chart still needs checking (the risk may be higher)."""
    treated_high = {"patient": "Patient/a", "ai_status": "active", "category": "high", "recommendations": ["adherence"],
                    "flags": ["record-unreadable"]}
    assert gaps_of(treated_high) == ["record-unreadable"]
    row = row_of(treated_high)
    assert row is not None and row.priority == 5 and row.gaps == (
        "Entries of the record could not be read: check the chart, risk may be higher than graded",)
    assert row_of({**treated_high, "flags": []}) is None
