"""Bad input never makes a 500: any part of a real request replaced by arbitrary JSON gets an answer
(200 with cards about the patient, or 400/412 with a reason), for both hooks."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_aibl.cds import create_app, settings_for_tests
from fhir_aibl.cds.samples import draft_medication_request, order_select_request, patient_view_request

from .conftest import AS_OF, OS, PV, Client, Harness, bundle

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8,
)


def paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from paths(child, prefix + (i,))


def replaced(value, path, new):
    if not path:
        return new
    value = json.loads(json.dumps(value))
    target = value
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return value


@pytest.fixture(scope="module")
def base_requests():
    draft = draft_medication_request("v06", "77655", "zoledronic acid")
    draft["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": 4, "unit": "mg"}}]}]
    return {
        PV: patient_view_request(bundle("V06")),
        OS: order_select_request(bundle("V06"), [draft_medication_request("v06", "199224", "anastrozole"), draft]),
    }


@pytest.fixture(scope="module")
def harness(tmp_path_factory, assessor):
    settings_ = settings_for_tests(tmp_path_factory.mktemp("robust"), allow_unsigned=True, as_of=AS_OF)
    app = create_app(settings_, assessor=assessor)
    harness = Harness(app, Client(app))
    yield harness
    harness.client.close()
    harness.cds.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_mutation_gets_an_answer_not_a_500(harness, base_requests, data):
    service = data.draw(st.sampled_from([PV, OS]))
    request = base_requests[service]
    all_paths = list(paths(request))
    path = data.draw(st.sampled_from(all_paths))
    mutated = replaced(request, path, data.draw(JSON))
    response = harness.hook(service, mutated)
    # a body replaced by null is sent as no body at all, without a Content-Type: 415
    assert response.status_code in (200, 400, 412) + ((415,) if mutated is None else ()), (path, response.text)
    if response.status_code == 200:
        text = json.dumps(response.json())
        cards = response.json()["cards"]
        # about this patient, or no card, or the one card of a medication that could not be read
        # (a mutated aromatase inhibitor: never silence, tests/test_unreadable_entries.py)
        assert "Patient/v06" in text or cards == [] or [c["summary"] for c in cards] == [
            "A medication could not be read: check for an aromatase inhibitor"]
