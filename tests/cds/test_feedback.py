"""Feedback: validated, stored durably in SQLite; overridden cards suppressed for the same patient
and assessment for the configured period, unless the category worsens."""

from __future__ import annotations

import copy

import pytest

from fhir_aibl.cds.samples import draft_medication_request, order_select_request, patient_view_request
from fhir_aibl.clinician_text import CATEGORY_WORDS

from .conftest import OS, PV, bundle

DAY = 86400.0


def override(card: dict, reason: dict | None = None) -> dict:
    item: dict = {"card": card["uuid"], "outcome": "overridden", "outcomeTimestamp": "2026-06-01T10:00:00Z"}
    if reason is not None:
        item["overrideReason"] = {"reason": reason, "userComment": "discussed with the patient"}
    return {"feedback": [item]}


def kinds(cards: list[dict]) -> list[str]:
    return ["treatment" if c.get("selectionBehavior") == "at-most-one" else "safety" if c["indicator"] == "critical" else "assessment" for c in cards]


def with_t_score(case: str, value: float) -> dict:
    """The case's request with every DXA T-score set to `value` (same patient, new data)."""
    request = patient_view_request(bundle(case))
    for entry in request["prefetch"]["observations"]["entry"]:
        resource = entry["resource"]
        if resource["id"].startswith(f"{case.lower()}-dxa") and "valueQuantity" in resource:
            resource["valueQuantity"]["value"] = value
            resource["meta"] = {"versionId": "9"}
    return request


@pytest.fixture
def harness(make_app):
    return make_app()


def test_accepted_feedback_is_stored(harness):
    cards = harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    suggestion = cards[0]["suggestions"][0]["uuid"]
    body = {"feedback": [{"card": cards[0]["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": suggestion}], "outcomeTimestamp": "2026-06-01T10:00:00Z"}]}
    response = harness.feedback(PV, body)
    assert response.status_code == 200
    assert harness.cds.store.feedback_count() == 1
    # Accepting does not suppress.
    assert len(harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]) == len(cards)


def test_an_overridden_card_is_not_shown_again_for_the_same_patient_and_assessment(harness):
    request = patient_view_request(bundle("V06"))
    cards = harness.hook(PV, request).json()["cards"]
    assert kinds(cards) == ["assessment", "treatment"]
    reason = cards[0]["overrideReasons"][0]
    assert harness.feedback(PV, override(cards[0], reason)).status_code == 200
    again = harness.hook(PV, request).json()["cards"]
    assert kinds(again) == ["treatment"]  # the overridden assessment card only
    # Another patient's cards are untouched.
    assert kinds(harness.hook(PV, patient_view_request(bundle("V09"))).json()["cards"]) == ["assessment", "treatment"]
    # Another service's cards are untouched.
    draft = draft_medication_request("v06", "199224", "anastrozole")
    assert "assessment" in kinds(harness.hook(OS, order_select_request(bundle("V06"), [draft])).json()["cards"])


def test_suppression_ends_after_the_period(make_app):
    harness = make_app(feedback={"suppression_days": 30})
    request = patient_view_request(bundle("V06"))
    cards = harness.hook(PV, request).json()["cards"]
    harness.feedback(PV, override(cards[0]))
    harness.clock[0] += 29 * DAY
    assert kinds(harness.hook(PV, request).json()["cards"]) == ["treatment"]
    harness.clock[0] += 2 * DAY
    assert kinds(harness.hook(PV, request).json()["cards"]) == ["assessment", "treatment"]


def test_a_worse_category_is_always_shown(harness):
    moderate = patient_view_request(bundle("V04"))  # T -1.6: moderate
    cards = harness.hook(PV, moderate).json()["cards"]
    harness.feedback(PV, override(cards[0]))
    assert "assessment" not in kinds(harness.hook(PV, moderate).json()["cards"])
    high = with_t_score("V04", -2.6)  # same patient, a new DXA: high
    cards = harness.hook(PV, high).json()["cards"]
    assert CATEGORY_WORDS["high"] in cards[0]["summary"]


