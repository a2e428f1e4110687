"""Jinja2 rendering of the bone-health page and of the index of many patients."""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from .chart import build_chart
from .model import PatientView, day_text, score_text

TEMPLATES = Path(__file__).resolve().parent / "templates"


def template_environment(folder: Path, **functions) -> Environment:
    """The project's Jinja2 settings for pages of package-data templates in `folder` (also the
    population report's, fhir_aibl/report/render.py), with `functions` callable from them."""
    env = Environment(
        loader=FileSystemLoader(folder),
        autoescape=True,  # every value from a record is escaped: a name may hold markup
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.globals.update(functions)
    return env


@functools.cache
def environment() -> Environment:
    return template_environment(TEMPLATES, day=day_text, score=score_text)


def render_patient(view: PatientView) -> str:
    """The page of one patient: self-contained HTML (styles and the chart inline, nothing fetched)."""
    return environment().get_template("patient.html.j2").render(v=view, chart=build_chart(view))


def render_index(rows: Sequence[tuple[PatientView, str]], as_of: dt.date, rejected: int = 0) -> str:
    """An index of patients: (view, link to its page) each, in the order given."""
    items = [{"view": view, "href": href} for view, href in rows]
    return environment().get_template("index.html.j2").render(rows=items, as_of=as_of, rejected=rejected)
