"""Unit tests of fact extraction: small hand-built FHIR R4 resources -> flat facts.

No mocks: the real value sets of rules/valuesets are loaded once (session fixture
`assessor`), and `extract_facts` is called directly.
"""

from __future__ import annotations

import copy
import datetime as dt
import json

import pytest

from fhir_aibl.facts import extract_facts, months_between, parse_date

from .conftest import AS_OF, shared

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
PAT = "Patient/p1"


# --------------------------------------------------------------------------- builders


def cc(system: str, code: str, text: str | None = None) -> dict:
    out: dict = {"coding": [{"system": system, "code": code}]}
    if text is not None:
        out["text"] = text
    return out


def patient(birth: str | None = "1956-03-10", gender: str = "female", **extra) -> dict:
    res = {"resourceType": "Patient", "id": "p1", "gender": gender, **extra}
    if birth is not None:
        res["birthDate"] = birth
    return res


def qty(value, unit: str | None = None) -> dict:
    q: dict = {"value": value}
    if unit is not None:
        q.update(unit=unit, system=UCUM, code=unit)
    return q


def obs(rid: str, code: str, value=None, unit: str | None = None, *, date: str = "2026-01-15", status: str = "final",
        system: str = LOINC, **extra) -> dict:
    res = {
        "resourceType": "Observation",
        "id": rid,
        "status": status,
        "code": cc(system, code),
        "subject": {"reference": PAT},
        "effectiveDateTime": date,
        **extra,
    }
    if value is not None:
        res["valueQuantity"] = qty(value, unit)
    return res


def tscore(rid: str, code: str, value: float = -1.2, unit: str | None = "{T-score}", **extra) -> dict:
    return obs(rid, code, value, unit, **extra)


def coded_obs(rid: str, code: str, answer: str, *, date: str = "2026-01-15", status: str = "final") -> dict:
    res = obs(rid, code, date=date, status=status)
    res["valueCodeableConcept"] = cc(SNOMED, answer)
    return res


def med_statement(rid: str, code: str, *, system: str = RXNORM, status: str = "active", start: str | None = "2025-01-01",
                  end: str | None = None, **extra) -> dict:
    res = {
        "resourceType": "MedicationStatement",
        "id": rid,
        "status": status,
        "medicationCodeableConcept": cc(system, code),
        "subject": {"reference": PAT},
        **extra,
    }
    period = {}
    if start:
        period["start"] = start
    if end:
        period["end"] = end
    if period:
        res["effectivePeriod"] = period
    return res


def med_request(rid: str, code: str, *, status: str = "active", intent: str = "order", authored: str = "2025-06-01",
                **extra) -> dict:
    return {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": status,
        "intent": intent,
        "medicationCodeableConcept": cc(RXNORM, code),
        "subject": {"reference": PAT},
        "authoredOn": authored,
        **extra,
    }


def condition(rid: str, system: str, code: str, *, text: str | None = None, onset: str | None = "2024-02-01",
              clinical: str | None = "active", verification: str | None = "confirmed", **extra) -> dict:
    res = {
        "resourceType": "Condition",
        "id": rid,
        "code": cc(system, code, text),
        "subject": {"reference": PAT},
        **extra,
    }
    if clinical:
        res["clinicalStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-clinical", clinical)
    if verification:
        res["verificationStatus"] = cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", verification)
    if onset:
        res["onsetDateTime"] = onset
    return res


def family(rid: str, relation: str, code: str = "5913000", *, status: str = "completed") -> dict:
    return {
        "resourceType": "FamilyMemberHistory",
        "id": rid,
        "status": status,
        "patient": {"reference": PAT},
        "relationship": cc(ROLE, relation),
        "condition": [{"code": cc(SNOMED, code)}],
    }


@pytest.fixture
def facts(assessor):
    """`facts(*resources, as_of=AS_OF)` -> FactSet, with the real value sets."""

    def run(*resources, as_of: dt.date = AS_OF):
        return extract_facts(PAT, list(resources), as_of, assessor.terminology)

    return run


def one(factset, fact_type: str) -> dict:
    found = factset.of_type(fact_type)
    assert len(found) == 1, f"expected one {fact_type} fact, got {found}"
    return found[0]


# --------------------------------------------------------------------------- the FHIR R4 example


def test_spec_example_observation_bmd_is_read_as_a_femur_bmd(facts):
    path = shared("fhir-r4-spec-examples/Observation-bmd.json")
    res = json.loads(path.read_text())
    when = parse_date(res.get("effectiveDateTime") or res.get("issued"))
    as_of = (when + dt.timedelta(days=30)) if when else AS_OF
    fs = facts(res, as_of=as_of)
    dxa = one(fs, "dxa")
    assert dxa["measure"] == "BMD"
    assert dxa["site"] == "FEMUR"  # bodySite "Left Femur" names neither the neck nor the total hip
    assert dxa["value"] == pytest.approx(0.887)  # unit `g/cm-2` read as g/cm2
    assert dxa["refs"] == ["Observation/bmd"]
    if when is None:
        # The example has no effective[x] nor issued: read, but its age is unknown, and that is reported.
        assert "age_months" not in dxa
        assert any("Observation/bmd" in p and "date" in p for p in fs.problems)
    else:
        assert dxa["age_months"] == pytest.approx(months_between(when, as_of))


