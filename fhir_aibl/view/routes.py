"""The bone-health view under `fhir-aibl serve`: the SMART on FHIR EHR launch (`/app/launch`, `/app/redirect`).

A FastAPI router, included by `fhir_aibl/cds/app.py`; it uses the service's own Assessor,
catalogue, FHIR allowlist, fetcher and prefetch queries (`request.app.state.cds`). See smart.py
for the flow and docs/view.md for registering the app with an EHR.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ..cds.prefetch import for_patient, render
from ..cds.validation import select_and_validate
from .model import build_view
from .render import environment, render_patient
from .smart import Launches, LaunchError, SmartSettings, authorization_url, discover, exchange

log = logging.getLogger("fhir_aibl.view")
router = APIRouter(prefix="/app")
#: the page loads nothing: inline styles and the inline SVG only
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors *",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


def _launches(request: Request) -> Launches:
    state = request.app.state
    if not hasattr(state, "smart_launches"):
        state.smart_launches = Launches()
    return state.smart_launches


def _smart(cds: Any) -> SmartSettings:
    return getattr(cds.settings, "smart", None) or SmartSettings()


def _redirect_uri(request: Request, cds: Any) -> str:
    base = cds.settings.public_base_url
    return f"{base.rstrip('/')}/app/redirect" if base else str(request.url_for("smart_redirect"))


def _problem(message: str, status: int) -> HTMLResponse:
    log.warning("SMART launch -> %d: %s", status, message)
    html = environment().get_template("problem.html.j2").render(message=message)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


@router.get("/launch", name="smart_launch")
async def launch(request: Request, iss: str | None = None, launch: str | None = None) -> Response:
    cds = request.app.state.cds
    if not iss or not launch:
        return _problem("An EHR launch needs the parameters iss and launch: open the app from the patient's chart in the EHR.", 400)
    if not cds.fetcher.allowed(iss):
        return _problem("This EHR's FHIR server is not on this service's list of allowed servers (fhir.allowlist).", 400)
    smart = _smart(cds)
    try:
        config = await run_in_threadpool(discover, iss, smart.timeout_seconds)
        url = authorization_url(smart, config, iss.rstrip("/"), launch, _redirect_uri(request, cds), _launches(request))
    except LaunchError as exc:
        return _problem(str(exc), exc.status)
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


def _read_record(cds: Any, iss: str, token: dict) -> list[dict]:
    """The launch patient's resources from the EHR's FHIR server, read with the access token (the prefetch queries)."""
    patient_id = token["patient"]
    deadline = time.monotonic() + cds.settings.fhir.budget_seconds
    jobs = [(key, render(template, patient_id)) for key, template in cds.templates.items()]
    outcomes = list(
        cds.fetch_pool.map(lambda job: cds.fetcher.fetch(job[0], iss, job[1], token["access_token"], deadline), jobs)
    )
    errors = [f"{o.key}: {o.error}" for o in outcomes if o.error]
    if errors:
        raise LaunchError(f"the patient's record could not be read from the EHR ({'; '.join(errors)})", 502)
    filtered = for_patient([item for o in outcomes for item in o.resources or []], patient_id)
    resources = filtered.resources
    if cds.settings.validate_resources:
        resources, _invalid, _partly = select_and_validate(cds.assessor.terminology, resources)
    if not any(r.get("resourceType") == "Patient" for r in resources):
        raise LaunchError("the EHR returned no usable Patient resource for the launch patient", 502)
    return list(resources)


@router.get("/redirect", name="smart_redirect")
async def redirect(
    request: Request, code: str | None = None, state: str | None = None, error: str | None = None
) -> Response:
    cds = request.app.state.cds
    if error:
        return _problem(f"The EHR did not authorize the app ({error}).", 400)
    if not code or not state:
        return _problem("The EHR's answer has no code or state: launch the app again from the EHR.", 400)
    try:
        pending = _launches(request).take(state)
        token = await run_in_threadpool(exchange, _smart(cds), pending, code)
        resources = await run_in_threadpool(_read_record, cds, pending.iss, token)
    except LaunchError as exc:
        return _problem(str(exc), exc.status)
    patient_ref = f"Patient/{token['patient']}"
    result = await run_in_threadpool(cds.assessor.assess, patient_ref, resources, cds.today())
    view = build_view(result.assessment, result.facts, resources, cds.catalogue)
    return HTMLResponse(render_patient(view), headers=SECURITY_HEADERS)
