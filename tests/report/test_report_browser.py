"""The population report in a real browser (Debian's Chromium through Playwright), offline: the charts are drawn."""

from __future__ import annotations

import contextlib
import io

import pytest

from fhir_aibl.cli import main

from ..browser import browser  # noqa: F401  (the fixture)

AS_OF = "2026-06-01"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-browser")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["synth", "--patients", "200", "--seed", "3", "--out", str(folder / "pop")]) == 0
        assert main(["assess", str(folder / "pop"), "--as-of", AS_OF, "--format", "json",
                     "--report", str(folder / "r.html")]) == 0
    return folder / "r.html"


@pytest.fixture
def offline_page(browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    asked: list[str] = []

    def block(route):
        asked.append(route.request.url)
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            route.abort()

    page.route("**/*", block)
    page.asked = asked
    yield page
    page.close()


def test_the_report_draws_its_charts_offline(report, offline_page):
    page = offline_page
    page.goto(report.as_uri())
    assert [u for u in page.asked if not u.startswith("file:")] == []  # nothing asked of the network
    assert page.asked == [report.as_uri()]  # and no other file either: styles and charts are inline
    on_ai = int(page.locator("#n-on-ai").get_attribute("data-count"))
    assert on_ai > 0
    for chart in ("#category-chart", "#gap-chart", "#coverage-chart"):
        svg = page.locator(f"svg{chart}")
        assert svg.is_visible(), chart
        box = svg.bounding_box()
        assert box["width"] > 500 and box["height"] > 100, chart
    bars = page.locator("svg#category-chart rect.bar")
    assert bars.count() == 4
    counts = [int(b.get_attribute("data-count")) for b in bars.all()]
    assert sum(counts) == on_ai
    widths = [b.bounding_box()["width"] if c else 0 for b, c in zip(bars.all(), counts)]
    top = counts.index(max(counts))
    assert all(w <= widths[top] + 0.5 for w in widths) and widths[top] > 300  # drawn to scale
    assert page.locator("svg#gap-chart rect.bar").count() >= 3
    points = page.locator("svg#coverage-chart circle.point")
    assert points.count() == 20
    ys = [p.bounding_box()["y"] for p in points.all()]
    chart = page.locator("svg#coverage-chart").bounding_box()
    assert all(chart["y"] <= y <= chart["y"] + chart["height"] for y in ys)
    assert page.locator("svg#coverage-chart path.line").get_attribute("d").startswith("M")
    assert page.locator("#worklist-top tbody tr").count() == 25
    # the coverage table is folded until opened
    table = page.locator("details#coverage-table table")
    assert not table.is_visible()
    page.locator("details#coverage-table summary").click()
    assert table.is_visible()
