"""The population report (HTML) and the Parquet worklist, from every population command and from saved assessments."""

from __future__ import annotations

import csv
import json
import re
import sys

import pytest

from fhir_aibl.cli import FIXTURES_DIR, main
from fhir_aibl.report.population import Tally
from fhir_aibl.report.render import render_report
from fhir_aibl.report.worklist import COLUMNS, GAPS, Worklist

AS_OF = "2026-06-01"


def assess(capsys, *extra: str) -> tuple[int, str, str]:
    code = main(["assess", str(FIXTURES_DIR), "--as-of", AS_OF, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def external_references(html: str) -> list[str]:
    """Every src/href (or CSS url()/@import) that is not empty or a fragment, and any http(s) address."""
    found = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html, flags=re.I)
    found = [f for f in found if f and not f.startswith("#")]
    found += re.findall(r"url\(|@import", html)
    found += re.findall(r"https?://", html)
    return found


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The worked examples assessed once: the JSON array, its worklist and report as `assess` wrote them."""
    import contextlib
    import io

    folder = tmp_path_factory.mktemp("report")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["assess", str(FIXTURES_DIR), "--as-of", AS_OF, "--format", "json", "--workers", "1",
                     "--worklist", str(folder / "w.csv"), "--report", str(folder / "r.html")])
    assert code == 0, err.getvalue()
    (folder / "a.json").write_text(out.getvalue())
    return folder


def test_the_report_is_self_contained_and_in_plain_words(saved):
    html = (saved / "r.html").read_text()
    assert external_references(html) == []
    assert "<script" not in html.lower()
    for chart in ("category-chart", "gap-chart", "coverage-chart", "safety-chart"):
        assert f'<svg id="{chart}"' in html
    # no rule ids, resource references, catalogue codes or spec references
    visible = re.sub(r"<[^>]+>", " ", html)
    assert not re.search(r"Patient/|Observation/|CLINICAL|PROPOSAL|\bG\d+\b|\b[A-Z]{2,}-[A-Z0-9-]+\b", visible)
    assert not re.search(r"\b(dxa-now|dxa-stale|crcl-below|ca-vitd|potent-ar|not-applicable|alert-dmab)\b", html)
    # the worklist's gap wording
    assert GAPS["high-untreated"][1] in html


def test_the_numbers_match_the_assessments(saved):
    contracts = json.loads((saved / "a.json").read_text())
    html = (saved / "r.html").read_text()
    on_ai = sum(c["ai_status"] in ("active", "planned") for c in contracts)
    assert f'id="n-patients"><span class="n">{len(contracts)}<' in html
    assert f'id="n-on-ai"><span class="n">{on_ai}<' in html
    rows = list(csv.DictReader((saved / "w.csv").open()))
    assert f'id="n-worklist"><span class="n">{len(rows)}<' in html
    # the category bars add up to the patients on an aromatase inhibitor
    bars = re.search(r'<svg id="category-chart".*?</svg>', html, flags=re.S).group(0)
    assert sum(int(n) for n in re.findall(r'data-count="(\d+)"', bars)) == on_ai
    # the worklist's first rows, in its order
    top = re.search(r'<table id="worklist-top">.*?</table>', html, flags=re.S).group(0)
    assert re.findall(r"<tr><td class=\"num\">\d+</td><td>([^<]*)</td>", top) == [r["patient"] for r in rows[:25]]


def test_the_same_report_and_worklist_whatever_the_workers_and_format(saved, capsys, tmp_path):
    expected = (saved / "r.html").read_text()
    for i, extra in enumerate((["--format", "table", "--workers", "2"], ["--format", "json", "--explain", "--workers", "2"],
                               ["--format", "fhir", "--workers", "1"], ["--format", "html", "--out", str(tmp_path / "v")])):
        code, _out, err = assess(capsys, *extra, "--report", str(tmp_path / f"r{i}.html"),
                                 "--worklist", str(tmp_path / f"w{i}.csv"))
        assert code == 0, err
        assert (tmp_path / f"r{i}.html").read_text() == expected, extra
        assert (tmp_path / f"w{i}.csv").read_text() == (saved / "w.csv").read_text(), extra


def test_parquet_worklist_equals_the_csv(saved, capsys, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    code, _out, err = assess(capsys, "--format", "json", "--workers", "2", "--worklist", str(tmp_path / "w.parquet"))
    assert code == 0, err
    table = pq.read_table(tmp_path / "w.parquet")
    assert table.schema == pa.schema([("priority", pa.int32())] + [(c, pa.string()) for c in COLUMNS[1:]])
    rows = [[str(v) for v in row.values()] for row in table.to_pylist()]
    with (saved / "w.csv").open() as fh:
        assert rows == list(csv.reader(fh))[1:]
    assert rows  # the worked examples have patients with gaps


def test_an_empty_parquet_worklist_has_the_schema(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    assert Worklist().write(tmp_path / "w.parquet") == 0
    table = pq.read_table(tmp_path / "w.parquet")
    assert table.num_rows == 0 and table.column_names == list(COLUMNS)


def test_without_pyarrow_a_parquet_worklist_stops_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
    code, out, err = assess(capsys, "--format", "json", "--worklist", str(tmp_path / "w.parquet"))
    assert code == 2
    assert out == ""  # nothing assessed
    assert "install fhir-aibl[parquet]" in err
    assert not (tmp_path / "w.parquet").exists()
    code = main(["report", "-", "--worklist", str(tmp_path / "w.parquet")])
    assert code == 2 and "install fhir-aibl[parquet]" in capsys.readouterr().err


def test_an_empty_population_renders(tmp_path):
    html = render_report(Tally().numbers(__import__("datetime").date(2026, 6, 1)), Worklist())
    assert external_references(html) == []
    assert "No patient on an aromatase inhibitor." in html and "No patient on the worklist." in html
    assert 'id="n-patients"><span class="n">0<' in html


def test_patient_ids_are_escaped():
    worklist, tally = Worklist(), Tally()
    for item in ({"patient": "Patient/<img src=x>", "ai_status": "active", "category": "high",
                  "recommendations": [], "flags": [], "dxa_dates": []},):
        worklist.add(item)
        tally.add(item)
    html = render_report(tally.numbers(__import__("datetime").date(2026, 6, 1)), worklist)
    assert "<img" not in html and "&lt;img src=x&gt;" in html


# -- fhir-aibl report ---------------------------------------------------------------------------------


def test_report_from_the_json_array_and_from_json_lines_is_what_assess_wrote(saved, capsys, tmp_path):
    contracts = json.loads((saved / "a.json").read_text())
    lines = tmp_path / "part-00000.json"  # as Spark names its part files
    lines.write_text("".join(json.dumps(c) + "\n" for c in reversed(contracts)))  # any order
    (tmp_path / "_SUCCESS").write_text("")
    for i, source in enumerate((saved / "a.json", lines, tmp_path)):
        code = main(["report", str(source), "--as-of", AS_OF, "--report", str(tmp_path / f"r{i}.html"),
                     "--worklist", str(tmp_path / f"w{i}.csv")])
        err = capsys.readouterr().err
        assert code == 0, err
        assert (tmp_path / f"r{i}.html").read_text() == (saved / "r.html").read_text(), source
        assert (tmp_path / f"w{i}.csv").read_text() == (saved / "w.csv").read_text(), source


def test_report_takes_the_as_of_date_of_explained_assessments(capsys, tmp_path):
    code, out, err = assess(capsys, "--format", "json", "--explain")
    (tmp_path / "a.json").write_text(out)
    assert main(["report", str(tmp_path / "a.json"), "--report", str(tmp_path / "r.html")]) == 0
    assert "as of 2026-06-01" in capsys.readouterr().err
    assert "as of 1 Jun 2026" in (tmp_path / "r.html").read_text()


def test_report_names_each_bad_line_and_uses_the_rest(capsys, tmp_path):
    good = {"patient": "Patient/a", "ai_status": "active", "category": "high", "recommendations": [], "flags": [],
            "dxa_dates": []}
    source = tmp_path / "a.jsonl"
    source.write_text("\n".join([
        "",  # a blank line is skipped, and counted
        json.dumps(good),
        "not json",
        json.dumps({"patient": 3}),
        json.dumps({**good, "patient": "Patient/b", "dxa_dates": ["last spring"]}),
        json.dumps({**good, "patient": "Patient/c", "ai_status": "actve"}),
        "",
        json.dumps({**good, "patient": "Patient/d", "category": "moderate"}),
    ]) + "\n")
    code = main(["report", str(source), "--as-of", AS_OF, "--worklist", str(tmp_path / "w.csv"),
                 "--report", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{source}, line 3: not JSON" in err
    assert f"{source}, line 4: no patient" in err
    assert f"{source}, line 5: Patient/b: dxa_dates holds 'last spring'" in err
    assert f"{source}, line 6: Patient/c: aromatase inhibitor status 'actve' not recognised" in err
    assert [r["patient"] for r in csv.DictReader((tmp_path / "w.csv").open())] == ["a", "d"]
    html = (tmp_path / "r.html").read_text()
    assert 'id="n-patients"><span class="n">3<' in html  # a, c (shown as not recognised) and d
    assert "not recognised: actve" in html


@pytest.mark.parametrize("text, where", [
    ('[{"patient": "Patient/a"},\n{"patient": ', "line 2"),  # cut short
    ('[{"patient": "Patient/a"}\n{"patient": "Patient/b"}]', "line 2"),
    ('[{"patient": "Patient/a"}] trailing', "line 1"),
    ('\n\n[{"patient": "Patient/a"}\n{', "line 4"),  # blank lines before the array count
])
def test_report_refuses_a_json_array_that_does_not_parse_and_writes_nothing(capsys, tmp_path, text, where):
    source = tmp_path / "a.json"
    source.write_text(text)
    code = main(["report", str(source), "--report", str(tmp_path / "r.html"), "--worklist", str(tmp_path / "w.csv")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"fatal: {source}: {where}: not a JSON array of assessments" in err
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "w.csv").exists()


def test_report_needs_an_output_and_a_readable_input(capsys, tmp_path):
    assert main(["report", str(tmp_path / "missing.json"), "--report", str(tmp_path / "r.html")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "a.json").write_text("[]")
    assert main(["report", str(tmp_path / "a.json")]) == 2
    assert "give --worklist PATH, --report PATH.html" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "a.json"), "--report", str(tmp_path / "r.html")]) == 0