def test_spec_example_observation_bmd_with_a_date(facts):
    res = json.loads(shared("fhir-r4-spec-examples/Observation-bmd.json").read_text())
    res = copy.deepcopy(res)
    res["effectiveDateTime"] = "2026-05-01"
    dxa = one(facts(res, as_of=dt.date(2026, 5, 20)), "dxa")
    assert (dxa["measure"], dxa["site"], dxa["value"]) == ("BMD", "FEMUR", pytest.approx(0.887))
    assert 0 < dxa["age_months"] < 1


@pytest.mark.parametrize("unit", ["g/cm-2", "g/cm²", "g/cm2"])
def test_bmd_unit_spellings_normalised(facts, unit):
    dxa = one(facts(obs("b", "24701-5", 0.887, unit)), "dxa")
    assert dxa["value"] == pytest.approx(0.887)


def test_bmd_in_mg_per_cm2_converted(facts):
    dxa = one(facts(obs("b", "24966-4", 887, "mg/cm2")), "dxa")
    assert dxa["value"] == pytest.approx(0.887)


# --------------------------------------------------------------------------- DXA sites and units


FEMORAL_NECK_SNOMED = {"coding": [{"system": SNOMED, "code": "29627003"}]}
LUMBAR_SPINE_SNOMED = {"coding": [{"system": SNOMED, "code": "122496007"}]}


@pytest.mark.parametrize(
    "code, body_site, site",
    [
        ("38267-1", None, "LS"),
        ("104938-6", None, "LS"),
        ("38264-8", None, "TH"),
        ("38263-0", FEMORAL_NECK_SNOMED, "FN"),
        ("38263-0", {"text": "Femoral neck"}, "FN"),
        ("38263-0", {"text": "Left total hip"}, "TH"),
        ("38263-0", None, "FEMUR"),
        ("38263-0", {"text": "something unrecognised"}, "FEMUR"),
        ("38265-5", None, "FA"),
        ("38265-5", LUMBAR_SPINE_SNOMED, "LS"),
        ("38265-5", {"text": "L1-L4"}, "LS"),
    ],
)
def test_dxa_site_mapping(facts, code, body_site, site):
    extra = {"bodySite": body_site} if body_site else {}
    dxa = one(facts(tscore("t", code, -1.7, **extra)), "dxa")
    assert (dxa["measure"], dxa["site"], dxa["value"]) == ("T", site, -1.7)


def test_display_text_is_never_read_as_the_site(facts):
    # Synthea writes every T-score as 38265-5 "DXA [T-score] Bone density"; a misleading display stays forearm.
    res = tscore("t", "38265-5", -2.1)
    res["code"]["coding"][0]["display"] = "DXA Lumbar spine [T-score]"
    res["code"]["text"] = "L1-L4 T-score"
    assert one(facts(res), "dxa")["site"] == "FA"


@pytest.mark.parametrize("unit", ["{T-score}", "1", None])
def test_tscore_units_accepted(facts, unit):
    dxa = one(facts(tscore("t", "38267-1", -2.3, unit)), "dxa")
    assert dxa["value"] == -2.3
    assert facts(tscore("t", "38267-1", -2.3, unit)).problems == []


def test_tscore_with_a_bmd_unit_is_a_problem_not_a_fact(facts):
    fs = facts(tscore("t", "38263-0", 0.734, "g/cm2"))
    assert fs.of_type("dxa") == []
    assert len(fs.problems) == 1 and "Observation/t" in fs.problems[0] and "g/cm2" in fs.problems[0]


def test_implausible_tscore_is_a_problem_not_a_fact(facts):
    fs = facts(tscore("t", "38267-1", -25))
    assert fs.of_type("dxa") == []
    assert len(fs.problems) == 1 and "implausible" in fs.problems[0] and "Observation/t" in fs.problems[0]


def test_dxa_without_a_value_is_a_problem(facts):
    fs = facts(tscore("t", "38267-1", None))
    assert fs.of_type("dxa") == []
    assert any("Observation/t" in p for p in fs.problems)


def test_valueinteger_and_valuedecimal_tscores(facts):
    a = obs("a", "38267-1", valueDecimal=-1.8)
    b = obs("b", "38264-8", valueInteger=-2)
    found = {(d["site"], d["value"]) for d in facts(a, b).of_type("dxa")}
    assert found == {("LS", -1.8), ("TH", -2.0)}