def test_new_data_that_changes_nothing_keeps_the_card_suppressed(harness):
    cards = harness.hook(PV, patient_view_request(bundle("V04"))).json()["cards"]
    harness.feedback(PV, override(cards[0]))
    same = with_t_score("V04", -1.7)  # still moderate, same recommendations
    assert "assessment" not in kinds(harness.hook(PV, same).json()["cards"])


def test_patient_scope_suppresses_any_assessment_unless_worse(make_app):
    harness = make_app(feedback={"suppression_scope": "patient"})
    cards = harness.hook(PV, patient_view_request(bundle("V04"))).json()["cards"]
    harness.feedback(PV, override(cards[0]))
    better = with_t_score("V04", -1.0)  # low
    assert "assessment" not in kinds(harness.hook(PV, better).json()["cards"])
    worse = with_t_score("V04", -2.6)  # high
    assert "assessment" in kinds(harness.hook(PV, worse).json()["cards"])


def test_the_treatment_card_is_suppressed_on_its_own(harness):
    request = patient_view_request(bundle("V06"))
    cards = harness.hook(PV, request).json()["cards"]
    harness.feedback(PV, override(cards[1]))
    assert kinds(harness.hook(PV, request).json()["cards"]) == ["assessment"]


def test_critical_cards_are_never_suppressed(make_app, tmp_path):
    table = tmp_path / "safety.yaml"
    table.write_text(
        "blocks:\n  - id: T\n    when: [{kind: recommendation, code: ci-check}]\n    blocks: {ingredients: [zoledronic-acid]}\n    reason: test\n"
    )
    harness = make_app(safety=str(table))
    request = order_select_request(bundle("V06"), [draft_medication_request("v06", "77655", "zoledronic acid")])
    critical = [c for c in harness.hook(OS, request).json()["cards"] if c["indicator"] == "critical"]
    assert harness.feedback(OS, override(critical[0])).status_code == 200
    assert [c for c in harness.hook(OS, request).json()["cards"] if c["indicator"] == "critical"]


def _override_then_restart(make_app, database: str, between=None) -> list[str]:
    """Override V06's first card, close the service, (change the database,) and start it again:
    the kinds of card the restarted service shows."""
    first = make_app(feedback={"database": database})
    request = patient_view_request(bundle("V06"))
    cards = first.hook(PV, request).json()["cards"]
    first.feedback(PV, override(cards[0]))
    first.cds.close()
    if between is not None:
        between(database)
    second = make_app(feedback={"database": database})
    second.clock[0] = first.clock[0]
    return kinds(second.hook(PV, request).json()["cards"])


def test_suppression_survives_a_restart(make_app, tmp_path):
    assert _override_then_restart(make_app, str(tmp_path / "shared.sqlite3")) == ["treatment"]


def test_a_database_from_before_the_overrides_table_keeps_its_suppressions(make_app, tmp_path):
    import sqlite3

    def as_before_overrides(database: str) -> None:
        with sqlite3.connect(database) as db:  # as the store left it before it kept `overrides`
            db.execute("DROP TABLE overrides")
            db.execute("DELETE FROM meta WHERE name = 'overrides'")

    assert _override_then_restart(make_app, str(tmp_path / "old.sqlite3"), as_before_overrides) == ["treatment"]


def test_an_override_goes_when_its_card_is_pruned(make_app):
    """As the join of feedback to cards did: a pruned card's override no longer suppresses."""
    harness = make_app(feedback={"suppression_days": 30, "retention_days": 30})
    request = patient_view_request(bundle("V06"))
    cards = harness.hook(PV, request).json()["cards"]
    harness.clock[0] += 25 * DAY
    assert harness.feedback(PV, override(cards[0])).status_code == 200
    harness.clock[0] += 6 * DAY  # the card is 31 days old, the override 6
    harness.cds.store._writes = 0  # the next write prunes
    assert kinds(harness.hook(PV, request).json()["cards"]) == ["treatment"]  # checked before the prune
    assert kinds(harness.hook(PV, request).json()["cards"]) == ["assessment", "treatment"]


