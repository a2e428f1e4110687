"""The bone-health view rendered without a browser: content, the two text layers, the chart's data, the CLI."""

from __future__ import annotations

import copy
import re

import pytest

from fhir_aibl import cli
from fhir_aibl.sources import iter_records
from fhir_aibl.view import build_view, render_patient
from fhir_aibl.view.site import default_catalogue

from .conftest import AS_OF
from .view_helpers import FIXTURES, RESOURCE_REF, bundle, texts, with_history, write


@pytest.fixture(scope="module")
def catalogue():
    return default_catalogue()


def _view(assessor, catalogue, path):
    (record,) = list(iter_records([path], terminology=assessor.terminology))
    result = assessor.assess(record.patient_ref, record.resources, AS_OF)
    return build_view(result.assessment, result.facts, record.resources, catalogue), result


def _chart_points(html: str) -> list[str]:
    return re.findall(r'<(?:circle|rect) class="point[^"]*"[^>]*>', html)


@pytest.mark.parametrize("name", sorted(p.stem for p in FIXTURES.glob("V*.json")))
def test_clinician_text_has_no_internal_material(assessor, catalogue, name):
    view, result = _view(assessor, catalogue, FIXTURES / f"{name}.json")
    html = render_patient(view)
    clinician, reviewer = texts(html)
    rule_ids = {r.id for r in assessor.rulebook.rules}
    codes = {c for c in [*catalogue.recommendations, *catalogue.flags, *result.assessment.risk_factors] if "-" in c}
    words = set(re.findall(r"[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]", clinician))
    assert not words & rule_ids, f"rule ids in clinician text: {words & rule_ids}"
    assert not words & codes, f"catalogue codes in clinician text: {words & codes}"
    assert not RESOURCE_REF.findall(clinician), RESOURCE_REF.findall(clinician)
    for word in ("CLINICAL", "PROPOSAL", "G1", "_history", result.assessment.ruleset.content_hash):
        assert word not in clinician
    # ... and the reviewer part has it all
    assert result.assessment.ruleset.name in reviewer
    for rule in result.assessment.rules:
        assert rule in reviewer
    # nothing is fetched from elsewhere: no script, no stylesheet link, no image, no font, no CSS url()
    for pattern in (r"<script", r"<link", r"<img", r"<iframe", r"@import", r"url\(", r"@font-face", r"src="):
        assert not re.search(pattern, html, re.IGNORECASE), pattern
    assert all(h.startswith("https://doi.org/") for h in re.findall(r'href="([^"]+)"', html))


def test_high_risk_with_renal_gates_shows_the_measured_values(assessor, catalogue):
    view, _ = _view(assessor, catalogue, FIXTURES / "V43.json")
    html = render_patient(view)
    clinician, _ = texts(html)
    assert view.category == "high"
    assert "The lowest valid T-score is −2.6 at the lumbar spine (15 Feb 2026)" in view.why
    (potent,) = [r for r in view.recommendations if r.gates]
    assert potent.status == "Recommended, with restrictions"
    measured = " ".join(m.text for g in potent.gates for m in g.measured)
    assert "Creatinine clearance 28 mL/min" in measured and "15 Feb 2026" in measured
    assert "eGFR 28 mL/min/1.73 m², 15 Feb 2026" in measured
    assert "Creatinine clearance below 35 mL/min" in clinician and "CrCl below 30 mL/min" in clinician
    # every gate once, even though several blocked drugs share it
    assert len({g.text for g in potent.gates}) == len(potent.gates) == 3
    assert "DXA lumbar spine, 15 Feb 2026, T −2.6" in view.evidence


def test_hypocalcaemia_holds_the_antiresorptive(assessor, catalogue):
    view, _ = _view(assessor, catalogue, FIXTURES / "V45.json")
    (held,) = [r for r in view.recommendations if r.gates]
    assert held.status == "Hold until corrected"
    assert any("Calcium" in m.text for g in held.gates for m in g.measured)


def test_history_chart_has_one_point_per_score_and_marks_the_ai_start(assessor, catalogue, tmp_path):
    path = write(with_history(), tmp_path, "history")
    view, result = _view(assessor, catalogue, path)
    html = render_patient(view)
    scores = [f for f in result.facts.of_type("dxa") if f["measure"] in ("T", "Z")]
    assert len(scores) == 6  # three sites on 15 Feb 2026, two earlier spine scans, one Z-score
    points = _chart_points(html)
    assert len(points) == len(scores)
    assert sorted(re.search(r'data-date="([^"]+)"', p).group(1) for p in points if 'data-site="LS" data-measure="T"' in p) == [
        "2024-02-10",
        "2025-02-12",
        "2026-02-15",
    ]
    assert sum('data-measure="Z"' in p for p in points) == 1
    assert html.count('class="band ') == 4
    assert sorted(re.findall(r'class="threshold" data-value="([^"]+)"', html)) == ["-1.0", "-1.5", "-2.0", "-2.5"]
    assert 'class="ai-start" data-date="2026-03-01"' in html
    assert "Aromatase inhibitor from 1 Mar 2026" in html
    assert "DXA lumbar spine, 10 Feb 2024, T −1.0" in view.evidence


