"""The report's charts as geometry: horizontal bars (categories, care gaps, safety concerns) and
DXA coverage per quarter as a line; the markup is in `templates/report.html.j2`.

Generated from the numbers rather than drawn by a plotting library, as the patient view's chart
is (fhir_aibl/view/chart.py): a few rectangles and lines, deterministic, real text a browser can
read aloud and a test can query (each bar and point carries its count or share as data
attributes and a <title>), nothing fetched.
"""

from __future__ import annotations

from dataclasses import dataclass

from .population import Count, Coverage

WIDTH = 760
BAR_LABEL, BAR_HEIGHT, BAR_GAP = 18, 16, 14  # a label line above each bar
BAR_MAX = 600  # the longest bar; the count is written after it


@dataclass(frozen=True)
class Bars:
    width: int
    height: int
    bars: tuple[dict, ...]


def bar_chart(counts: tuple[Count, ...] | list[Count], css: str = "") -> Bars:
    """One bar per count, in the order given, scaled to the largest; css "category" colours each
    bar by its category."""
    top = max((c.count for c in counts), default=0)
    bars, y = [], 4
    for c in counts:
        length = round(BAR_MAX * c.count / top) if top else 0
        bars.append(
            {
                "key": c.key,
                "label": c.label,
                "count": c.count,
                "label_y": y + 13,
                "y": y + BAR_LABEL,
                "length": max(length, 2 if c.count else 0),
                "css": f"cat-{c.key}" if css == "category" else css,
            }
        )
        y += BAR_LABEL + BAR_HEIGHT + BAR_GAP
    return Bars(WIDTH, y, tuple(bars))


@dataclass(frozen=True)
class Line:
    width: int
    height: int
    plot: tuple[int, int, int, int]  # x0, y0, x1, y1
    points: tuple[dict, ...]  # only the quarters with patients to count
    path: str
    yticks: tuple[dict, ...]
    xticks: tuple[dict, ...]


def coverage_chart(coverage: tuple[Coverage, ...]) -> Line:
    """Share covered (0 to 100%) per quarter, left (oldest) to right (the as-of date)."""
    height = 300
    x0, y0, x1, y1 = 56, 16, WIDTH - 24, height - 44
    step = (x1 - x0) / max(len(coverage) - 1, 1)

    def y_of(share: float) -> float:
        return round(y1 - (y1 - y0) * share, 1)

    points, xticks = [], []
    for i, q in enumerate(coverage):
        x = round(x0 + step * i, 1)
        last = len(coverage) - 1
        # a label at the as-of quarter, at each year's first quarter but the one next to it, and at the
        # oldest quarter unless a year's label is next to it (labels side by side would overlap)
        q1 = q.label.endswith("Q1") and i < last - 1
        oldest = i == 0 and not (last >= 1 and coverage[1].label.endswith("Q1"))
        if i == last or q1 or oldest:
            xticks.append({"x": x, "label": q.label})
        if q.share is None:
            continue
        points.append(
            {
                "x": x,
                "y": y_of(q.share),
                "label": q.label,
                "day": q.day,
                "covered": q.covered,
                "patients": q.patients,
                "percent": round(100 * q.share),
            }
        )
    path = " ".join(f"{'M' if i == 0 else 'L'}{p['x']},{p['y']}" for i, p in enumerate(points))
    yticks = tuple({"y": y_of(v / 100), "label": f"{v}%"} for v in (0, 25, 50, 75, 100))
    return Line(WIDTH, height, (x0, y0, x1, y1), tuple(points), path, yticks, tuple(xticks))
