"""The CDS card of a patient whose graded DXA has an unreadable site: never "low risk" (tests/test_unreadable_dxa.py has the rest)."""

from __future__ import annotations

from fhir_aibl.cds.samples import patient_view_request

from ..test_unreadable_dxa import unreadable_spine, v13_without_fracture, valueless_spine
from .conftest import PV


def cards_of(make_app, bundle: dict) -> list[dict]:
    return make_app().hook(PV, patient_view_request(bundle)).json()["cards"]


def test_the_card_of_an_unreadable_spine_result_does_not_say_low_risk(make_app):
    for spoil in (unreadable_spine, valueless_spine):
        cards = cards_of(make_app, spoil(v13_without_fracture()))
        text = " ".join(f"{c.get('summary', '')} {c.get('detail', '')}" for c in cards)
        assert "low risk" not in text.lower() and "low-risk" not in text.lower()
        detail = cards[0]["detail"]
        assert detail.startswith("**Bone-loss risk not yet graded**")
        assert "Obtain the full DXA report: a DXA result on record could not be read." in detail
        assert "Obtain the report of the DXA already on record" in detail
        labels = [s["label"] for c in cards for s in c.get("suggestions", [])]
        assert not any(label.startswith("Order:") for label in labels)  # the scan exists: no new one offered


def test_the_card_without_the_spoiled_result_says_low_risk(make_app):
    """The same record read whole: the card above differs only by the unreadable result."""
    detail = cards_of(make_app, v13_without_fracture())[0]["detail"]
    assert detail.startswith("**Low risk of bone loss**")