def test_dxa_components_of_a_panel_give_one_fact_each(facts):
    panel = {
        "resourceType": "Observation",
        "id": "panel",
        "status": "final",
        "code": {"text": "DXA report"},
        "subject": {"reference": PAT},
        "effectiveDateTime": "2026-01-15",
        "component": [
            {"code": cc(LOINC, "38267-1"), "valueQuantity": qty(-2.1, "{T-score}")},
            {"code": cc(LOINC, "38264-8"), "valueQuantity": qty(-1.4, "{T-score}")},
        ],
    }
    fs = facts(panel)
    found = sorted((d["site"], d["value"], tuple(d["refs"])) for d in fs.of_type("dxa"))
    assert found == [("LS", -2.1, ("Observation/panel",)), ("TH", -1.4, ("Observation/panel",))]
    assert fs.problems == []


def test_dxa_panel_code_with_components(facts):
    panel = {
        "resourceType": "Observation",
        "id": "panel",
        "status": "final",
        "code": cc(LOINC, "83311-1"),
        "subject": {"reference": PAT},
        "effectiveDateTime": "2026-01-15",
        "component": [
            {"code": cc(LOINC, "38267-1"), "valueQuantity": qty(-2.1, "{T-score}")},
            {"code": cc(LOINC, "38264-8"), "valueQuantity": qty(-1.4, "{T-score}")},
        ],
    }
    fs = facts(panel)
    assert sorted((d["site"], d["value"]) for d in fs.of_type("dxa")) == [("LS", -2.1), ("TH", -1.4)]
    # the panel code itself carries no measure and produces no fact
    assert all(d["measure"] in ("T", "Z", "BMD") for d in fs.of_type("dxa"))


def test_dxa_panel_code_reports_no_spurious_problem(facts):
    panel = {
        "resourceType": "Observation",
        "id": "panel",
        "status": "final",
        "code": cc(LOINC, "83311-1"),
        "subject": {"reference": PAT},
        "effectiveDateTime": "2026-01-15",
        "component": [{"code": cc(LOINC, "38267-1"), "valueQuantity": qty(-2.1, "{T-score}")}],
    }
    assert facts(panel).problems == []


# --------------------------------------------------------------------------- age of data


def test_months_between_calendar_months():
    assert months_between(dt.date(2024, 6, 1), dt.date(2026, 6, 1)) == 24.0
    assert months_between(dt.date(2024, 5, 31), dt.date(2026, 6, 1)) > 24.0
    assert months_between(dt.date(2026, 6, 1), dt.date(2026, 6, 1)) == 0.0
    assert months_between(dt.date(2026, 6, 1), dt.date(2024, 6, 1)) == -24.0


def test_dxa_age_months_at_the_24_month_boundary(facts):
    exactly = one(facts(tscore("a", "38267-1", date="2024-06-01")), "dxa")
    assert exactly["age_months"] == 24.0
    older = one(facts(tscore("b", "38267-1", date="2024-05-31")), "dxa")
    assert older["age_months"] > 24.0
    assert older["age_months"] == months_between(dt.date(2024, 5, 31), AS_OF)


def test_partial_dates_and_instants(facts):
    assert parse_date("2024-06") == dt.date(2024, 6, 1)
    assert parse_date("2024") == dt.date(2024, 1, 1)
    assert parse_date("2024-06-01T23:30:00+02:00") == dt.date(2024, 6, 1)
    assert parse_date("not a date") is None and parse_date(None) is None
    res = obs("t", "38267-1", -1.0, "{T-score}")
    del res["effectiveDateTime"]
    res["effectivePeriod"] = {"start": "2025-01-01", "end": "2025-06-01"}
    assert one(facts(res), "dxa")["age_months"] == 12.0


# --------------------------------------------------------------------------- D1 data hygiene


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_observation_excluded_status(facts, status):
    fs = facts(tscore("t", "38267-1", -2.8, status=status))
    assert fs.of_type("dxa") == []
    ex = one(fs, "excluded")
    assert ex["resource"] == "Observation" and status in ex["reason"]
    assert ex["refs"] == ["Observation/t"]


def test_preliminary_observation_is_kept(facts):
    assert one(facts(tscore("t", "38267-1", -2.8, status="preliminary")), "dxa")["value"] == -2.8


def test_condition_refuted_is_excluded(facts):
    fs = facts(condition("c", SNOMED, "69896004", verification="refuted"))
    assert fs.of_type("condition") == []
    ex = one(fs, "excluded")
    assert ex["resource"] == "Condition" and "refuted" in ex["reason"]


def test_condition_entered_in_error_is_excluded(facts):
    fs = facts(condition("c", ICD10CM, "M80.08XA", verification="entered-in-error"))
    assert fs.of_type("fracture") == []
    assert "entered-in-error" in one(fs, "excluded")["reason"]


@pytest.mark.parametrize("status", ["entered-in-error", "not-taken"])
def test_medication_statement_ignored_status(facts, status):
    fs = facts(med_statement("m", "199224", status=status))
    assert fs.of_type("ai_med") == []
    ex = one(fs, "excluded")
    assert ex["resource"] == "MedicationStatement" and status in ex["reason"]


