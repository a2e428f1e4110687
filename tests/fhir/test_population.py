"""Population selection: AI codes from the value set, code search with paging, checked here."""

from __future__ import annotations

import dataclasses

import pytest

from fhir_aibl.fhir import PROFILES, FhirClient
from fhir_aibl.fhir.errors import NotSupported
from fhir_aibl.fhir.population import ai_concepts, select_population

from .fakes import ALIAS, BASE, FakeFhir, mock, patient, statement

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def request(rid: str, pid: str, code: str, status: str = "active", intent: str = "order") -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": status,
        "intent": intent,
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": "2025-01-01",
    }


def test_the_ai_codes_come_from_the_value_set(assessor):
    concepts = ai_concepts(assessor.terminology)
    codes = {code for _, code in concepts}
    assert {
        "84857",
        "199224",
        "151124",
        "262485",
        "72965",
        "200064",
        "203769",
        "258494",
        "310261",
        "262105",
        "L02BG03",
        "L02BG04",
        "L02BG06",
    } <= codes
    assert not codes & {"10324", "L02BA01", "198240"}  # tamoxifen is a SERM, never an aromatase inhibitor
    vs = assessor.terminology.valueset("medications")
    assert len(concepts) == sum(1 for c in vs.exact.values() if c.get("class") == "aromatase-inhibitor")


def _select(fake: FakeFhir, assessor, profile: str = "generic", **changes):
    client = FhirClient(BASE, profile=dataclasses.replace(PROFILES[profile], **changes))
    with mock() as rsps:
        fake.install(rsps)
        return select_population(client, assessor.terminology), client


def test_patients_on_an_active_or_intended_ai_are_selected_and_checked(assessor):
    resources = [
        patient("a"),
        statement("s-a", "a"),  # anastrozole SCD, active
        patient("b"),
        statement("s-b", "b", code="L02BG04", system="http://www.whocc.no/atc"),  # letrozole ATC
        patient("c"),
        statement("s-c", "c", status="intended"),
        patient("d"),
        statement("s-d", "d", status="on-hold"),
        patient("e"),
        statement("s-e", "e", status="completed"),  # stopped: not selected
        patient("f"),
        statement("s-f", "f", code="10324"),  # tamoxifen: not selected
        patient("g"),
        request("r-g", "g", "84857", status="draft"),  # planned
        patient("h"),
        request("r-h", "h", "262105", intent="proposal"),  # intended (active proposal)
        patient("i"),
        request("r-i", "i", "84857", status="cancelled"),
        patient("j"),
        statement("s-j", "j", system="urn:oid:2.16.840.1.113883.6.88"),  # RxNorm by its OID
        patient("k"),
        statement("s-k", "k", system="http://example.org/local-formulary"),  # same code, other system
        statement("s-a2", "a"),  # a second statement for a
    ]
    population, client = _select(FakeFhir(resources=resources), assessor)
    assert population.patient_ids == ["a", "b", "c", "d", "g", "h", "j"]
    assert population.rejected == ["MedicationStatement/s-k: code not an aromatase inhibitor in its system"]
    assert population.requests == 2


def test_the_search_sends_every_code_once_and_the_statuses(assessor):
    fake = FakeFhir(resources=[patient("a"), statement("s-a", "a")])
    _select(fake, assessor)
    (ms,) = fake.searches_of("MedicationStatement")
    (mr,) = fake.searches_of("MedicationRequest")
    assert "status=active,on-hold,intended" in ms and "status=active,on-hold,draft" in mr
    codes = ms.split("code=")[1].split("&")[0].split(",")
    assert len(codes) == len(set(codes)) and "199224" in codes


def test_the_population_search_follows_pages(assessor):
    resources = [statement(f"s{i}", f"p{i}") for i in range(23)]
    population, client = _select(FakeFhir(resources=resources), assessor, page_size=5)
    assert len(population.patient_ids) == 23
    assert population.requests == 5 + 1  # 5 pages of statements, 1 of requests


def test_a_server_that_cannot_search_without_a_patient_says_so(assessor):
    with pytest.raises(NotSupported, match="--patient"):
        _select(FakeFhir(), assessor, profile="epic")


def test_an_aromatase_inhibitor_naming_its_patient_on_another_base_still_selects_the_patient(assessor):
    """Never hidden on a guess: the statement names Patient/x by an absolute reference on a base
    other than the client's (a server behind a proxy); x is selected, and the run says why."""
    aliased = statement("s-x", "x")
    aliased["subject"]["reference"] = f"{ALIAS}/Patient/x"
    nobody = statement("s-n", "n")
    nobody["subject"] = {"identifier": {"value": "MRN-9"}}
    population, _ = _select(FakeFhir(resources=[patient("a"), statement("s-a", "a"), patient("x"), aliased, nobody]), assessor)
    assert population.patient_ids == ["a", "x"]
    assert population.warnings == [
        "MedicationStatement/s-x: an aromatase inhibitor for Patient/x on another base; Patient/x of this server "
        "is assessed (its records are those the server answers for it)",
        "MedicationStatement/s-n: an aromatase inhibitor that names no patient on this server: nobody selected by it",
    ]
