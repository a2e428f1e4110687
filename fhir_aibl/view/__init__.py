"""The bone-health view: one patient's assessment as a page a clinician reads, rendered server-side.

`model.py` turns what the pipeline produced (the Assessment, the FactSet and the patient's
resources) into plain values for the page; `chart.py` draws the DXA history as inline SVG;
`render.py` fills the Jinja2 templates. The page loads nothing from elsewhere (no CDN, no web
font, no script): hospital networks block them. `site.py` writes the pages of many patients
with an index (`fhir-aibl assess --format html --out DIR`); `routes.py` serves the view as a
SMART on FHIR app under `fhir-aibl serve`.
"""

from .model import PatientView, build_view
from .render import render_index, render_patient

__all__ = ["PatientView", "build_view", "render_index", "render_patient"]