def test_unrecognised_entered_in_error_observation_gives_nothing(facts):
    heart_rate = obs("hr", "8867-4", 72, "/min", status="entered-in-error")
    fs = facts(heart_rate)
    assert fs.facts == [] and fs.problems == []


def test_unrecognised_codes_give_nothing(facts):
    fs = facts(
        obs("hr", "8867-4", 72, "/min"),
        condition("c", SNOMED, "38341003"),  # hypertension
        med_statement("m", "197361"),  # amlodipine
    )
    assert fs.facts == [] and fs.problems == []


# --------------------------------------------------------------------------- as_of


def test_data_after_as_of_is_not_used(facts):
    late = dt.date(2026, 6, 2).isoformat()
    fs = facts(
        tscore("t", "38267-1", -3.0, date=late),
        obs("bmi", "39156-5", 18.0, "kg/m2", date=late),
        coded_obs("s", "72166-2", "449868002", date=late),
        condition("fx", ICD10CM, "M80.08XA", onset=late),
    )
    assert fs.facts == []


def test_data_on_as_of_is_used(facts):
    dxa = one(facts(tscore("t", "38267-1", -3.0, date=AS_OF.isoformat())), "dxa")
    assert dxa["age_months"] == 0.0


# --------------------------------------------------------------------------- medications


def test_ai_statement_scd(facts):
    ai = one(facts(med_statement("m", "199224")), "ai_med")
    assert (ai["ingredient"], ai["status"], ai["ended"], ai["future_start"]) == ("anastrozole", "active", False, False)
    assert ai["refs"] == ["MedicationStatement/m"]


@pytest.mark.parametrize(
    "status, intent, expected",
    [
        ("active", "order", "active"),
        ("active", "proposal", "intended"),
        ("active", "plan", "intended"),
        ("draft", "order", "intended"),
        ("completed", "order", "completed"),
        ("stopped", "order", "stopped"),
        ("on-hold", "order", "on-hold"),
    ],
)
def test_ai_request_status_and_intent(facts, status, intent, expected):
    ai = one(facts(med_request("r", "199224", status=status, intent=intent)), "ai_med")
    assert ai["status"] == expected


def test_ai_request_cancelled_is_excluded(facts):
    fs = facts(med_request("r", "199224", status="cancelled"))
    assert fs.of_type("ai_med") == []
    assert "cancelled" in one(fs, "excluded")["reason"]


def test_ai_statement_period_end_before_as_of_is_ended(facts):
    ai = one(facts(med_statement("m", "199224", start="2021-01-01", end="2026-01-01")), "ai_med")
    assert ai["ended"] is True and ai["future_start"] is False


def test_ai_statement_start_after_as_of_is_future(facts):
    ai = one(facts(med_statement("m", "199224", start="2026-07-01")), "ai_med")
    assert ai["future_start"] is True and ai["ended"] is False


def test_ai_request_dosage_bounds(facts):
    bounds = {"timing": {"repeat": {"boundsPeriod": {"start": "2021-01-01", "end": "2026-01-01"}}}}
    ai = one(facts(med_request("r", "199224", dosageInstruction=[bounds])), "ai_med")
    assert ai["ended"] is True
    # a dispense validity period is not the end of therapy
    validity = {"validityPeriod": {"start": "2025-01-01", "end": "2025-02-01"}}
    ai = one(facts(med_request("r", "199224", dispenseRequest=validity)), "ai_med")
    assert ai["ended"] is False


@pytest.mark.parametrize(
    "system, code, ingredient",
    [
        (ATC, "L02BG04", "letrozole"),
        (ATC, "L02BG03", "anastrozole"),
        (RXNORM, "84857", "anastrozole"),
        (RXNORM, "310261", "exemestane"),
        (RXNORM, "262485", "anastrozole"),
    ],
)
def test_ai_codes(facts, system, code, ingredient):
    assert one(facts(med_statement("m", code, system=system)), "ai_med")["ingredient"] == ingredient


def test_tamoxifen_is_not_an_aromatase_inhibitor(facts):
    fs = facts(med_statement("m", "10324"), med_statement("m2", "L02BA01", system=ATC))
    assert fs.of_type("ai_med") == [] and fs.facts == []


def test_alendronate_request_is_an_oral_bisphosphonate(facts):
    ar = one(facts(med_request("r", "904419")), "antiresorptive")
    assert (ar["ingredient"], ar["class"], ar["route"], ar["status"]) == ("alendronate", "bisphosphonate", "oral", "active")
    assert ar["refs"] == ["MedicationRequest/r"]


def test_denosumab_statement(facts):
    ar = one(facts(med_statement("m", "993449")), "antiresorptive")
    assert (ar["ingredient"], ar["class"], ar["route"]) == ("denosumab", "denosumab", "sc")


