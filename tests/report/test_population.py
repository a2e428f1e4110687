"""The report's numbers and chart data: counts, DXA coverage per quarter, and the edges (nobody, no DXA, unknown values)."""

from __future__ import annotations

import datetime as dt

from fhir_aibl.report.charts import bar_chart, coverage_chart
from fhir_aibl.report.population import Tally, covered_on, quarter_days
from fhir_aibl.report.worklist import GAPS, SAFETY

AS_OF = dt.date(2026, 6, 1)


def contract(**kw) -> dict:
    base = {"patient": "Patient/p", "ai_status": "active", "category": "low", "risk_factors": [],
            "recommendations": [], "flags": [], "rules": [], "evidence": [], "dxa_dates": []}
    return {**base, **kw}


def counts(items) -> dict:
    return {c.key: c.count for c in items}


def test_quarters_are_the_last_twenty_up_to_the_as_of_date():
    days = quarter_days(AS_OF)
    assert len(days) == 20
    assert days[-1] == ("2026 Q2", AS_OF)  # the current quarter, measured at the as-of date
    assert days[-2] == ("2026 Q1", dt.date(2026, 3, 31))
    assert days[-5] == ("2025 Q2", dt.date(2025, 6, 30))
    assert days[0] == ("2021 Q3", dt.date(2021, 9, 30))
    assert [d for _, d in days] == sorted(d for _, d in days)
    assert quarter_days(dt.date(2026, 1, 1))[-2] == ("2025 Q4", dt.date(2025, 12, 31))


def test_a_scan_covers_the_24_months_after_it_inclusive_and_not_before_it():
    scans = [dt.date(2024, 3, 31)]
    assert not covered_on(scans, dt.date(2024, 3, 30))  # before the scan
    assert covered_on(scans, dt.date(2024, 3, 31))
    assert covered_on(scans, dt.date(2026, 3, 31))  # exactly 24 months: still valid, as the rules count it
    assert not covered_on(scans, dt.date(2026, 4, 1))
    assert covered_on([dt.date(2019, 1, 1), dt.date(2025, 1, 1)], dt.date(2026, 3, 31))  # the latest one counts
    assert not covered_on([], AS_OF)


def test_counts_and_coverage_per_quarter():
    tally = Tally()
    tally.add(contract(patient="Patient/a", category="high", dxa_dates=["2025-02-10"]))
    tally.add(contract(patient="Patient/b", category="moderate", dxa_dates=["2022-01-15", "2024-11-30"]))
    tally.add(contract(patient="Patient/c", ai_status="planned", category="indeterminate",
                       recommendations=["dxa-now"], dxa_dates=[]))  # no DXA: never covered
    tally.add(contract(patient="Patient/d", ai_status="none", category="not-applicable", dxa_dates=["2026-01-01"]))
    tally.add(contract(patient="Patient/e", ai_status="stopped", category="not-applicable",
                       recommendations=["dmab-transition"], flags=["hypocalcaemia"]))
    n = tally.numbers(AS_OF)
    assert (n.patients, n.on_ai, n.held, n.dxa_unknown) == (5, 3, 1, 0)
    assert counts(n.ai_status) == {"active": 2, "planned": 1, "stopped": 1, "none": 1}
    assert counts(n.categories) == {"high": 1, "moderate": 1, "low": 0, "indeterminate": 1}
    # gaps in the worklist's order of urgency, for every patient the worklist lists
    assert counts(n.gaps) == {"dmab-stopped": 1, "high-untreated": 1, "moderate-untreated": 1, "indeterminate": 1,
                              "dxa-now": 1}
    assert [c.key for c in n.gaps] == sorted(counts(n.gaps), key=lambda k: (GAPS[k][0], k))
    assert {c.label for c in n.gaps} == {GAPS[k][1] for k in counts(n.gaps)}
    assert counts(n.safety) == {"hypocalcaemia": 1} and n.safety[0].label.lower() == SAFETY["hypocalcaemia"].lower()
    by_quarter = {q.label: (q.covered, q.patients) for q in n.coverage}
    assert all(patients == 3 for _, patients in by_quarter.values())  # the patients on an AI at the as-of date
    assert by_quarter["2021 Q4"] == (0, 3)
    assert by_quarter["2022 Q1"] == (1, 3)  # b's first scan
    assert by_quarter["2023 Q4"] == (1, 3)  # 2022-01-15 is within 24 months of 2023-12-31
    assert by_quarter["2024 Q1"] == (0, 3)  # and more than 24 months before 2024-03-31: lapsed
    assert by_quarter["2024 Q3"] == (0, 3)
    assert by_quarter["2024 Q4"] == (1, 3)  # b's second scan
    assert by_quarter["2025 Q1"] == (2, 3)  # a's scan
    assert by_quarter["2026 Q2"] == (2, 3)
    assert round(n.coverage[-1].share, 3) == round(2 / 3, 3)


def test_nobody():
    n = Tally().numbers(AS_OF)
    assert (n.patients, n.on_ai, n.held) == (0, 0, 0)
    assert counts(n.categories) == {"high": 0, "moderate": 0, "low": 0, "indeterminate": 0}
    assert n.gaps == () and n.safety == ()
    assert len(n.coverage) == 20 and all(q.share is None for q in n.coverage)
    chart = coverage_chart(n.coverage)
    assert chart.points == () and chart.path == ""
    assert bar_chart(n.gaps).bars == ()


def test_patients_without_dxa_dates_are_counted_apart_never_as_covered():
    tally = Tally()
    old = contract(patient="Patient/old")
    del old["dxa_dates"]  # an assessment saved before the field existed
    tally.add(old)
    tally.add(contract(patient="Patient/none", dxa_dates=[]))
    n = tally.numbers(AS_OF)
    assert n.dxa_unknown == 1
    assert all((q.covered, q.patients) == (0, 1) for q in n.coverage)


def test_unknown_status_and_category_are_counted_and_named():
    tally = Tally()
    tally.add(contract(patient="Patient/x", category="very-high"))
    tally.add(contract(patient="Patient/y", ai_status="paused", category="high"))
    n = tally.numbers(AS_OF)
    assert counts(n.categories)["very-high"] == 1
    assert [c.label for c in n.categories if c.key == "very-high"] == ["Category not recognised: very-high"]
    assert counts(n.ai_status)["paused"] == 1
    assert any("not recognised: paused" in c.label for c in n.ai_status)


def test_bar_chart_scales_to_the_largest_and_keeps_the_order():
    from fhir_aibl.report.population import Count

    chart = bar_chart([Count("a", "A", 10), Count("b", "B", 5), Count("c", "C", 0)], "category")
    assert [b["count"] for b in chart.bars] == [10, 5, 0]
    assert chart.bars[0]["length"] == 2 * chart.bars[1]["length"] and chart.bars[2]["length"] == 0
    assert chart.bars[0]["css"] == "cat-a"
    assert [b["y"] for b in chart.bars] == sorted(b["y"] for b in chart.bars)


def test_coverage_chart_points_are_in_time_order_and_scaled():
    tally = Tally()
    tally.add(contract(dxa_dates=["2025-01-01"]))
    chart = coverage_chart(tally.numbers(AS_OF).coverage)
    xs = [p["x"] for p in chart.points]
    assert xs == sorted(xs) and len(xs) == 20
    x0, y0, x1, y1 = chart.plot
    assert {p["y"] for p in chart.points} == {y0, y1}  # 100% and 0%
    assert [p["percent"] for p in chart.points][-1] == 100
    labels = [t["label"] for t in chart.xticks]
    assert "2026 Q2" in labels and "2022 Q1" in labels
