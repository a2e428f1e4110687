"""The cards' resources as JSON: `as_json` gives what fhir_core's `model_dump_json` gives, byte for byte."""

from __future__ import annotations

import datetime as dt
import decimal

import orjson
import pytest
from fhir.resources.R4B.annotation import Annotation
from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.quantity import Quantity

from fhir_aibl.cds import cards as cards_module
from fhir_aibl.cds.fhirjson import as_json
from fhir_aibl.cds.samples import patient_view_request

from ..conftest import FIXTURES
from .conftest import PV, bundle


def _reference(model) -> bytes:
    return orjson.dumps(orjson.loads(model.model_dump_json(exclude_none=True)))


def test_every_suggestion_resource_of_the_fixtures(make_app, monkeypatch):
    seen = []

    def spy(model):
        seen.append(model)
        return as_json(model)

    monkeypatch.setattr(cards_module, "_json", spy)
    harness = make_app()
    for path in sorted((FIXTURES / "bundles").glob("V*.json")):
        assert harness.hook(PV, patient_view_request(bundle(path.stem))).status_code == 200
    kinds = {type(m).__name__ for m in seen}
    assert {"CarePlan", "RiskAssessment", "ServiceRequest", "MedicationRequest"} <= kinds
    for model in seen:
        assert orjson.dumps(as_json(model)) == _reference(model)


@pytest.mark.parametrize(
    "model",
    [
        Observation(
            status="final",
            code=CodeableConcept(coding=[Coding(system="http://loinc.org", code="39156-5")], text="BMI"),
            valueQuantity=Quantity(value=decimal.Decimal("19.50"), unit="kg/m2"),
            effectiveDateTime=dt.datetime(2026, 1, 15, 16, 19, 49, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            note=[Annotation(text="x", time=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))],
        ),
        Observation.model_validate(
            {"resourceType": "Observation", "status": "final", "code": {"text": "t"}, "valueInteger": 3,
             "_status": {"extension": [{"url": "http://example.org/x", "valueString": "y"}]},
             "category": [], "issued": "2026-01-01T00:00:00.123+01:00", "valueQuantity": None}
        ),
        Observation.model_validate(
            {"resourceType": "Observation", "status": "final", "code": {"coding": [{"code": "a"}]},
             "valueQuantity": {"value": 10}, "effectiveDateTime": "2026"}
        ),
    ],
)
def test_primitives_extensions_and_empty_lists(model):
    assert orjson.dumps(as_json(model)) == _reference(model)
