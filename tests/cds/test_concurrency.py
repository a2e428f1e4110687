"""64 concurrent patient-view requests for 64 different patients: every answer is about its own patient.

The requests are the 60 fixture records, plus 4 of them again under new patient ids (every id
in the record renamed, so the copies are different patients with the same data). They run at
once through the app's worker pool and the one shared Assessor; each answer is checked
against that patient's expected category, and every FHIR reference on its cards must be one
of that patient's resources.
"""

from __future__ import annotations

import json
import re

from fhir_aibl.cds.samples import patient_view_request
from fhir_aibl.clinician_text import CATEGORY_WORDS

from .conftest import BUNDLES, PV

REFERENCE = re.compile(r"\b(Patient|Observation|Condition|MedicationStatement|MedicationRequest|MedicationAdministration|FamilyMemberHistory)/([A-Za-z0-9\-.]+)")


def _records(expected: dict) -> list[tuple[str, dict, dict]]:
    """(patient id, bundle, expectation) for 64 different patients."""
    out = []
    names = sorted(p.stem for p in BUNDLES.glob("V*.json"))
    for name in names:
        out.append((name.lower(), json.loads((BUNDLES / f"{name}.json").read_text()), expected[name]))
    for name in names[: 64 - len(names)]:  # twins make up 64
        # `v01` -> `w01` everywhere: ids, references, urn-free ids such as v01-dxa-ls.
        text = (BUNDLES / f"{name}.json").read_text()
        twin = "w" + name.lower()[1:]
        out.append((twin, json.loads(re.sub(rf"\b{name.lower()}\b", twin, text)), expected[name]))
    return out


def test_64_concurrent_requests_each_about_its_own_patient(make_app, expected, monkeypatch):
    harness = make_app(assess_workers=4, max_queued=128)
    seen: list[int] = []
    original = harness.cds._assess

    def counting(*args):
        seen.append(harness.cds.in_flight)
        return original(*args)

    monkeypatch.setattr(harness.cds, "_assess", counting)
    records = _records(expected)
    assert len({pid for pid, _, _ in records}) == 64
    calls = [(f"/cds-services/{PV}", {"json": patient_view_request(b, patient_id=pid)}) for pid, b, _ in records]
    responses = harness.client.gather(calls)
    assert max(seen) > 1  # the requests really were in progress together
    for (pid, _bundle, exp), response in zip(records, responses, strict=True):
        assert response.status_code == 200, (pid, response.text)
        cards = response.json()["cards"]
        if exp["category"] == "not-applicable":
            assert cards == [], pid
            continue
        assert CATEGORY_WORDS[exp["category"]] in cards[0]["summary"], pid
        text = json.dumps(cards)
        for rtype, rid in REFERENCE.findall(text):
            # Every resource of the fixtures carries its patient's id as prefix (v06, v06-dxa-ls).
            assert rid == pid or rid.startswith(f"{pid}-") or rid.startswith("draft-"), (pid, rtype, rid)
        subjects = {r["subject"]["reference"] for c in cards for s in c.get("suggestions", []) for a in s["actions"] for r in [a.get("resource", {})] if "subject" in r}
        assert subjects == {f"Patient/{pid}"}, pid


def test_the_startup_heap_is_frozen_for_the_collector(make_app):
    """What is loaded before the first request is left out of every later full collection."""
    import asyncio
    import gc

    app = make_app().app

    async def started() -> int:
        async with app.router.lifespan_context(app):  # what uvicorn runs at startup
            return gc.get_freeze_count()

    gc.unfreeze()
    try:
        assert asyncio.run(started()) > 0
    finally:
        gc.unfreeze()
