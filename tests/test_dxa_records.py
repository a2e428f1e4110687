"""A DXA as real records carry it, and the risk tools (issue 11 items 4 and 5).

The shapes are those of the CMS eCQM test bundles (CMS249 / CMS645, QI-Core) and the FHIR R4
DXA example, rebuilt here (no file of another repository is copied): a Procedure "bone density
scan" done without a result, a DiagnosticReport with results or only a conclusion, a DXA
Observation without a value, a ServiceRequest ordered and not resulted, not to be done, or
refused; and recorded FRAX, OST, ORAI and OSIRIS results. Each is read from a file, through
the connector (a `responses` FHIR server) and through the CDS prefetch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from fhir_aibl import cli
from fhir_aibl.clinician_text import PatientValues
from fhir_aibl.careplan import build_resources, load_catalogue
from fhir_aibl.cds.prefetch import default_templates
from fhir_aibl.facts import extract_facts, reads_resource
from fhir_aibl.fhir import PROFILES, FhirClient, Puller
from fhir_aibl.validation import needs_validation

from .conftest import AS_OF, ROOT
from .fhir.fakes import BASE, FakeFhir, mock

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
QICORE = "http://hl7.org/fhir/us/qicore/StructureDefinition"
PID = "dxa1"


# --------------------------------------------------------------------------- record builders


def patient(pid: str = PID, birth: str = "1966-04-02") -> dict:
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": birth}


def anastrozole(pid: str = PID) -> dict:
    # CMS-style: an active order of anastrozole 1 MG Oral Tablet (RxNorm SCD 199224)
    return {
        "resourceType": "MedicationRequest",
        "id": f"{pid}-ai",
        "meta": {"profile": [f"{QICORE}/qicore-medicationrequest"]},
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": "199224", "display": "anastrozole 1 MG Oral Tablet"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": "2026-02-01",
    }


def procedure(rid: str, status: str = "completed", when: str | None = "2026-03-10", pid: str = PID, **extra) -> dict:
    res = {
        "resourceType": "Procedure",
        "id": rid,
        "meta": {"profile": [f"{QICORE}/qicore-procedure"]},
        "status": status,
        "code": {"coding": [{"system": SNOMED, "code": "312681000", "display": "Bone density scan (procedure)"}]},
        "subject": {"reference": f"Patient/{pid}"},
        **extra,
    }
    if when:
        res["performedDateTime"] = when
    return res


def service_request(rid: str, status: str = "active", authored: str = "2026-04-15", pid: str = PID, **extra) -> dict:
    return {
        "resourceType": "ServiceRequest",
        "id": rid,
        "meta": {"profile": [f"{QICORE}/qicore-servicerequest"]},
        "status": status,
        "intent": "order",
        # the CMS249 test records order a DXA with LOINC 24701-5
        "code": {"coding": [{"system": LOINC, "code": "24701-5", "display": "Femur DXA Bone density"}]},
        "subject": {"reference": f"Patient/{pid}"},
        "authoredOn": authored,
        **extra,
    }


def dxa_report(rid: str, results: list[str] = (), when: str = "2026-02-20", pid: str = PID) -> dict:
    # the FHIR R4 DXA example's shape: LOINC 38269-7, a conclusion code, results by reference
    res = {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "38269-7"}], "text": "DXA BONE DENSITOMETRY"},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        "issued": f"{when}T09:23:00+10:00",
        "conclusion": "Osteopenia of the femoral neck.",
        "conclusionCode": [{"coding": [{"system": SNOMED, "code": "391040000", "display": "At risk of osteoporotic fracture"}]}],
    }
    if results:
        res["result"] = [{"reference": f"Observation/{r}"} for r in results]
    return res


def observation(rid: str, code: str, when: str = "2026-02-20", pid: str = PID, **value) -> dict:
    return {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": when,
        **value,
    }


def t_score(rid: str, code: str, value: float, when: str = "2026-02-20") -> dict:
    return observation(rid, code, when, valueQuantity={"value": value, "unit": "{T-score}", "system": "http://unitsofmeasure.org", "code": "{T-score}"})


def percent(value: float) -> dict:
    return {"valueQuantity": {"value": value, "unit": "%", "system": "http://unitsofmeasure.org", "code": "%"}}


def bundle(*resources: dict) -> dict:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


# --------------------------------------------------------------------------- helpers


def assess(assessor, *extra: dict, pid: str = PID):
    return assessor.assess(f"Patient/{pid}", [patient(pid), anastrozole(pid), *extra], AS_OF)


def flag(a, code):
    found = [f for f in a.findings if f.kind == "flag" and f.code == code]
    assert len(found) == 1, (code, a.flags)
    return found[0]


# --------------------------------------------------------------------------- a DXA without a usable result


@pytest.mark.parametrize(
    "record, date",
    [
        (procedure("pr1"), "2026-03-10"),  # CMS: Procedure "bone density scan" done, no result
        (dxa_report("dr1", results=["not-in-the-record"]), "2026-02-20"),  # results not sent
        (dxa_report("dr2"), "2026-02-20"),  # only a conclusion
        (observation("o1", "38267-1", dataAbsentReason={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "unknown"}]}), "2026-02-20"),
        (observation("o2", "38268-9"), "2026-02-20"),  # the study code, no value, no components
        (service_request("sr-done", status="completed"), "2026-04-15"),  # an order marked done
    ],
    ids=["procedure-done", "report-results-missing", "report-conclusion-only", "observation-data-absent", "observation-study-code", "order-completed"],
)
def test_a_dxa_done_without_a_result_asks_for_the_report_not_a_new_scan(assessor, record, date):
    a = assess(assessor, record).assessment
    assert a.category == "indeterminate"  # never counted as a valid DXA
    assert "dxa-obtain-result" in a.recommendations and "dxa-now" not in a.recommendations
    f = flag(a, "dxa-result-unavailable")
    assert f.date == dt.date.fromisoformat(date)
    assert f"Result of the DXA on {date} not available: obtain the report" in f.detail
    assert f"{record['resourceType']}/{record['id']}" in f.evidence


def test_a_report_whose_results_are_on_record_decides_the_category(assessor):
    report = dxa_report("dr3", results=["ls", "th"])
    a = assess(assessor, report, t_score("ls", "38267-1", -0.8), t_score("th", "38264-8", -0.6)).assessment
    assert a.category == "low" and "dxa-24m" in a.recommendations
    assert not {"dxa-result-unavailable", "dxa-ordered", "dxa-declined"} & set(a.flags)
    assert "dxa-obtain-result" not in a.recommendations


def test_a_valid_t_score_beside_a_procedure_without_a_result_needs_nothing_more(assessor):
    a = assess(assessor, procedure("pr2", when="2026-05-01"), t_score("ls", "38267-1", -2.3)).assessment
    assert a.category == "high" and "dxa-result-unavailable" not in a.flags
    assert "dxa-obtain-result" not in a.recommendations


def test_an_order_not_resulted_is_followed_up(assessor):
    a = assess(assessor, service_request("sr1")).assessment
    assert "dxa-obtain-result" in a.recommendations and "dxa-now" not in a.recommendations
    f = flag(a, "dxa-ordered")
    assert f.date == dt.date(2026, 4, 15) and "ordered on 2026-04-15" in f.detail


def test_an_old_open_order_no_longer_stands_in_for_a_new_one(assessor):
    a = assess(assessor, service_request("sr-old", authored="2025-06-01")).assessment
    assert "dxa-now" in a.recommendations and "dxa-obtain-result" not in a.recommendations
    assert "dxa-ordered" not in a.flags


@pytest.mark.parametrize(
    "record, date",
    [
        (service_request("sr-dnp", doNotPerform=True, authored="2026-03-01"), "2026-03-01"),  # do-not-perform
        (
            procedure(
                "pr-refused",
                status="not-done",
                when=None,
                statusReason={"coding": [{"system": SNOMED, "code": "183944003", "display": "Procedure refused"}]},
                extension=[{"url": f"{QICORE}/qicore-recorded", "valueDateTime": "2026-03-05"}],
            ),
            "2026-03-05",
        ),
    ],
    ids=["order-do-not-perform", "procedure-refused"],
)
def test_a_declined_dxa_never_silences_order_a_dxa_now(assessor, record, date):
    a = assess(assessor, record).assessment
    assert "dxa-now" in a.recommendations and "dxa-obtain-result" not in a.recommendations
    f = flag(a, "dxa-declined")
    assert f.date == dt.date.fromisoformat(date)
    assert f"not done on {date}" in f.detail and "still recommended" in f.detail


def test_a_declined_dxa_keeps_dxa_now_also_in_a_high_category(assessor):
    fracture = {
        "resourceType": "Condition",
        "id": "fx",
        "code": {"coding": [{"system": SNOMED, "code": "443165006"}]},
        "subject": {"reference": f"Patient/{PID}"},
        "verificationStatus": {"coding": [{"code": "confirmed"}]},
    }
    a = assess(assessor, fracture, service_request("sr-dnp", doNotPerform=True)).assessment
    assert a.category == "high" and "dxa-now" in a.recommendations and "dxa-declined" in a.flags
    b = assess(assessor, fracture, procedure("pr3")).assessment
    assert b.category == "high" and "dxa-obtain-result" in b.recommendations and "dxa-now" not in b.recommendations


@pytest.mark.parametrize(
    "record, why",
    [
        (service_request("sr-eie", status="entered-in-error"), "status entered-in-error"),
        (service_request("sr-revoked", status="revoked"), "status revoked"),
        (service_request("sr-plan", intent="plan"), "intent plan"),
        (procedure("pr-eie", status="entered-in-error"), "status entered-in-error"),
        ({**dxa_report("dr-x"), "status": "cancelled"}, "status cancelled"),
    ],
    ids=["order-entered-in-error", "order-revoked", "order-only-a-plan", "procedure-entered-in-error", "report-cancelled"],
)
def test_a_record_that_is_no_evidence_is_audited_and_changes_nothing(assessor, record, why):
    a = assess(assessor, record).assessment
    assert "dxa-now" in a.recommendations and "dxa-obtain-result" not in a.recommendations
    assert not {"dxa-result-unavailable", "dxa-ordered", "dxa-declined"} & set(a.flags)
    audits = [f for f in a.findings if f.kind == "audit"]
    assert any(why in (f.detail or "") for f in audits)


@pytest.mark.parametrize(
    "record",
    [procedure("pr-old", when="2023-12-01"), procedure("pr-future", when="2026-07-01"), procedure("pr-undated", when=None)],
    ids=["older-than-24-months", "after-the-reference-date", "undated"],
)
def test_a_dxa_record_not_shown_to_be_recent_leaves_dxa_now(assessor, record):
    result = assess(assessor, record)
    assert "dxa-now" in result.assessment.recommendations and "dxa-result-unavailable" not in result.assessment.flags
    if record["id"] == "pr-undated":
        assert any("without a date" in p for p in result.facts.problems)


def test_the_latest_of_several_dxa_records_is_the_one_named(assessor):
    a = assess(assessor, procedure("pr-a", when="2025-01-10"), dxa_report("dr-b", when="2026-01-15")).assessment
    assert flag(a, "dxa-result-unavailable").date == dt.date(2026, 1, 15)


def test_one_scan_recorded_as_procedure_report_and_completed_order_is_one_dxa_on_record(assessor):
    same_day = [procedure("pr-a"), dxa_report("dr-a", when="2026-03-10"), service_request("sr-a", status="completed", authored="2026-03-10")]
    a = assess(assessor, *same_day, service_request("sr-next")).assessment
    assert a.recommendations.count("dxa-obtain-result") == 1 and "dxa-now" not in a.recommendations
    done = flag(a, "dxa-result-unavailable")
    assert done.date == dt.date(2026, 3, 10)
    assert {"Procedure/pr-a", "DiagnosticReport/dr-a", "ServiceRequest/sr-a"} <= set(done.evidence)
    assert flag(a, "dxa-ordered").date == dt.date(2026, 4, 15)


def test_a_dxa_result_that_cannot_be_read_is_a_dxa_without_a_result(assessor):
    # public test data sends g/cm2 under the femur T-score code: not a T-score, but a scan was done
    wrong_unit = observation("o-gcm2", "38263-0", valueQuantity={"value": 0.82, "unit": "g/cm2"})
    result = assess(assessor, wrong_unit)
    assert "dxa-obtain-result" in result.assessment.recommendations and "dxa-result-unavailable" in result.assessment.flags
    assert any("o-gcm2" in p and "unit" in p for p in result.facts.problems)


def test_a_result_at_a_site_the_rules_do_not_use_still_asks_for_a_central_dxa(assessor):
    heel = observation("o-calc", "38266-3", valueQuantity={"value": -2.6, "unit": "{T-score}"})
    a = assess(assessor, heel).assessment
    assert "dxa-now" in a.recommendations and "dxa-obtain-result" not in a.recommendations
    assert "dxa-result-unavailable" not in a.flags


def test_only_a_dxa_procedure_or_order_is_read(assessor):
    term = assessor.terminology
    other = {**procedure("colonoscopy"), "code": {"coding": [{"system": SNOMED, "code": "73761001"}]}}
    assert not reads_resource(other, term) and not needs_validation(other, term)
    for record in (procedure("p"), service_request("s"), dxa_report("d"), observation("o", "38268-9")):
        assert reads_resource(record, term) and needs_validation(record, term)
    cpt = {**procedure("cpt"), "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "77080"}]}}
    assert reads_resource(cpt, term)
    facts = extract_facts(f"Patient/{PID}", [patient(), other], AS_OF, term)
    assert not facts.of_type("dxa_record") and not facts.of_type("excluded")


# --------------------------------------------------------------------------- risk tools


def test_a_recorded_frax_is_shown_and_flagged_but_never_changes_the_category(assessor):
    frax_mof = observation("frax-mof", "90265-0", "2026-01-10", **percent(22))
    frax_hip = observation("frax-hip", "90266-8", "2026-01-10", **percent(2.1))
    base = assess(assessor, t_score("ls", "38267-1", -1.2)).assessment
    a = assess(assessor, t_score("ls", "38267-1", -1.2), frax_mof, frax_hip).assessment
    assert a.category == base.category == "low" and a.recommendations == base.recommendations
    tools = {f.code: f for f in a.findings if f.kind == "risk-tool"}
    assert tools["frax-mof"].value == 22.0 and tools["frax-mof"].date == dt.date(2026, 1, 10)
    assert "major osteoporotic fracture: 22% (recorded 2026-01-10)" in tools["frax-mof"].detail
    assert tools["frax-hip"].value == 2.1
    f = flag(a, "frax-above-asco-threshold")  # the MOF is at 20% or more; the hip (2.1%) is below 3%
    assert f.value == 22.0 and "22% on 2026-01-10" in f.detail


def test_a_frax_below_the_asco_thresholds_is_shown_without_a_flag(assessor):
    a = assess(assessor, observation("frax", "90265-0", "2026-01-10", **percent(12))).assessment
    assert [f.code for f in a.findings if f.kind == "risk-tool"] == ["frax-mof"]
    assert "frax-above-asco-threshold" not in a.flags


def test_frax_hip_at_three_percent_is_flagged(assessor):
    a = assess(assessor, observation("frax", "90266-8", "2026-01-10", **percent(3))).assessment
    assert "frax-above-asco-threshold" in a.flags


def test_the_latest_frax_is_the_one_shown_and_a_wrong_unit_is_a_problem(assessor):
    older = observation("frax-old", "90265-0", "2025-01-10", **percent(30))
    newer = observation("frax-new", "90265-0", "2026-01-10", **percent(15))
    wrong = observation("frax-mg", "90265-0", "2026-03-10", valueQuantity={"value": 40, "unit": "mg"})
    result = assess(assessor, older, newer, wrong)
    tools = [f for f in result.assessment.findings if f.kind == "risk-tool"]
    assert [(t.code, t.value) for t in tools] == [("frax-mof", 15.0)]
    assert any("frax-mg" in p and "not %" in p for p in result.facts.problems)


def test_screening_scores_ost_orai_osiris_are_shown(assessor):
    ost = observation("ost", "98146-4", "2026-01-10", valueInteger=-2)
    orai = observation(
        "orai", "98139-9", "2026-01-11",
        component=[
            {"code": {"coding": [{"system": LOINC, "code": "29463-7"}]}, "valueQuantity": {"value": 58, "unit": "kg"}},
            {"code": {"coding": [{"system": LOINC, "code": "98140-7"}]}, "valueInteger": 14},
        ],
    )
    osiris = observation("osiris", "98133-2", "2026-01-12", valueDecimal=0.4)
    a = assess(assessor, ost, orai, osiris).assessment
    tools = {f.code: f for f in a.findings if f.kind == "risk-tool"}
    assert {k: t.value for k, t in tools.items()} == {"ost": -2.0, "orai": 14.0, "osiris": 0.4}
    assert "(ORAI) score 14 (recorded 2026-01-11)" in tools["orai"].detail
    assert a.category == "indeterminate" and "dxa-now" in a.recommendations


def test_risk_tools_of_a_patient_not_on_an_aromatase_inhibitor_are_not_shown(assessor):
    result = assessor.assess(f"Patient/{PID}", [patient(), observation("frax", "90265-0", "2026-01-10", **percent(25))], AS_OF)
    assert result.assessment.category == "not-applicable"
    assert not [f for f in result.assessment.findings if f.kind == "risk-tool"]
    assert result.facts.of_type("risk_score")  # read, shown only where an assessment is made


# --------------------------------------------------------------------------- outputs


def test_careplan_and_risk_assessment_carry_the_date_and_the_frax(assessor):
    catalogue = load_catalogue(ROOT / "rules" / "recommendations.yaml")
    result = assess(assessor, procedure("pr1"), observation("frax", "90265-0", "2026-01-10", **percent(22)))
    a = result.assessment
    risk, plan = build_resources(a, catalogue, values=PatientValues(a, result.facts))
    notes = " ".join(n.text for n in plan.note)
    assert "A DXA was done on 10 Mar 2026, but its T-scores are not on record" in notes
    assert "major osteoporotic fracture: 22% (recorded 2026-01-10)" in notes
    frax = [p for p in risk.prediction if p.probabilityDecimal is not None]
    assert len(frax) == 1 and float(frax[0].probabilityDecimal) == pytest.approx(0.22)
    assert "does not set the AIBL risk category" in frax[0].rationale
    assert any("10 Mar 2026" in n.text for n in risk.note)
    codes = [c.code for act in plan.activity for c in act.detail.code.coding]
    assert "dxa-obtain-result" in codes and "dxa-now" not in codes


def test_assess_reads_a_file_and_explains(capsys, tmp_path):
    path = tmp_path / "cms-shaped.json"
    path.write_text(json.dumps(bundle(patient(), anastrozole(), service_request("sr1"), observation("frax", "90265-0", "2026-01-10", **percent(21)))))
    code = cli.main(["assess", str(path), "--format", "json", "--explain", "--as-of", AS_OF.isoformat()])
    out, err = capsys.readouterr()
    assert code == 0, err
    [result] = json.loads(out)
    assert "dxa-ordered" in result["flags"] and "dxa-obtain-result" in result["recommendations"]
    ordered = next(f for f in result["findings"] if f["kind"] == "flag" and f["code"] == "dxa-ordered")
    assert ordered["date"] == "2026-04-15" and "ServiceRequest/sr1" in ordered["evidence"]
    tool = next(f for f in result["findings"] if f["kind"] == "risk-tool")
    assert tool["code"] == "frax-mof" and tool["value"] == 21.0


@pytest.mark.parametrize("profile", ["generic", "epic"])
def test_the_connector_pulls_dxa_records_and_assesses_them(assessor, profile):
    resources = [patient(), anastrozole(), procedure("pr1"), service_request("sr-dnp", doNotPerform=True)]
    resources += [patient("other"), procedure("pr-other", pid="other", when="2026-05-01")]
    fake = FakeFhir(resources=resources, batch=profile == "generic", revinclude=False)
    client = FhirClient(BASE, profile=dataclasses.replace(PROFILES[profile]))
    client.http.sleep = lambda s: None
    with mock() as rsps:
        fake.install(rsps)
        pulled = Puller(client).pull(PID)
    got = {f"{r['resourceType']}/{r['id']}" for r in pulled.resources}
    assert {"Procedure/pr1", "ServiceRequest/sr-dnp"} <= got and "Procedure/pr-other" not in got
    a = assessor.assess(pulled.patient_ref, pulled.resources, AS_OF).assessment
    assert "dxa-result-unavailable" in a.flags and "dxa-declined" in a.flags
    assert "dxa-obtain-result" in a.recommendations


def test_the_cds_prefetch_asks_for_dxa_records_by_code(assessor):
    templates = default_templates(assessor.terminology)
    assert templates["dxa-procedures"].startswith("Procedure?patient={{context.patientId}}&code=")
    for key, code in (("dxa-procedures", "312681000"), ("dxa-orders", "24701-5"), ("dxa-reports", "38269-7")):
        assert code in templates[key].split("code=")[1].split(",")
    assert "90265-0" in templates["observations"]