def test_zoledronic_acid_administration(facts):
    admin = {
        "resourceType": "MedicationAdministration",
        "id": "a1",
        "status": "completed",
        "medicationCodeableConcept": cc(RXNORM, "77655"),
        "subject": {"reference": PAT},
        "effectiveDateTime": "2025-12-01",
    }
    ar = one(facts(admin), "antiresorptive")
    assert (ar["class"], ar["route"], ar["status"]) == ("bisphosphonate", "iv", "administered")
    assert ar["months_since"] == 6.0


def test_contained_medication_by_reference(facts):
    res = {
        "resourceType": "MedicationStatement",
        "id": "m",
        "status": "active",
        "contained": [{"resourceType": "Medication", "id": "med1", "code": cc(RXNORM, "199224")}],
        "medicationReference": {"reference": "#med1"},
        "subject": {"reference": PAT},
        "effectivePeriod": {"start": "2025-01-01"},
    }
    ai = one(facts(res), "ai_med")
    assert ai["ingredient"] == "anastrozole" and ai["status"] == "active"


def test_contained_medication_with_coded_ingredient_only(facts):
    res = {
        "resourceType": "MedicationRequest",
        "id": "r",
        "status": "active",
        "intent": "order",
        "contained": [
            {
                "resourceType": "Medication",
                "id": "med1",
                "code": {"text": "house formulary tablet"},
                "ingredient": [{"itemCodeableConcept": cc(RXNORM, "72965")}],
            }
        ],
        "medicationReference": {"reference": "#med1"},
        "subject": {"reference": PAT},
    }
    assert one(facts(res), "ai_med")["ingredient"] == "letrozole"


# --------------------------------------------------------------------------- glucocorticoids


def test_prednisone_eight_months(facts):
    gc = one(facts(med_statement("g", "8640", status="completed", start="2025-01-01", end="2025-09-01")), "glucocorticoid")
    assert gc["months"] == pytest.approx(8.0, abs=0.1)
    assert gc["months"] > 6
    assert gc["refs"] == ["MedicationStatement/g"]


def test_active_prednisone_counts_up_to_as_of(facts):
    gc = one(facts(med_statement("g", "8640", start="2025-10-01")), "glucocorticoid")
    assert gc["months"] == pytest.approx(8.0, abs=0.1)


def test_overlapping_glucocorticoid_statements_are_merged(facts):
    a = med_statement("g1", "8640", status="completed", start="2025-01-01", end="2025-07-01")
    b = med_statement("g2", "8640", status="completed", start="2025-04-01", end="2025-09-01")
    gc = one(facts(a, b), "glucocorticoid")
    assert gc["months"] == pytest.approx(8.0, abs=0.1)  # not 6 + 5 = 11
    assert gc["refs"] == ["MedicationStatement/g1", "MedicationStatement/g2"]


def test_separate_glucocorticoid_courses_add_up(facts):
    a = med_statement("g1", "8640", status="completed", start="2024-01-01", end="2024-04-01")
    b = med_statement("g2", "8638", status="completed", start="2025-01-01", end="2025-04-01")
    assert one(facts(a, b), "glucocorticoid")["months"] == pytest.approx(6.0, abs=0.1)


def test_intravenous_dexamethasone_is_not_counted(facts):
    iv = {"route": cc(SNOMED, "47625008")}
    fs = facts(med_statement("d", "3264", status="completed", start="2025-01-01", end="2025-12-01", dosage=[iv]))
    assert fs.of_type("glucocorticoid") == []


def test_oral_route_dexamethasone_is_counted(facts):
    oral = {"route": cc(SNOMED, "26643006")}
    fs = facts(med_statement("d", "3264", status="completed", start="2025-01-01", end="2025-09-01", dosage=[oral]))
    assert one(fs, "glucocorticoid")["months"] == pytest.approx(8.0, abs=0.1)


def test_future_glucocorticoid_not_counted(facts):
    assert facts(med_statement("g", "8640", start="2026-07-01")).of_type("glucocorticoid") == []


# --------------------------------------------------------------------------- smoking


def test_latest_smoking_observation_wins(facts):
    older = coded_obs("s1", "72166-2", "449868002", date="2024-01-01")
    newer = coded_obs("s2", "72166-2", "266919005", date="2025-01-01")
    for order in ((older, newer), (newer, older)):
        sm = one(facts(*order), "smoking")
        assert (sm["status"], sm["source"], sm["refs"]) == ("never", "observation", ["Observation/s2"])


def test_former_smoker_observation(facts):
    assert one(facts(coded_obs("s", "72166-2", "8517006")), "smoking")["status"] == "former"


def test_unrecognised_smoking_answer_is_a_problem(facts):
    fs = facts(coded_obs("s", "72166-2", "123456"))
    assert fs.of_type("smoking") == []
    assert any("Observation/s" in p for p in fs.problems)


def test_smoking_condition(facts):
    sm = one(facts(condition("c", SNOMED, "449868002")), "smoking")
    assert (sm["status"], sm["source"]) == ("current", "condition")


