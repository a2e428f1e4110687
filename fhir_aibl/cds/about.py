"""`GET /about`: the page a card's source link opens when no other page is configured.

A clinician who clicks the source of a card lands here: what the service does, what it reads,
what it proposes and on what evidence (the catalogue's clinician references), that nothing is
ordered without them, and which version answered. Plain HTML with inline style, no script, no
external resources (hospital networks block CDNs and web fonts). No patient data.
"""

from __future__ import annotations

import html

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from .. import __version__
from ..careplan import Catalogue

STYLE = (
    "body{font:15px/1.5 system-ui,'Segoe UI','DejaVu Sans',Arial,sans-serif;max-width:46rem;margin:2rem auto;"
    "padding:0 1rem;color:#1f2328}h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.6rem}"
    "li{margin:.2rem 0}footer{margin-top:2rem;color:#57606a;font-size:.85rem}"
)


def about_html(catalogue: Catalogue, label: str) -> str:
    refs = {}
    for ref in catalogue.references.values():
        refs.setdefault(ref.text, ref.url)
    cites = "".join(
        f'<li><a href="{html.escape(url)}">{html.escape(text)}</a></li>' if url else f"<li>{html.escape(text)}</li>"
        for text, url in refs.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(label)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>{html.escape(label)}</h1>
<p>This service supports the bone health of patients taking an aromatase inhibitor
(anastrozole, letrozole, exemestane), which speeds up bone loss. When a patient's chart is
opened, or an aromatase inhibitor or a bone drug is being ordered, it reads the record the EHR
sends (bone density scans, fractures, risk factors, kidney function, calcium, vitamin D and
medications) and answers with cards.</p>
<h2>What the cards say</h2>
<ul>
<li>The risk of bone loss (high, moderate, low, or not yet graded without a recent bone
density scan), with the values that decided it and their dates.</li>
<li>What to do: a scan, calcium and vitamin D, exercise, and for higher risk a bone-protecting
drug, with the guideline behind it.</li>
<li>Which drugs the record rules out, and the measured value that rules them out (for example
creatinine clearance or calcium). A drug that is ruled out is never offered, and a draft order
for it is flagged as critical.</li>
</ul>
<p><b>Everything is a proposal for the clinician to review: nothing is ordered until you
accept it.</b> Missing or old data never lowers a risk grade.</p>
<h2>Evidence</h2>
<ul>{cites}</ul>
<footer>fhir-aibl {html.escape(__version__)}; recommendation texts version {html.escape(catalogue.version)}.</footer>
</body></html>
"""


def router(catalogue: Catalogue, label: str) -> APIRouter:
    page = about_html(catalogue, label)
    api = APIRouter()

    @api.get("/about", response_class=HTMLResponse, include_in_schema=False)
    async def about() -> HTMLResponse:
        return HTMLResponse(page)

    return api
