"""The population in numbers, from the assessments' contracts: what the HTML report shows (docs/report.md).

    tally = Tally()
    for contract in outputs: tally.add(contract)         # or `tally.tee(outputs)` while they are written
    numbers = tally.numbers(as_of)

Like the worklist it reads the output contract alone, so it is the same from `assess`, `run`,
`run --bulk`, saved assessments and any number of workers: every count is a sum over patients,
and the order the patients come in changes nothing. It keeps counters, and for each patient on
an aromatase inhibitor the dates of her DXA results (a few dates each).

DXA coverage over time: for each of the last 20 calendar quarters up to the as-of date (the
current quarter measured at the as-of date, each earlier one at its last day), the share of the
patients on an aromatase inhibitor (`active` or `planned`) at the as-of date with a usable DXA
result in the 24 months before that day (the rules' validity window, inclusive). The contract
does not say when each patient started her aromatase inhibitor: earlier quarters show how
today's patients were covered then, not the population of that time. A contract without
`dxa_dates` (written before the field existed) is counted apart, never as covered or uncovered.
"""

from __future__ import annotations

import bisect
import datetime as dt
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dateutil.relativedelta import relativedelta

from ..clinician_text import CATEGORY_WORDS
from ..facts import months_between
from .worklist import GAPS, ON_AI, SAFETY, gaps_of

CATEGORIES = ("high", "moderate", "low", "indeterminate")
AI_STATUS_WORDS = {
    "active": "On an aromatase inhibitor",
    "planned": "About to start an aromatase inhibitor",
    "stopped": "Aromatase inhibitor stopped",
    "none": "No aromatase inhibitor on record",
}
QUARTERS = 20
DXA_WINDOW_MONTHS = 24


@dataclass(frozen=True)
class Count:
    key: str
    label: str
    count: int


@dataclass(frozen=True)
class Coverage:
    label: str  # "2026 Q2"
    day: dt.date  # the day it is measured on
    covered: int
    patients: int

    @property
    def share(self) -> float | None:
        return self.covered / self.patients if self.patients else None


@dataclass(frozen=True)
class Numbers:
    as_of: dt.date
    patients: int
    on_ai: int  # active or planned
    ai_status: tuple[Count, ...]
    categories: tuple[Count, ...]  # of the patients on an aromatase inhibitor
    gaps: tuple[Count, ...]  # patients with each gap, most urgent gap first
    safety: tuple[Count, ...]  # patients with each safety concern holding a therapy
    held: int  # patients with any of them
    coverage: tuple[Coverage, ...]
    dxa_unknown: int  # patients on an aromatase inhibitor whose assessment carries no DXA dates


def quarter_days(as_of: dt.date, count: int = QUARTERS) -> list[tuple[str, dt.date]]:
    """(label, day) of the last `count` calendar quarters, oldest first: the current quarter at `as_of`."""
    year, quarter = as_of.year, (as_of.month - 1) // 3
    days = []
    for i in range(count):
        if i == 0:
            day = as_of
        else:
            day = dt.date(year, 3 * quarter + 1, 1) + relativedelta(months=3) - dt.timedelta(days=1)
        days.append((f"{year} Q{quarter + 1}", day))
        quarter -= 1
        if quarter < 0:
            quarter, year = 3, year - 1
    return days[::-1]


def covered_on(dates: list[dt.date], day: dt.date) -> bool:
    """A DXA on or before `day` and at most 24 months before it (the rules' validity window)."""
    i = bisect.bisect_right(dates, day)
    return i > 0 and months_between(dates[i - 1], day) <= DXA_WINDOW_MONTHS


def _dates(value: Any) -> list[dt.date] | None:
    if not isinstance(value, list):
        return None
    found = set()
    for item in value:
        try:
            found.add(dt.date.fromisoformat(str(item)))
        except ValueError:
            continue  # the reader of saved assessments rejects such a contract; never a crash here
    return sorted(found)


class Tally:
    def __init__(self) -> None:
        self.patients = 0
        self.ai_status: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.gaps: Counter[str] = Counter()
        self.safety: Counter[str] = Counter()
        self.held = 0
        self.dxa: list[list[dt.date]] = []  # one entry per patient on an aromatase inhibitor with DXA dates
        self.dxa_unknown = 0

    def add(self, output: Any) -> None:
        """One patient's output: its contract dict (with or without --explain) or its Assessment."""
        contract = output if isinstance(output, dict) else output.contract()
        self.patients += 1
        status = str(contract.get("ai_status", ""))
        self.ai_status[status] += 1
        self.gaps.update(set(gaps_of(contract)))
        concerns = set(contract.get("flags", ())) & set(SAFETY)
        self.safety.update(concerns)
        self.held += bool(concerns)
        if status not in ON_AI:
            return
        self.categories[str(contract.get("category", ""))] += 1
        dates = _dates(contract.get("dxa_dates"))
        if dates is None:
            self.dxa_unknown += 1
        else:
            self.dxa.append(dates)

    def tee(self, outputs: Iterable[Any]) -> Iterator[Any]:
        for output in outputs:
            self.add(output)
            yield output

    def numbers(self, as_of: dt.date) -> Numbers:
        statuses = [Count(k, AI_STATUS_WORDS[k], self.ai_status[k]) for k in AI_STATUS_WORDS]
        statuses += [
            Count(k, f"Aromatase inhibitor status not recognised: {k or 'missing'}", n)
            for k, n in sorted(self.ai_status.items())
            if k not in AI_STATUS_WORDS
        ]
        categories = [Count(k, CATEGORY_WORDS[k], self.categories[k]) for k in CATEGORIES]
        categories += [
            Count(k, f"Category not recognised: {k or 'missing'}", n)
            for k, n in sorted(self.categories.items())
            if k not in CATEGORIES
        ]
        gaps = [
            Count(k, GAPS[k][1], self.gaps[k])
            for k in sorted(self.gaps, key=lambda k: (GAPS[k][0], k))
        ]
        safety = [Count(k, SAFETY[k][:1].upper() + SAFETY[k][1:], self.safety[k]) for k in sorted(self.safety)]
        coverage = [
            Coverage(label, day, sum(covered_on(dates, day) for dates in self.dxa), len(self.dxa))
            for label, day in quarter_days(as_of)
        ]
        return Numbers(
            as_of=as_of,
            patients=self.patients,
            on_ai=sum(self.ai_status[k] for k in ON_AI),
            ai_status=tuple(statuses),
            categories=tuple(categories),
            gaps=tuple(gaps),
            safety=tuple(safety),
            held=self.held,
            coverage=tuple(coverage),
            dxa_unknown=self.dxa_unknown,
        )