def test_resolved_current_smoker_condition_is_not_current(facts):
    fs = facts(condition("c", SNOMED, "449868002", clinical="resolved"))
    assert fs.of_type("smoking") == []


# --------------------------------------------------------------------------- BMI and labs


def test_bmi_latest_value(facts):
    fs = facts(
        obs("b1", "39156-5", 19.1, "kg/m2", date="2025-01-01"),
        obs("b2", "39156-5", 22.4, "kg/m2", date="2026-03-01"),
        obs("b3", "39156-5", 17.0, "kg/m2", date="2024-01-01"),
    )
    bmi = one(fs, "bmi")
    assert bmi["value"] == 22.4 and bmi["refs"] == ["Observation/b2"]
    assert bmi["age_months"] == 3.0


@pytest.mark.parametrize(
    "code, value, unit, concept, expected",
    [
        ("62292-8", 80, "nmol/L", "vitamin-d-25oh", 80 / 2.496),
        ("62292-8", 32, "ng/mL", "vitamin-d-25oh", 32.0),
        ("1989-3", 50, "nmol/l", "vitamin-d3-25oh", 50 / 2.496),
        ("2000-8", 2.35, "mmol/L", "calcium", 2.35 / 0.2495),
        ("17861-6", 9.4, "mg/dL", "calcium", 9.4),
        ("14682-9", 70.72, "umol/L", "creatinine", 0.8),
        ("14682-9", 70.72, "µmol/L", "creatinine", 0.8),
        ("2160-0", 0.8, "mg/dL", "creatinine", 0.8),
    ],
)
def test_labs_converted_to_canonical_units(facts, code, value, unit, concept, expected):
    lab = one(facts(obs("l", code, value, unit)), "lab")
    assert lab["concept"] == concept
    assert lab["value"] == pytest.approx(expected, abs=1e-3)


def test_lab_vitamin_d_value(facts):
    assert one(facts(obs("l", "62292-8", 80, "nmol/L")), "lab")["value"] == pytest.approx(32.05, abs=0.01)


def test_lab_with_unknown_unit_is_a_problem(facts):
    fs = facts(obs("l", "62292-8", 80, "mg/L"))
    assert fs.of_type("lab") == []
    assert any("Observation/l" in p and "mg/L" in p for p in fs.problems)


def test_latest_lab_per_concept(facts):
    fs = facts(
        obs("ca1", "17861-6", 8.0, "mg/dL", date="2025-01-01"),
        obs("ca2", "2000-8", 2.35, "mmol/L", date="2026-01-01"),
        obs("cr", "2160-0", 1.1, "mg/dL", date="2024-01-01"),
    )
    labs = {f["concept"]: f for f in fs.of_type("lab")}
    assert set(labs) == {"calcium", "creatinine"}
    assert labs["calcium"]["refs"] == ["Observation/ca2"]


# --------------------------------------------------------------------------- fractures


def test_m80_08_is_a_vertebral_fragility_fracture(facts):
    fx = one(facts(patient(), condition("fx", ICD10CM, "M80.08XA", onset="2020-05-01")), "fracture")
    assert (fx["site"], fx["fragility"], fx["possible_fragility_code"]) == ("vertebral", True, False)
    assert fx["age_at"] == 64


def test_undotted_icd10_code(facts):
    fx = one(facts(condition("fx", ICD10CM, "M8008XA")), "fracture")
    assert fx["site"] == "vertebral" and fx["fragility"] is True


def test_s72_without_text_is_possible_fragility(facts):
    fx = one(facts(patient(), condition("fx", ICD10CM, "S72.001A", onset="2023-02-01")), "fracture")
    assert (fx["site"], fx["fragility"], fx["marker"], fx["possible_fragility_code"]) == ("hip", False, False, True)
    assert fx["age_at"] == 66


def test_s72_with_low_trauma_text_has_the_marker(facts):
    res = condition("fx", ICD10CM, "S72.001A", text="Hip fracture after fall from standing height")
    fx = one(facts(res), "fracture")
    assert fx["fragility"] is False and fx["marker"] is True


def test_fracture_marker_from_note(facts):
    res = condition("fx", ICD10CM, "S52.501A", note=[{"text": "Low-trauma fall at home"}])
    fx = one(facts(res), "fracture")
    assert fx["site"] == "wrist" and fx["marker"] is True


def test_resolved_fracture_still_counts(facts):
    fx = one(facts(condition("fx", ICD10CM, "M80.08XA", clinical="resolved")), "fracture")
    assert fx["fragility"] is True


def test_fracture_without_birth_date_has_no_age(facts):
    fx = one(facts(condition("fx", ICD10CM, "M80.08XA")), "fracture")
    assert "age_at" not in fx


def test_fracture_onset_age(facts):
    res = condition("fx", ICD10CM, "S72.001A", onset=None, onsetAge={"value": 58, "unit": "a"})
    assert one(facts(res), "fracture")["age_at"] == 58


