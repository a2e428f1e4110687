"""The ruleset reviewed as a whole: `fhir-aibl rules check` and `fhir-aibl rules doc`."""

from __future__ import annotations

import shutil

import pytest

from fhir_aibl.assess import DEFAULT_RULES, Assessor
from fhir_aibl.cli import main
from fhir_aibl.rulecheck import check, enumerate_cases, format_report
from fhir_aibl.ruledoc import build_markdown, markdown_to_html

from .conftest import ROOT


@pytest.mark.parametrize("mode", ["default", "hadji"])
def test_shipped_rules_pass_the_check(mode):
    report = check(Assessor(mode=mode))
    assert report.ok, format_report(report)
    assert report.cases > 10_000


def test_decision_space_covers_every_dimension():
    names = [case.name for case in enumerate_cases()]
    for part in ("active", "planned", "stopped", "none", "T -2.0", "RF 4", "fracture fragility",
                 "DXA stale", "DXA bmd-only", "therapy denosumab", "woman-38-ofs", "man-45-trt", "crcl-25",
                 # issue 15 / issue 10: the populations and cases of G24-G29 and the missing Patient
                 "woman-47-no-ofs-z-only", "man-45-trt-t-only", "man-60-breast-cancer", "patient-missing",
                 "fracture possible-vertebral", "fracture high-energy-radius", "stale-t-moderate",
                 "T -1.8 | RF 0 | fracture none | DXA stale"):
        assert any(part in n for n in names), part


def _copy_rules(tmp_path):
    rules_dir = tmp_path / "rules"
    shutil.copytree(DEFAULT_RULES.parent, rules_dir)
    return rules_dir / "aibl.yaml"


def _drop_rule(text: str, rule_id: str) -> str:
    start = text.index(f"  - id: {rule_id}\n")
    end = text.index("\n  - id: ", start + 5) + 1
    return text[:start] + text[end:]


def test_a_hole_is_found_and_named(tmp_path, capsys):
    """Without C-LOW a patient with T > -1.5 and no risk factor gets no category at all."""
    path = _copy_rules(tmp_path)
    path.write_text(_drop_rule(path.read_text(), "C-LOW"))
    code = main(["rules", "check", "--rules", str(path), "--mode", "default"])
    out = capsys.readouterr().out
    assert code == 1
    assert "HOLE: active | T -1.4 | RF 0 | fracture none | DXA valid-axial | therapy none: no single outcome" in out
    assert "rules produced 0 values for category" in out
    assert "FAILED" in out


def test_a_conflict_is_found(tmp_path, capsys):
    """An oral bisphosphonate beside the potent agent for high risk: two drugs at once."""
    path = _copy_rules(tmp_path)
    text = path.read_text().replace(
        "  - id: REC-HIGH-POTENT-AR\n    stage: 6\n    title: High - potent antiresorptive, after a contraindication check\n"
        "    when: {c: {t: category, value: high}}\n    unless:\n      - {t: on_ar}\n      - {t: osteoporosis_regimen}\n"
        "    assert:\n      - {t: rec, code: potent-ar}\n",
        "  - id: REC-HIGH-POTENT-AR\n    stage: 6\n    title: High - potent antiresorptive, after a contraindication check\n"
        "    when: {c: {t: category, value: high}}\n    unless:\n      - {t: on_ar}\n      - {t: osteoporosis_regimen}\n"
        "    assert:\n      - {t: rec, code: potent-ar}\n      - {t: rec, code: oral-bp}\n",
    )
    assert "code: oral-bp}\n" in text.split("REC-HIGH-POTENT-AR")[1].split("- id:")[0]
    path.write_text(text)
    report = check(Assessor(path))
    assert not report.ok
    assert any("conflicting recommendations ['oral-bp', 'potent-ar']" in f for f in report.failures)


def test_rules_that_let_an_unreadable_record_be_low_or_an_unreadable_medication_pass_are_refused(tmp_path):
    """The invariants of entries that could not be read (tests/test_unreadable_entries.py): the
    rule files as they were before them fail the check."""
    path = _copy_rules(tmp_path)
    text = path.read_text().replace("      - {t: dxa_unread_graded}\n      - {t: record_unreadable}\n", "      - {t: dxa_unread_graded}\n")
    for rule in ("CAT-FINAL-RECORD-UNREAD", "MED-FLAG-UNREADABLE"):
        text = _drop_rule(text, rule)
    path.write_text(text)
    report = check(Assessor(path), max_failures=10_000)
    assert any(f.endswith("| record-unreadable: low while entries of the record could not be read") for f in report.failures)
    assert any(f.endswith("| medication-unreadable: a medication entry that could not be read, without medication-unresolved")
               for f in report.failures)


def test_a_dead_rule_is_found(tmp_path):
    path = _copy_rules(tmp_path)
    text = path.read_text().replace("title: Body mass index below 20\n    when: {b: {t: bmi, value: {lt: \"${bmi_rf}\"}}}",
                                    "title: Body mass index below 20\n    when: {b: {t: bmi, value: {lt: -1}}}")
    path.write_text(text)
    report = check(Assessor(path))
    assert report.never_fired == ["RF-BMI"]


def test_committed_rules_doc_is_current():
    """docs/rules.md and docs/rules.html are what `fhir-aibl rules doc` writes for the shipped rules."""
    assessor = Assessor()
    md = build_markdown(assessor)
    committed_md = (ROOT / "docs" / "rules.md").read_text(encoding="utf-8")
    committed_html = (ROOT / "docs" / "rules.html").read_text(encoding="utf-8")
    assert committed_md == md, "docs/rules.md is stale: run `fhir-aibl rules doc --out docs`"
    assert committed_html == markdown_to_html(md, assessor.rulebook.title), "docs/rules.html is stale: run `fhir-aibl rules doc --out docs`"
    for rule in assessor.rulebook.rules:
        assert f"#### {rule.id}: " in md
    assert assessor.rulebook.content_hash in md and "PROPOSAL" in md


def test_rules_doc_command(tmp_path, capsys):
    assert main(["rules", "doc", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "rules.md").read_text().startswith("# ")
    assert "<table>" in (tmp_path / "rules.html").read_text()
