"""The bone-health view in a real browser (Debian's Chromium through Playwright): chart, values, nothing fetched."""

from __future__ import annotations

import json

import pytest

from fhir_aibl.sources import iter_records
from fhir_aibl.view.site import write_site

from .browser import browser  # noqa: F401  (the fixture)
from .conftest import AS_OF
from .view_helpers import FIXTURES, with_history, write

#: worked examples: (file, category, the value the "why" sentence must name, DXA scores on record, AI start marked)
CASES = [
    ("V06", "high", "−1.6 at the lumbar spine", 3, True),
    ("V11", "high", "−2.5 at the lumbar spine", 3, True),
    ("V43", "high", "−2.6 at the lumbar spine", 3, True),
    ("V20", "indeterminate", "no valid T-score", 0, True),
    ("V31", "not-applicable", "not taking an aromatase inhibitor", 3, False),
    ("history", "high", "−1.6 at the lumbar spine", 6, True),
]


@pytest.fixture(scope="module")
def site(assessor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("view-site")
    inputs = [FIXTURES / f"{name}.json" for name, *_ in CASES if name != "history"]
    # the history under its own patient id (records of one patient id are read as one patient)
    history = json.loads(json.dumps(with_history()).replace("v06", "h06"))
    inputs.append(write(history, folder, "history"))
    problems: list = []
    out = folder / "pages"
    write_site(assessor, iter_records(inputs, terminology=assessor.terminology), AS_OF, out, problems)
    assert not problems
    return out


@pytest.fixture
def page(browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.requests = requests
    yield page
    page.close()


def _file(site, name: str) -> str:
    return (site / ("h06.html" if name == "history" else f"{name.lower()}.html")).as_uri()


@pytest.mark.parametrize("name,category,value,points,ai_start", CASES, ids=[c[0] for c in CASES])
def test_view_renders_with_chart_and_values(site, page, tmp_path_factory, name, category, value, points, ai_start):
    page.goto(_file(site, name))
    assert page.locator("#category").get_attribute("data-category") == category
    assert value in page.locator("#why").inner_text()
    if points:
        chart = page.locator("svg#dxa-chart")
        assert chart.is_visible()
        assert chart.locator(".point").count() == points
        assert chart.locator("rect.band").count() == 4
        assert chart.locator("line.threshold").count() == 4
        assert chart.locator("line.ai-start").count() == (1 if ai_start else 0)
        # the chart is drawn at a readable size in a 900 px window
        box = chart.bounding_box()
        assert box["width"] > 500 and box["height"] > 200
        # every point sits inside the plot and the lumbar spine T points are in date order, left to right
        xs = [float(p.get_attribute("cx")) for p in chart.locator('circle.point[data-site="LS"][data-measure="T"]').all()]
        assert xs == sorted(xs)
        assert page.locator("#dxa-table tbody tr").count() == points
    else:
        assert page.locator("svg#dxa-chart").count() == 0
    # the reviewer's part is folded: rule ids are not visible until it is opened
    reviewer = page.locator("details#reviewer")
    assert not reviewer.locator("table").is_visible()
    reviewer.locator("summary").click()
    assert reviewer.locator("table").is_visible()
    # nothing but the page itself was requested (no CDN, no fonts)
    assert all(u.startswith("file://") for u in page.requests), page.requests
    shots = tmp_path_factory.getbasetemp() / "view-screenshots"
    shots.mkdir(exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
    assert (shots / f"{name}.png").stat().st_size > 10_000


def test_gate_values_visible(site, page):
    page.goto(_file(site, "V43"))
    rec = page.locator("li.rec", has_text="potent antiresorptive")
    assert "Recommended, with restrictions" in rec.inner_text()
    measured = rec.locator(".measured").all_inner_texts()
    assert any("Creatinine clearance 28 mL/min" in m for m in measured)
    assert any("eGFR 28 mL/min/1.73 m², 15 Feb 2026" in m for m in measured)


def test_point_tooltip_reads_as_a_result(site, page):
    page.goto(_file(site, "history"))
    titles = page.locator("svg#dxa-chart .point title").all_text_contents()
    assert "DXA lumbar spine, 10 Feb 2024, T −1.0" in titles
    assert "DXA lumbar spine, 15 Feb 2026, Z −0.8" in titles


def test_index_links_every_page(site, page):
    page.goto((site / "index.html").as_uri())
    links = page.locator("#patients a")
    assert links.count() == len(CASES)
    links.first.click()
    assert page.locator("#category").count() == 1


def test_without_chromium_the_browser_tests_skip_locally_and_fail_on_ci(monkeypatch, tmp_path):
    from . import browser as browser_module

    monkeypatch.setattr(browser_module, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not installed"):
        browser_module.require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        browser_module.require_chromium()
