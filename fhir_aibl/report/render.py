"""The population report: one static HTML file (styles and charts inline, nothing fetched, no script).

    html = render_report(tally.numbers(as_of), worklist)

Built from the same assessments as the worklist (`Tally` and `Worklist` both read the output
contract), so it is the same whatever the number of workers. What it says is for a nurse
navigator: plain words, the worklist's gap wording and the clinician layer's category words;
no rule id, code or reference but the patient's id.
"""

from __future__ import annotations

import functools
from pathlib import Path

from jinja2 import Environment

from ..clinician_text import CATEGORY_WORDS, day
from ..view.render import template_environment
from .charts import bar_chart, coverage_chart
from .population import Numbers
from .worklist import Worklist

TEMPLATES = Path(__file__).resolve().parent / "templates"
#: worklist rows shown in the report; the whole list is the worklist file
TOP_ROWS = 25


def category_words(category: str) -> str:
    return CATEGORY_WORDS.get(category, f"Category not recognised: {category or 'missing'}")


@functools.cache
def environment() -> Environment:
    return template_environment(TEMPLATES, day=day, category_words=category_words)  # escapes every value


def render_report(numbers: Numbers, worklist: Worklist, top: int = TOP_ROWS) -> str:
    env = environment()
    rows = worklist.ordered()
    template = env.get_template("report.html.j2")
    return template.render(
        n=numbers,
        bars=env.get_template("bars.svg.j2").module.bars,
        categories=bar_chart(numbers.categories, "category"),
        gaps=bar_chart(numbers.gaps),
        safety=bar_chart(numbers.safety, "safety"),
        coverage=coverage_chart(numbers.coverage),
        listed=len(rows),
        top=rows[:top],
    )


def write_report(path: Path, numbers: Numbers, worklist: Worklist) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(numbers, worklist), encoding="utf-8")