def test_many_cards_for_one_patient_do_not_change_suppression(harness):
    request = patient_view_request(bundle("V06"))
    for _ in range(30):
        harness.hook(PV, request)
    cards = harness.hook(PV, request).json()["cards"]
    harness.feedback(PV, override(cards[1]))
    assert kinds(harness.hook(PV, request).json()["cards"]) == ["assessment"]


def test_the_database_holds_no_patient_id(harness):
    cards = harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    harness.feedback(PV, override(cards[0]))
    harness.cds.store.close()
    path = harness.cds.store.path
    raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    assert b"v06" not in raw


# --------------------------------------------------------------------------- refused feedback


def _card(harness) -> dict:
    return harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"][0]


@pytest.mark.parametrize(
    "make_body, status, why",
    [
        (lambda c: {"feedback": []}, 400, "feedback"),
        (lambda c: {"nothing": 1}, 400, "feedback"),
        (lambda c: [1, 2], 400, "JSON object"),
        (lambda c: {"feedback": [{"card": "not-a-uuid", "outcome": "overridden", "outcomeTimestamp": "2026-06-01T10:00:00Z"}]}, 400, "uuid"),
        (lambda c: {"feedback": [{"card": c["uuid"], "outcome": "ignored", "outcomeTimestamp": "2026-06-01T10:00:00Z"}]}, 400, "outcome"),
        (lambda c: {"feedback": [{"card": c["uuid"], "outcome": "overridden"}]}, 400, "outcomeTimestamp"),
        (lambda c: {"feedback": [{"card": c["uuid"], "outcome": "accepted", "outcomeTimestamp": "2026-06-01T10:00:00Z"}]}, 400, "acceptedSuggestions"),
        (lambda c: {"feedback": [{"card": c["uuid"], "outcome": "accepted", "acceptedSuggestions": [{"id": "nope"}], "outcomeTimestamp": "2026-06-01T10:00:00Z"}]}, 400, "not suggestions of that card"),
        (lambda c: override(c, {"system": "urn:other", "code": "x"}), 400, "overrideReason is not one the card offered"),
        (lambda c: {"feedback": [{"card": "9368d37b-283f-44a0-93ea-547cebab93ed", "outcome": "overridden", "outcomeTimestamp": "2020-12-11T00:00:00Z"}]}, 404, "was not issued by this service"),
    ],
)
def test_bad_feedback_is_refused_and_nothing_is_stored(harness, make_body, status, why):
    card = _card(harness)
    good = override(card)["feedback"][0]
    body = make_body(card)
    if isinstance(body, dict) and body.get("feedback"):
        body = {"feedback": [good, *body["feedback"]]}  # one good item beside the bad one: all or nothing
    response = harness.feedback(PV, body)
    assert response.status_code == status
    assert why in response.json()["issue"][0]["details"]["text"]
    assert harness.cds.store.feedback_count() == 0


def test_feedback_for_another_service_is_404(harness):
    card = _card(harness)
    response = harness.feedback(OS, override(card))
    assert response.status_code == 404


def test_feedback_to_an_unknown_service_is_404(harness):
    assert harness.feedback("nope", override(_card(harness))).status_code == 404


def test_the_specification_feedback_example_for_our_card(harness):
    card = _card(harness)
    body = copy.deepcopy({"feedback": [{"card": card["uuid"], "outcome": "overridden", "overrideReason": {"reason": card["overrideReasons"][1], "userComment": "A comment entered by the clinician."}, "outcomeTimestamp": "2020-12-11T00:00:00Z"}]})
    assert harness.feedback(PV, body).status_code == 200
    assert harness.cds.store.feedback_count() == 1
