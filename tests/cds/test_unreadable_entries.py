"""The CDS cards of a record with entries that could not be read (tests/test_unreadable_entries.py
has the rules' side): an aromatase inhibitor that fails validation is a warning card, never
silence; a fracture that fails validation never leaves a "low risk" card."""

from __future__ import annotations

from fhir_aibl.cds.samples import patient_view_request

from ..test_unreadable_entries import SPOILED_FRACTURES, SPOILED_STATEMENTS, _bundle, _resource
from .conftest import PV


def _cards(make_app, bundle: dict) -> list[dict]:
    response = make_app().hook(PV, patient_view_request(bundle))
    assert response.status_code == 200
    return response.json()["cards"]


def test_an_aromatase_inhibitor_that_cannot_be_read_is_a_warning_card(make_app):
    for name, spoil in SPOILED_STATEMENTS.items():
        bundle = _bundle("V01")
        spoil(_resource(bundle, "v01-anastrozole"))
        [card] = _cards(make_app, bundle)
        assert card["indicator"] == "warning", name
        assert "could not be read" in card["summary"], name
        assert "Check the medication list for an aromatase inhibitor" in card["detail"], name
        assert "MED-FLAG-UNREADABLE" not in card["detail"]  # rule ids are reviewer material


def test_a_fracture_that_cannot_be_read_never_gives_a_low_risk_card(make_app):
    bundle = _bundle("V13")
    SPOILED_FRACTURES["modifier extension malformed"](_resource(bundle, "v13-fx-hip"))
    cards = _cards(make_app, bundle)
    text = " ".join(f"{c.get('summary', '')} {c.get('detail', '')}" for c in cards).lower()
    assert "low risk" not in text
    assert cards[0]["detail"].startswith("**Bone-loss risk not yet graded**")
    assert "could not be read" in cards[0]["detail"]


def _prefetched(request: dict, rid: str) -> dict:
    return next(e["resource"] for value in request["prefetch"].values() if isinstance(value, dict)
                for e in value.get("entry", []) if e["resource"].get("id") == rid)


def test_a_prefetched_aromatase_inhibitor_naming_no_patient_is_not_silence(make_app):
    """Sent in this patient's prefetch, but its subject lost: it cannot be proven hers, and it
    cannot be ignored either (before: dropped unread, no card, nothing said)."""
    request = patient_view_request(_bundle("V01"))
    _prefetched(request, "v01-anastrozole")["subject"] = {"display": "the patient"}
    [card] = make_app().hook(PV, request).json()["cards"]
    assert card["indicator"] == "warning" and "could not be read" in card["summary"]

    request = patient_view_request(_bundle("V13"))
    _prefetched(request, "v13-fx-hip").pop("subject")
    cards = make_app().hook(PV, request).json()["cards"]
    assert cards[0]["detail"].startswith("**Bone-loss risk not yet graded**")  # not low
    assert "Check the chart for entries that could not be read" in cards[0]["detail"]
