"""`fhir-aibl assess --format html --out DIR`: one page per patient plus an index, for review without an EHR."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from ..assess import RULES_DIR, Assessor
from ..assessment import Assessment
from ..careplan import Catalogue, load_catalogue
from ..errors import AiblError
from ..sources import PatientRecord
from .model import build_view
from .render import render_index, render_patient

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_catalogue() -> Catalogue:
    return load_catalogue(RULES_DIR / "recommendations.yaml")


def page_name(patient_id: str, taken: set[str]) -> str:
    """A file name for a patient's page: its id made safe, unique within the folder."""
    base = _UNSAFE.sub("_", patient_id).strip("._") or "patient"
    name, n = f"{base}.html", 1
    while name.lower() in taken or name.lower() == "index.html":
        n += 1
        name = f"{base}-{n}.html"
    taken.add(name.lower())
    return name


def write_site(
    assessor: Assessor,
    records: Iterable[PatientRecord | AiblError],
    as_of: dt.date,
    out: Path,
    problems: list[AiblError],
    catalogue: Catalogue | None = None,
    on_assessment: Callable[[Assessment], None] | None = None,
) -> list[Path]:
    """Assess every record and write its page into `out`, then `index.html`; the pages written, index last.

    A record that cannot be assessed is appended to `problems` and the others carry on.
    `on_assessment` sees each assessment (the command's worklist and population report).
    """
    from ..cli import iter_assessments  # the CLI's loop: the same rejections, the same warnings

    # the texts of the ruleset that decides (`--rules` moves the catalogue with the rules)
    catalogue = catalogue or load_catalogue(assessor.paths.catalogue)
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    rows = []
    written = []
    for record in records:
        for result in iter_assessments(assessor, [record], as_of, problems):
            if on_assessment is not None:
                on_assessment(result.assessment)
            view = build_view(result.assessment, result.facts, record.resources, catalogue)
            name = page_name(view.patient_id, taken)
            path = out / name
            path.write_text(render_patient(view), encoding="utf-8")
            rows.append((view, name))
            written.append(path)
    index = out / "index.html"
    index.write_text(render_index(rows, as_of, rejected=len(problems)), encoding="utf-8")
    written.append(index)
    return written
