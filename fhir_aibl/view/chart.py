"""The DXA chart: every T- and Z-score over time by site, the thresholds as bands, the AI start marked.

The SVG is generated from the data (coordinates here, markup in `templates/chart.svg.j2`)
rather than drawn by matplotlib: the chart is a handful of points, lines and rectangles,
and generating it directly keeps the page small (a few kB, no embedded glyph paths), the
output deterministic, the text real text the browser can read aloud and a test can query
(each point carries its site, score, value and date as data attributes and a <title>), and
spares the service a plotting library with its native dependencies.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from .model import SITE_TEXT, DxaPoint, PatientView, day_text, score_text

WIDTH, HEIGHT = 680, 320
LEFT, RIGHT, TOP, BOTTOM = 56, 150, 16, 40
#: (upper, lower, css class, label): the bands between the thresholds of the risk table.
BANDS = (
    (-1.0, -1.5, "band-1", "−1.0 to −1.5"),
    (-1.5, -2.0, "band-2", "−1.5 to −2.0"),
    (-2.0, -2.5, "band-3", "−2.0 to −2.5"),
    (-2.5, None, "band-4", "−2.5 or lower: osteoporosis"),
)
THRESHOLDS = (-1.0, -1.5, -2.0, -2.5)
SITE_ORDER = ("LS", "TH", "FN", "FEMUR", "FA", "CALC")


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    plot: tuple[int, int, int, int]  # x0, y0, x1, y1
    bands: tuple[dict, ...]
    thresholds: tuple[dict, ...]
    yticks: tuple[dict, ...]
    xticks: tuple[dict, ...]
    series: tuple[dict, ...]
    ai_start: dict | None
    undated: int


def _days(day: dt.date) -> int:
    return day.toordinal()


def build_chart(view: PatientView) -> Chart | None:
    """The chart of a patient's dated T- and Z-scores; None when there is none to draw."""
    dated = [p for p in view.scores if p.date is not None]
    if not dated:
        return None
    x0, y0, x1, y1 = LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM
    days = [_days(p.date) for p in dated] + [_days(view.as_of)]
    if view.ai_start:
        days.append(_days(view.ai_start))
    first, last = min(days) - 60, max(days) + 30
    values = [p.value for p in dated]
    top = max(1.0, max(values) + 0.5)
    bottom = min(-3.5, min(values) - 0.5)

    def x(day: dt.date) -> float:
        return round(x0 + (x1 - x0) * (_days(day) - first) / (last - first), 1)

    def y(value: float) -> float:
        return round(y0 + (y1 - y0) * (top - value) / (top - bottom), 1)

    bands = []
    for upper, lower, css, label in BANDS:
        lo = bottom if lower is None else lower
        bands.append({"y": y(upper), "height": round(y(lo) - y(upper), 1), "class": css, "label": label, "upper": upper})
    thresholds = tuple({"y": y(t), "value": t, "label": score_text(t)} for t in THRESHOLDS)
    yticks = []
    tick = float(int(top))
    while tick >= bottom:
        yticks.append({"y": y(tick), "label": score_text(tick) if tick else "0"})
        tick -= 1.0
    xticks = []
    # years on a long history, half-years on a medium one, quarters on a short one
    span = last - first
    months = (1,) if span > 3 * 365 else (1, 7) if span > 400 else (1, 4, 7, 10)
    for year in range(dt.date.fromordinal(first).year, dt.date.fromordinal(last).year + 1):
        for month in months:
            tick_day = dt.date(year, month, 1)
            if first <= _days(tick_day) <= last:
                label = str(year) if month == 1 and len(months) < 4 else f"{tick_day:%b}" if len(months) < 4 else f"{tick_day:%b %Y}"
                xticks.append({"x": x(tick_day), "label": label})
    series = []
    for index, (measure, site) in enumerate(
        sorted({(p.measure, p.site) for p in dated}, key=lambda k: (k[0], SITE_ORDER.index(k[1]) if k[1] in SITE_ORDER else 99))
    ):
        points = sorted((p for p in dated if p.measure == measure and p.site == site), key=lambda p: p.date)
        series.append(
            {
                "measure": measure,
                "site": site,
                "label": f"{SITE_TEXT.get(site, site)} ({measure})",
                "class": f"s{SITE_ORDER.index(site) if site in SITE_ORDER else 9}",
                "legend_y": y0 + 14 + 18 * index,
                "path": " ".join(f"{'M' if i == 0 else 'L'}{x(p.date)},{y(p.value)}" for i, p in enumerate(points)),
                "points": [_point(p, x(p.date), y(p.value)) for p in points],
            }
        )
    ai = None
    if view.ai_start and first <= _days(view.ai_start) <= last:
        ai = {"x": x(view.ai_start), "label": f"Aromatase inhibitor from {day_text(view.ai_start)}", "date": view.ai_start.isoformat()}
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        plot=(x0, y0, x1, y1),
        bands=tuple(bands),
        thresholds=thresholds,
        yticks=tuple(yticks),
        xticks=tuple(xticks),
        series=tuple(series),
        ai_start=ai,
        undated=len(view.scores) - len(dated),
    )


def _point(p: DxaPoint, cx: float, cy: float) -> dict:
    return {
        "cx": cx,
        "cy": cy,
        "measure": p.measure,
        "site": p.site,
        "value": p.value,
        "date": p.date.isoformat() if p.date else "",
        "title": p.text,
        "selected": p.selected,
    }