def test_ra_condition_active_and_inactive(facts):
    fs = facts(condition("ra1", SNOMED, "69896004"), condition("ra2", ICD10CM, "M06.9", clinical="inactive"))
    found = {(f["refs"][0], f["concept"], f["active"]) for f in fs.of_type("condition")}
    assert found == {("Condition/ra1", "rheumatoid-arthritis", True), ("Condition/ra2", "rheumatoid-arthritis", False)}


# --------------------------------------------------------------------------- family history


def test_mother_hip_fracture(facts):
    fh = one(facts(family("f", "MTH")), "family_history")
    assert (fh["parent"], fh["concept"], fh["refs"]) == (True, "hip-fracture", ["FamilyMemberHistory/f"])


def test_sister_hip_fracture_is_not_parental(facts):
    fh = one(facts(family("f", "SIS")), "family_history")
    assert fh["parent"] is False and fh["concept"] == "hip-fracture"


def test_family_history_entered_in_error_is_excluded(facts):
    fs = facts(family("f", "MTH", status="entered-in-error"))
    assert fs.of_type("family_history") == []
    ex = one(fs, "excluded")
    assert ex["resource"] == "FamilyMemberHistory" and "entered-in-error" in ex["reason"]


def test_family_hip_fracture_finding_as_observation(facts):
    res = obs("fh", "445501000124107", system=SNOMED)
    assert one(facts(res), "condition")["concept"] == "family-hip-fracture"


# --------------------------------------------------------------------------- BMD change


def bmd(rid: str, value: float, date: str, device: str | None = "Device/dxa1", code: str = "24966-4") -> dict:
    extra = {"device": {"reference": device}} if device else {}
    return obs(rid, code, value, "g/cm2", date=date, **extra)


def test_bmd_change_same_device(facts):
    fs = facts(bmd("b1", 1.000, "2025-01-01"), bmd("b2", 0.940, "2026-01-01"))
    ch = one(fs, "bmd_change")
    assert ch["site"] == "LS" and ch["days"] == 365
    assert ch["pct_per_year"] == pytest.approx(-6.0, abs=0.05)
    assert ch["abs_change"] == pytest.approx(-0.06)
    assert ch["refs"] == ["Observation/b1", "Observation/b2"]
    assert ch["latest_age_months"] == 5.0


def test_bmd_change_needs_the_same_device(facts):
    fs = facts(bmd("b1", 1.000, "2025-01-01", "Device/a"), bmd("b2", 0.940, "2026-01-01", "Device/b"))
    assert fs.of_type("bmd_change") == []
    assert len(fs.of_type("dxa")) == 2


def test_bmd_change_needs_the_same_site(facts):
    fs = facts(bmd("b1", 1.000, "2025-01-01"), bmd("b2", 0.940, "2026-01-01", code="38261-4"))
    assert fs.of_type("bmd_change") == []


def test_bmd_change_not_for_femur_or_forearm(facts):
    fs = facts(bmd("b1", 1.0, "2025-01-01", code="24890-6"), bmd("b2", 0.9, "2026-01-01", code="24890-6"))
    assert fs.of_type("bmd_change") == []


# --------------------------------------------------------------------------- refs and the patient


def test_every_fact_has_refs(facts):
    resources = [
        patient(),
        tscore("t", "38267-1", -1.6),
        bmd("b1", 1.0, "2025-01-01"),
        bmd("b2", 0.95, "2026-01-01"),
        obs("bmi", "39156-5", 21.0, "kg/m2"),
        obs("vd", "62292-8", 25, "ng/mL"),
        coded_obs("s", "72166-2", "8517006"),
        med_statement("ai", "199224"),
        med_request("bp", "904419"),
        med_statement("g", "8640", status="completed", start="2025-01-01", end="2025-09-01"),
        condition("fx", ICD10CM, "M80.08XA"),
        family("f", "FTH"),
        tscore("bad", "38264-8", -1.0, status="entered-in-error"),
    ]
    fs = facts(*resources)
    types = {f["t"] for f in fs.facts}
    assert types >= {"patient", "dxa", "bmd_change", "bmi", "lab", "smoking", "ai_med", "antiresorptive",
                     "glucocorticoid", "fracture", "family_history", "excluded"}
    for fact in fs.facts:
        assert fact["refs"], fact
        assert all(isinstance(r, str) and "/" in r for r in fact["refs"])


def test_versioned_resource_ref(facts):
    res = tscore("t", "38267-1", -1.6, meta={"versionId": "3"})
    assert one(facts(res), "dxa")["refs"] == ["Observation/t/_history/3"]
    ai = med_statement("ai", "199224", meta={"versionId": "7", "lastUpdated": "2026-01-01T00:00:00Z"})
    assert one(facts(ai), "ai_med")["refs"] == ["MedicationStatement/ai/_history/7"]


