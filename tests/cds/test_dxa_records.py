"""The CDS card of a patient whose DXA is on record without a result, and her recorded FRAX (tests/test_dxa_records.py has the rest)."""

from __future__ import annotations

from fhir_aibl.cds.samples import patient_view_request

from ..test_dxa_records import anastrozole, bundle, dxa_report, observation, patient, percent
from .conftest import PV


def test_the_cds_card_names_the_dxa_on_record(make_app):
    request = patient_view_request(bundle(patient(), anastrozole(), dxa_report("dr1"), observation("frax", "90265-0", "2026-01-10", **percent(24))))
    cards = make_app().hook(PV, request).json()["cards"]
    detail = cards[0]["detail"]
    assert "a DXA was done on 20 Feb 2026, result not on record" in detail
    assert "Obtain the DXA report" in detail or "Obtain the report of the DXA" in detail
    assert "FRAX 10-year major osteoporotic fracture risk 24% on 10 Jan 2026" in detail
    labels = [s["label"] for c in cards for s in c.get("suggestions", [])]
    assert not any(label.startswith("Order:") for label in labels)  # obtain the report; no new scan offered