def test_an_undated_result_is_listed_but_not_drawn(assessor, catalogue, tmp_path):
    data = with_history()
    undated = next(e["resource"] for e in data["entry"] if e["resource"]["id"] == "v06-dxa-ls-2024-02-10")
    del undated["effectiveDateTime"]
    view, _ = _view(assessor, catalogue, write(data, tmp_path, "undated"))
    html = render_patient(view)
    assert len(_chart_points(html)) == 5
    assert "1 result without a date is listed below but not drawn" in html
    assert "date unknown" in texts(html)[0]


def test_after_the_aromatase_inhibitor_the_denosumab_advice_is_not_hidden(assessor, catalogue):
    view, _ = _view(assessor, catalogue, FIXTURES / "V34.json")
    assert view.category == "not-applicable" and view.category_text == "No risk category"
    assert "the recommendations below still do" in view.why
    # G26: the denosumab transition comes with calcium and vitamin D, the check before the follow-on and a DXA
    assert len(view.recommendations) == 4 and all(r.status == "Recommended" for r in view.recommendations)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("V13", "a fracture of the hip at age 57"),
        ("V28", "bone density at the lumbar spine falling 6.0% a year"),
        ("V41", "ovarian suppression (a GnRH agonist)"),
    ],
)
def test_why_names_what_else_decided_the_category(assessor, catalogue, name, reason):
    view, _ = _view(assessor, catalogue, FIXTURES / f"{name}.json")
    assert f"The category also rests on {reason}" in view.why


def test_no_dxa_no_chart(assessor, catalogue):
    view, _ = _view(assessor, catalogue, FIXTURES / "V20.json")
    html = render_patient(view)
    assert view.category == "indeterminate"
    assert "<svg" not in html
    assert "There is no valid T-score from the last 24 months" in view.why


def test_markup_in_a_record_is_escaped(assessor, catalogue, tmp_path):
    data = bundle("V06")
    patient = next(e["resource"] for e in data["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["name"] = [{"text": "<script>alert(1)</script> Smith"}]
    view, _ = _view(assessor, catalogue, write(data, tmp_path, "evil"))
    html = render_patient(view)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; Smith" in html


def test_cli_writes_a_page_per_patient_and_an_index(tmp_path, capsys):
    out = tmp_path / "site"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    inputs = [str(FIXTURES / n) for n in ("V06.json", "V43.json", "V31.json")] + [str(bad)]
    rc = cli.main(["assess", *inputs, "--as-of", AS_OF.isoformat(), "--format", "html", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1  # one input rejected, the others written
    assert "bad.json" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "v06.html", "v31.html", "v43.html"]
    index = (out / "index.html").read_text()
    for page in ("v06.html", "v31.html", "v43.html"):
        assert f'href="{page}"' in index
    assert "1 input could not be assessed" in index
    assert "No risk category" in index


def test_cli_html_needs_an_out_folder(capsys):
    assert cli.main(["assess", str(FIXTURES / "V06.json"), "--format", "html"]) == 2
    assert "--out" in capsys.readouterr().err


def test_two_patients_with_one_id_get_two_pages(tmp_path):
    from fhir_aibl.view.site import page_name

    taken: set[str] = set()
    assert [page_name(i, taken) for i in ("a/b", "a_b", "index", "")] == ["a_b.html", "a_b-2.html", "index-2.html", "patient.html"]
    assert copy.copy(taken) == {"a_b.html", "a_b-2.html", "index-2.html", "patient.html"}


def test_the_html_pages_take_the_texts_of_the_ruleset_given(tmp_path):
    """`assess --format html --rules DIR` reads the catalogue beside those rules, as the other formats do."""
    import shutil

    from fhir_aibl.assess import RULES_DIR, Assessor
    from fhir_aibl.view.site import write_site

    rules = tmp_path / "rules"
    shutil.copytree(RULES_DIR, rules, ignore=shutil.ignore_patterns("__pycache__", "__init__.py"))
    catalogue = rules / "recommendations.yaml"
    text = catalogue.read_text(encoding="utf-8")
    marker = "Repeat DXA in 24 months (moved ruleset)"
    start = text.index("  dxa-24m:")
    title = text.index("title:", start)
    end = text.index("\n", title)
    catalogue.write_text(text[:title] + f"title: {marker}" + text[end:], encoding="utf-8")
    assessor = Assessor(rules / "aibl.yaml")
    problems: list = []
    pages = write_site(assessor, iter_records([FIXTURES / "V01.json"], terminology=assessor.terminology), AS_OF,
                       tmp_path / "site", problems)
    assert not problems and marker in pages[0].read_text(encoding="utf-8")