def test_patient_fact(facts):
    p = one(facts(patient("1956-03-10", "female")), "patient")
    assert (p["age"], p["sex"], p["refs"]) == (70, "female", ["Patient/p1"])
    assert one(facts(patient("1956-06-02", "male")), "patient")["age"] == 69
    assert one(facts(patient("1956-06-01", "male")), "patient")["age"] == 70


def test_patient_without_birth_date(facts):
    fs = facts(patient(None, "unknown"))
    p = one(fs, "patient")
    assert "age" not in p and p["sex"] == "unknown"
    assert len(fs.problems) == 1 and "Patient/p1" in fs.problems[0] and "birthDate" in fs.problems[0]


def test_extract_is_deterministic_and_pure(facts):
    resources = [patient(), tscore("t", "38267-1", -1.6), med_statement("ai", "199224"), family("f", "MTH")]
    before = copy.deepcopy(resources)
    first = facts(*resources)
    second = facts(*reversed(resources))
    assert resources == before
    key = lambda f: json.dumps(f, sort_keys=True)  # noqa: E731
    assert sorted(map(key, first.facts)) == sorted(map(key, second.facts))
    assert first.patient == PAT and first.as_of == AS_OF


# --------------------------------------------------------------------------- a DXA code that names no site

def test_site_less_bmd_code_takes_its_site_from_body_site(facts):
    res = obs("x", "46383-6", 0.9, "g/cm2", bodySite=LUMBAR_SPINE_SNOMED)
    assert one(facts(res), "dxa")["site"] == "LS"


def test_site_less_bmd_code_without_body_site_gives_no_site_none_fact(facts):
    fs = facts(obs("x", "46383-6", 0.9, "g/cm2"))
    assert all(d["site"] is not None for d in fs.of_type("dxa"))


def test_bmi_from_weight_and_height_when_no_bmi_is_recorded(facts):
    weight = obs("w", "29463-7", 50.0, "kg")
    height = obs("h", "8302-2", 165.0, "cm")
    [bmi] = facts(weight, height).of_type("bmi")
    assert bmi["value"] == pytest.approx(18.37, abs=0.01)
    assert bmi["refs"] == ["Observation/h", "Observation/w"]
    # a recorded BMI wins
    assert [b["value"] for b in facts(weight, height, obs("b", "39156-5", 26.0, "kg/m2")).of_type("bmi")] == [26.0]


@pytest.mark.parametrize(
    "extra",
    [
        {"extension": [{"url": "http://example.org/fhir/StructureDefinition/fragility-fracture", "valueBoolean": True}]},
        {"category": [{"coding": [{"system": "http://example.org", "code": "ff", "display": "Fragility fracture"}]}]},
        {"evidence": [{"code": [{"coding": [{"system": "http://example.org", "code": "lt", "display": "Low-trauma injury"}]}]}]},
        {"note": [{"text": "Fell from standing height"}]},
    ],
)
def test_a_fracture_mechanism_is_read_wherever_the_record_says_it(facts, extra):
    cond = {
        "resourceType": "Condition", "id": "fx", "subject": {"reference": PAT},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "S72.001A"}]},
        "verificationStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]},
        **extra,
    }
    [fx] = facts(cond).of_type("fracture")
    assert fx["marker"] is True


def test_a_fracture_without_mechanism_has_no_marker(facts):
    cond = {
        "resourceType": "Condition", "id": "fx", "subject": {"reference": PAT},
        "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "S72.001A", "display": "Fracture of neck of right femur"}]},
        "extension": [{"url": "http://example.org/fhir/StructureDefinition/laterality", "valueString": "right"}],
    }
    [fx] = facts(cond).of_type("fracture")
    assert fx["marker"] is False


# --------------------------------------------------------------------------- calendar arithmetic


def test_months_and_ages_agree_with_relativedelta():
    """months_between / age_in_years do relativedelta's arithmetic directly; they must agree with it."""
    import random

    from dateutil.relativedelta import relativedelta

    from fhir_aibl.facts import age_in_years

    def reference_months(earlier, later):
        sign = 1
        if later < earlier:
            earlier, later, sign = later, earlier, -1
        rd = relativedelta(later, earlier)
        return sign * round(rd.years * 12 + rd.months + rd.days / 31.0, 3)

    ends = [dt.date(y, m, d) for y in (1900, 2000, 2023, 2024) for m in (1, 2, 3, 12) for d in (1, 28, 29, 30, 31)
            if d <= 28 or m != 2 or (d == 29 and y % 4 == 0 and y != 1900)]
    rng = random.Random(7)
    pairs = [(a, b) for a in ends for b in ends]
    base = dt.date(1920, 1, 1)
    for _ in range(20_000):
        a = base + dt.timedelta(days=rng.randrange(40_000))
        pairs.append((a, a + dt.timedelta(days=rng.randrange(-2_000, 2_000))))
    for a, b in pairs:
        assert months_between(a, b) == reference_months(a, b), (a, b)
        assert age_in_years(a, b) == relativedelta(b, a).years, (a, b)
