"""Issue 15: each numbered finding of the independent clinical review, as a test built from its
description (each failed on the rules before CLINICAL.md G24-G29 were implemented).

The records are built with the fixture builder (`fixtures/build_fixtures.py`), so they are the
same kind of FHIR R4 Bundles as the worked examples, and assessed through `Assessor.assess`.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from fhir_aibl.careplan import load_catalogue
from fhir_aibl.cli import main

from .conftest import AS_OF, FIXTURES, ROOT

_spec = importlib.util.spec_from_file_location("build_fixtures", FIXTURES / "build_fixtures.py")
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)  # type: ignore[union-attr]

CATALOGUE = load_catalogue(ROOT / "rules" / "recommendations.yaml")
STARTS = {"oral-bp", "potent-ar", "potent-ar-osteoporosis", "za-4mg-q6m"}


def assess(assessor, vid: str, **spec):
    resources = fx.build_resources(vid, fx.base(**spec))
    return assessor.assess(f"Patient/{vid.lower()}", resources, AS_OF).assessment


# ------------------------------------------------------------------ finding 1: premenopausal assumption
def test_1_a_woman_of_47_on_an_ai_without_ofs_is_scored_by_t_not_z(assessor):
    """47, anastrozole, no ovarian suppression, LS T -2.6 (Z -1.6): high with osteoporosis by DXA,
    not low with a DXA in 24 months."""
    a = assess(assessor, "X01", birth="1979-01-15", dxa=[
        {"key": "LS", "value": -2.6, "date": fx.DXA_DATE}, {"key": "LS-Z", "value": -1.6, "date": fx.DXA_DATE}])
    assert a.category == "high"
    assert "osteoporosis-by-dxa" in a.flags and "dxa-24m" not in a.recommendations
    assert [(s.score, s.value) for s in a.selected_t] == [("T", -2.6)]


def test_1_with_only_t_scores_she_is_not_indeterminate_and_no_dxa_is_reordered(assessor):
    a = assess(assessor, "X02", birth="1979-01-15", dxa=[{"key": "LS", "value": -2.6, "date": fx.DXA_DATE}])
    assert a.category == "high" and "dxa-now" not in a.recommendations


def test_1_a_z_scored_patient_with_only_t_scores_uses_them_and_says_so(assessor):
    """The preferred score missing from a current DXA: the other one is used and flagged; never
    indeterminate + DXA now (a man of 45 on testosterone plus anastrozole, T -2.1 only)."""
    a = assess(assessor, "X03", gender="male", birth="1981-01-15", breast_cancer=False, dxa=fx.dxa_tmin(-2.1),
               other_meds=[{"drug": "testosterone", "status": "active", "start": "2025-06-01", "end": None,
                            "dosage": "testosterone 100 mg weekly", "label": "testosterone"}])
    assert a.category == "high"
    assert "score-substituted" in a.flags and "dxa-now" not in a.recommendations


# ------------------------------------------------------------------ finding 2: fractures at major sites
@pytest.mark.parametrize(
    ("code", "display", "birth"),
    [
        ("S32.010A", "Wedge compression fracture of first lumbar vertebra", "1958-01-15"),  # at 68
        ("S52.501A", "Unspecified fracture of the lower end of right radius", "1954-01-15"),  # at 72
        ("S42.201A", "Unspecified fracture of upper end of right humerus", "1956-01-15"),
    ],
)
def test_2_a_major_site_fracture_without_mechanism_is_a_possible_fragility_fracture(assessor, code, display, birth):
    a = assess(assessor, "X04", birth=birth, dxa=fx.dxa_tmin(-1.0), conditions=[{
        "label": "fx", "system": fx.ICD10CM, "code": code, "display": display,
        "clinical": "active", "ver": "confirmed", "onset": "2026-01-10"}])
    assert a.category == "high"
    assert "possible-fragility-fracture" in a.flags


def test_2_a_recorded_high_energy_mechanism_does_not_count(assessor):
    a = assess(assessor, "X05", birth="1958-01-15", dxa=fx.dxa_tmin(-1.0), conditions=[{
        "label": "fx", "system": fx.ICD10CM, "code": "S32.010A", "display": "Fracture of first lumbar vertebra",
        "text": "L1 fracture, motor vehicle collision", "clinical": "active", "ver": "confirmed",
        "onset": "2026-01-10"}])
    assert "possible-fragility-fracture" not in a.flags
    assert a.category == "low"


# ------------------------------------------------------------------ finding 3: after the AI
def test_3_after_the_ai_on_denosumab_the_transition_is_complete(assessor):
    a = assess(assessor, "X06", dxa=fx.dxa_t(fx.DEFAULT_T), ai=fx.AI_COMPLETED_DENOSUMAB,
               other_meds=[{"drug": "denosumab", "status": "active", "start": "2022-03-01", "end": None,
                            "dosage": "denosumab 60 mg every 6 months", "label": "denosumab"}])
    assert a.ai_status == "stopped"
    assert {"dmab-transition", "ci-check", "ca-vitd", "dxa-12m"} <= set(a.recommendations)
    entry = CATALOGUE.recommendations["dmab-transition"]
    named = {p.display for p in entry.products}
    assert named == {"zoledronic acid", "alendronate"}  # the follow-on is named
    assert any(p.dosage == "5 mg" for p in entry.products)  # the osteoporosis product, not 4 mg


def test_3_after_the_ai_with_osteoporosis_the_bisphosphonate_is_not_usually_stopped(assessor):
    a = assess(assessor, "X07", dxa=fx.dxa_tmin(-2.7),
               ai={"drug": "anastrozole", "status": "completed", "start": "2021-01-01", "end": "2026-01-01",
                   "dosage": "anastrozole 1 mg daily"},
               other_meds=[{"drug": "zoledronic", "status": "active", "start": "2022-01-15", "end": None,
                            "dosage": "zoledronic acid 4 mg IV every 6 months", "label": "zoledronic"}])
    assert "post-ai" not in a.recommendations
    assert {"post-ai-continue", "ca-vitd"} <= set(a.recommendations)
    assert "usually stop" not in CATALOGUE.recommendations["post-ai-continue"].text


def test_3_the_transition_text_does_not_claim_the_ai_has_stopped_or_denosumab_is_active(assessor):
    """Denosumab stopped while the AI continues: the text must not say the opposite."""
    a = assess(assessor, "X08", dxa=fx.dxa_tmin(-1.0),
               other_meds=[{"drug": "denosumab", "status": "stopped", "start": "2023-01-01", "end": "2025-12-01",
                            "dosage": "denosumab 60 mg every 6 months", "label": "denosumab"}])
    assert a.ai_status == "active" and "dmab-transition" in a.recommendations
    text = CATALOGUE.recommendations["dmab-transition"].text + " ".join(
        f.detail or "" for f in a.findings_of("recommendation") if f.code == "dmab-transition")
    assert "has stopped and denosumab is active" not in text
    assert "The aromatase inhibitor has ended" not in text


# ------------------------------------------------------------------ finding 4: men on testosterone
def test_4_a_man_on_testosterone_and_anastrozole_gets_osteoporosis_regimens_and_the_anastrozole_review_first(assessor):
    a = assess(assessor, "X09", gender="male", birth="1966-01-15", breast_cancer=False, dxa=fx.dxa_tmin(-2.2),
               other_meds=[{"drug": "testosterone", "status": "active", "start": "2025-06-01", "end": None,
                            "dosage": "testosterone 100 mg weekly", "label": "testosterone"}])
    assert a.category == "high"
    assert "potent-ar" not in a.recommendations and "za-4mg-q6m" not in a.recommendations
    assert {"potent-ar-osteoporosis", "ci-check", "e2-monitor"} <= set(a.recommendations)
    entry = CATALOGUE.recommendations["potent-ar-osteoporosis"]
    assert not any(p.dosage == "4 mg" for p in entry.products)
    assert "recurrence" not in entry.text.lower()
    assert CATALOGUE.recommendations["e2-monitor"].text.startswith("First, review whether anastrozole")


def test_4_a_switch_for_such_a_man_uses_osteoporosis_doses_too(assessor):
    """Rapid loss on alendronate: the switch offers zoledronic acid 5 mg yearly or denosumab, never 4 mg."""
    a = assess(assessor, "X15", gender="male", birth="1966-01-15", breast_cancer=False,
               dxa=[fx.bmd("2025-02-15", 1.000), fx.bmd(fx.DXA_DATE, 0.940)] + fx.dxa_tmin(-2.1),
               other_meds=[{"drug": "testosterone", "status": "active", "start": "2025-06-01", "end": None,
                            "dosage": "testosterone 100 mg weekly", "label": "testosterone"},
                           {"drug": "alendronate", "status": "active", "start": "2024-01-01", "end": None,
                            "dosage": "alendronate 70 mg weekly", "label": "alendronate"}])
    assert "switch-iv" not in a.recommendations
    assert {"switch-iv-osteoporosis", "ci-check", "adherence", "ca-vitd"} <= set(a.recommendations)
    assert {p.dosage for p in CATALOGUE.recommendations["switch-iv-osteoporosis"].products} == {"5 mg", "60 mg"}


# ------------------------------------------------------------------ finding 5: stale DXA, no birth date
def test_5_a_stale_dxa_that_showed_osteoporosis_is_not_treated_as_nothing_known(assessor):
    a = assess(assessor, "X10", dxa=fx.dxa_tmin(-2.8, date="2023-12-01"))
    assert a.category == "high"
    assert {"dxa-stale"} <= set(a.flags) and "dxa-now" in a.recommendations


def test_5_a_stale_dxa_in_the_moderate_band_is_provisionally_moderate(assessor):
    a = assess(assessor, "X11", dxa=fx.dxa_tmin(-1.8, date="2023-12-01"))
    assert a.category == "moderate" and "dxa-now" in a.recommendations


def test_5_no_birth_date_is_never_low(assessor):
    a = assess(assessor, "X12", birth=None, dxa=fx.dxa_tmin(-1.2))
    assert a.category == "indeterminate"
    assert "age-unknown" in a.flags and "complete-record" in a.recommendations
    assert "age-over-65" not in a.risk_factors


# ------------------------------------------------------------------ finding 6: recommendation texts
def test_6_the_contraindication_check_names_oesophagus_posture_and_pregnancy():
    text = CATALOGUE.recommendations["ci-check"].text.lower()
    assert "oesophag" in text and "upright for 30 minutes" in text and "pregnan" in text


def test_6_the_specialist_text_covers_men_under_50_with_a_low_z_score():
    text = CATALOGUE.recommendations["specialist"].text
    assert "man under 50" in text and "Z-score −2.0 or lower" in text


def test_6_under_crcl_35_denosumab_comes_before_a_reduced_dose_of_zoledronic_acid(assessor):
    text = CATALOGUE.flags["crcl-below-35"].text
    assert text.index("denosumab") < text.index("zoledronic acid 4 mg")
    a = assess(assessor, "X13", birth="1966-01-15", dxa=fx.dxa_tmin(-2.6),
               labs=fx.labs(egfr=34, creat=1.7, weight=57.6, bmi=22))
    detail = " ".join(f.detail or "" for f in a.findings_of("flag") if f.code == "crcl-below-35")
    assert detail.index("denosumab") < detail.index("zoledronic acid 4 mg")


# ------------------------------------------------------------------ issue 10 item 2: missing Patient, file path
def _bundle(tmp_path, vid: str, mutate) -> str:
    resources = fx.build_resources(vid, fx.base(birth="1956-01-15", smoking="current", dxa=fx.dxa_tmin(-1.6)))
    resources = mutate(resources)
    path = tmp_path / f"{vid}.json"
    path.write_text(json.dumps({"resourceType": "Bundle", "type": "collection",
                                "entry": [{"resource": r} for r in resources]}))
    return str(path)


def _drop_patient(resources):
    return [r for r in resources if r["resourceType"] != "Patient"]


def _invalid_patient(resources):
    return [{**r, "gender": 123} if r["resourceType"] == "Patient" else r for r in resources]


def _other_patient(resources):
    # every resource names Patient/x14, the bundle holds Patient/someone-else only
    return [{**r, "id": "someone-else"} if r["resourceType"] == "Patient" else r for r in resources]


@pytest.mark.parametrize("mutate", [_drop_patient, _invalid_patient, _other_patient], ids=["absent", "invalid", "not-found"])
def test_issue10_a_record_without_a_usable_patient_is_assessed_named_and_never_lower(tmp_path, capsys, mutate):
    """V06 (70, smoker, T -1.6) is high with its Patient; without a usable one it is still high
    (never moderate), flagged age-unknown, printed, with an `error:` line and exit 1."""
    assert main(["assess", _bundle(tmp_path, "X14", lambda r: r), "--as-of", "2026-06-01", "--format", "json"]) == 0
    [with_patient] = json.loads(capsys.readouterr().out)
    assert with_patient["category"] == "high"
    code = main(["assess", _bundle(tmp_path, "X14", mutate), "--as-of", "2026-06-01", "--format", "json"])
    captured = capsys.readouterr()
    results = {r["patient"]: r for r in json.loads(captured.out)}
    assert code == 1
    got = results["Patient/x14"]
    assert got["category"] == "high"
    assert "age-unknown" in got["flags"] and "age-over-65" not in got["risk_factors"]
    assert "error:" in captured.err and "Patient/x14: no usable Patient resource" in captured.err
