"""Cards: contents, suggestions (valid FHIR R4), safety blocks and the critical indicator."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

import pytest
import yaml
from fhir.resources.R4B import get_fhir_model_class

from fhir_aibl.careplan import RULE_EXTENSION, RULESET_EXTENSION
from fhir_aibl.cds.cards import SUMMARY_MAX, _summary
from fhir_aibl.cds.safety import DEFAULT_TABLE, load_safety_table
from fhir_aibl.cds.samples import draft_medication_request, order_select_request, patient_view_request
from fhir_aibl.errors import RulesError

from ..conftest import ROOT
from .conftest import OS, PV, bundle

BLOCK_ZA = """
blocks:
  - id: TEST-BLOCK-ZA
    when: [{kind: recommendation, code: ci-check}]
    blocks: {ingredients: [zoledronic-acid]}
    reason: Test block of zoledronic acid.
"""
BLOCK_ALL = """
blocks:
  - id: TEST-BLOCK-ALL
    when: [{kind: recommendation, code: ci-check}]
    blocks: {classes: [bisphosphonate, denosumab]}
    reason: Test block of every antiresorptive.
"""


def _table(tmp_path, text: str) -> str:
    path = tmp_path / "safety.yaml"
    path.write_text(text)
    return str(path)


def suggestion_resources(card: dict) -> list[dict]:
    return [a["resource"] for s in card.get("suggestions", []) for a in s["actions"] if "resource" in a]


def by_kind(cards: list[dict]) -> dict[str, dict]:
    out = {}
    for card in cards:
        if card["indicator"] == "critical":
            out["safety"] = card
        elif card["selectionBehavior"] == "at-most-one":
            out["treatment"] = card
        else:
            out["assessment"] = card
    return out


def test_high_risk_card_contents(make_app):
    cards = by_kind(make_app().hook(PV, patient_view_request(bundle("V06"))).json()["cards"])
    main = cards["assessment"]
    detail = main["detail"]
    # The deciding values, with the date, and the risk factors in words.
    assert detail.startswith("**High risk of bone loss**, on anastrozole: T-score -1.6 at the lumbar spine on 15 Feb 2026;")
    assert "age over 65 and current smoker" in detail
    assert "Repeat the DXA scan in 12 months" in detail
    # Reviewer material is elsewhere: no rule, reference or ruleset on the card.
    for internal in ("C-HIGH-2", "RF-AGE", "REC-HIGH-POTENT-AR", "Observation/", "aibl-1.0.0-", "`"):
        assert internal not in detail
    assert main["source"]["label"] and main["source"]["topic"]["code"] == "aibl"
    assert any("10.1016/j.jbo.2017.03.001" in link["url"] for link in main["links"])
    # Plan + DXA on the assessment card; the drugs on the treatment card, one at most.
    types = [r["resourceType"] for r in suggestion_resources(main)]
    assert types == ["RiskAssessment", "CarePlan", "ServiceRequest"]
    treatment = cards["treatment"]
    drugs = [r["medicationCodeableConcept"]["coding"][0]["code"] for r in suggestion_resources(treatment)]
    assert drugs == ["993449", "77655"]  # denosumab, zoledronic acid
    assert all("contraindication check" in s["label"] for s in treatment["suggestions"])


@pytest.mark.parametrize("case", ["V06", "V04", "V20", "V41", "V49", "V29", "V30"])
def test_every_suggested_resource_is_valid_fhir_r4(make_app, case):
    for card in make_app().hook(PV, patient_view_request(bundle(case))).json()["cards"]:
        for resource in suggestion_resources(card):
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
            assert resource["subject"]["reference"] == f"Patient/{case.lower()}"
            if resource["resourceType"] in ("ServiceRequest", "MedicationRequest"):
                assert resource["status"] == "draft"
                # The rules and ruleset behind it: structured, not in the note a clinician reads.
                urls = {e["url"] for e in resource["extension"]}
                assert urls == {RULE_EXTENSION, RULESET_EXTENSION}
                assert "Rules" not in resource["note"][0]["text"]


def test_dxa_timing_follows_the_catalogue(make_app):
    harness = make_app()
    now = [r for c in harness.hook(PV, patient_view_request(bundle("V20"))).json()["cards"] for r in suggestion_resources(c) if r["resourceType"] == "ServiceRequest"]
    assert now[0]["occurrenceDateTime"] == "2026-06-01" and now[0]["code"]["coding"][0]["code"] == "312681000"
    later = [r for c in harness.hook(PV, patient_view_request(bundle("V04"))).json()["cards"] for r in suggestion_resources(c) if r["resourceType"] == "ServiceRequest"]
    assert later[0]["occurrencePeriod"] == {"start": "2027-06-01", "end": "2028-06-01"}


def test_no_drug_is_suggested_to_a_patient_already_on_one(make_app):
    cards = make_app().hook(PV, patient_view_request(bundle("V29"))).json()["cards"]
    assert len(cards) == 1
    assert not [r for r in suggestion_resources(cards[0]) if r["resourceType"] == "MedicationRequest"]


def test_the_careplan_suggestion_has_no_dangling_reference(make_app):
    cards = make_app().hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    plan = next(r for r in suggestion_resources(cards[0]) if r["resourceType"] == "CarePlan")
    assert all(not str(i.get("reference", "")).startswith("urn:uuid:") for i in plan["supportingInfo"])
    assert plan["supportingInfo"][0]["identifier"]["system"] == "urn:fhir-aibl:careplan"


def test_a_blocked_drug_is_never_suggested(make_app, tmp_path):
    harness = make_app(safety=_table(tmp_path, BLOCK_ZA))
    cards = by_kind(harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"])
    drugs = [r["medicationCodeableConcept"]["coding"][0]["code"] for r in suggestion_resources(cards["treatment"])]
    assert drugs == ["993449"]  # denosumab only
    assert "Not offered: zoledronic acid." in cards["treatment"]["detail"]
    assert "Ruled out by the safety checks:** zoledronic acid." in cards["assessment"]["detail"]
    assert "TEST-BLOCK-ZA" not in str(cards)
    assert "safety" not in cards  # patient-view never makes a critical card


def test_no_treatment_card_when_every_drug_is_blocked(make_app, tmp_path):
    harness = make_app(safety=_table(tmp_path, BLOCK_ALL))
    cards = harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    assert len(cards) == 1
    assert not [r for r in suggestion_resources(cards[0]) if r["resourceType"] == "MedicationRequest"]
    assert "Ruled out by the safety checks:** every bisphosphonate, every denosumab." in cards[0]["detail"]
    assert "every option is ruled out for now" in cards[0]["detail"]


def test_a_draft_order_for_a_blocked_drug_is_critical(make_app, tmp_path):
    harness = make_app(safety=_table(tmp_path, BLOCK_ZA))
    draft = draft_medication_request("v06", "77655", "zoledronic acid", request_id="za-1")
    cards = harness.hook(OS, order_select_request(bundle("V06"), [draft])).json()["cards"]
    critical = [c for c in cards if c["indicator"] == "critical"]
    assert len(critical) == 1
    card = critical[0]
    assert "zoledronic acid" in card["summary"] and len(card["summary"]) <= SUMMARY_MAX
    assert "Test block of zoledronic acid." in card["detail"]
    assert "TEST-BLOCK-ZA" not in str(card) and "REC-HIGH-POTENT-AR" not in str(card)
    action = card["suggestions"][0]["actions"][0]
    assert action == {"type": "delete", "description": "Remove the draft zoledronic acid order", "resourceId": "MedicationRequest/za-1"}
    assert card["selectionBehavior"] == "any"
    # An allowed drug in the draft is no safety problem.
    ok = draft_medication_request("v06", "993449", "denosumab", request_id="dmab-1")
    cards = harness.hook(OS, order_select_request(bundle("V06"), [ok])).json()["cards"]
    assert all(c["indicator"] != "critical" for c in cards)


def test_critical_only_for_a_safety_block(make_app):
    """Without a block, even a high-risk patient with a drafted antiresorptive gets warning cards."""
    draft = draft_medication_request("v06", "77655", "zoledronic acid")
    cards = make_app().hook(OS, order_select_request(bundle("V06"), [draft])).json()["cards"]
    assert cards and all(c["indicator"] == "warning" for c in cards)


def test_a_blocked_draft_by_product_code_and_brand(make_app, tmp_path):
    """A block on an ingredient catches the product and brand codes of that ingredient."""
    harness = make_app(safety=_table(tmp_path, BLOCK_ALL))
    draft = draft_medication_request("v06", "904431", "alendronic acid 70 MG Oral Tablet", request_id="aln")
    cards = harness.hook(OS, order_select_request(bundle("V06"), [draft])).json()["cards"]
    assert [c["indicator"] for c in cards].count("critical") == 1


def test_summary_is_cut_to_140_characters():
    assert _summary("x" * 200).endswith("…") and len(_summary("x" * 200)) == SUMMARY_MAX
    assert _summary("short  text") == "short text"


def test_the_shipped_safety_table_names_real_drugs_and_every_agent_the_rules_block(assessor):
    table = load_safety_table(DEFAULT_TABLE)
    concepts = list(assessor.terminology.valueset("medications").exact.values())
    classes = {c.get("class") for c in concepts}
    ingredients = {c.get("ingredient") for c in concepts}
    for agent, drugs in table.agents.items():
        assert set(drugs.classes) <= classes, agent
        assert set(drugs.ingredients) <= ingredients, agent
        assert drugs.classes or drugs.ingredients or drugs.codes, agent
    # Every agent a rule can block is named in the table (else it would block everything).
    rules = yaml.safe_load((ROOT / "rules" / "aibl.yaml").read_text())["rules"]
    emitted = set()
    for rule in rules:
        asserts = rule.get("assert", [])
        for fact in asserts if isinstance(asserts, list) else [asserts]:
            if fact.get("t") == "blocked":
                emitted.add(fact["agent"])
    assert emitted and emitted <= set(table.agents), emitted - set(table.agents)


# --------------------------------------------------------------------------- the rules' own gates (CLINICAL.md V43-V46)


def drugs_offered(cards: dict) -> list[str]:
    return [r["medicationCodeableConcept"]["text"] for r in suggestion_resources(cards["treatment"])] if "treatment" in cards else []


def critical_for(harness, case: str, rxnorm: str, display: str, dose_mg: float | None = None) -> list[dict]:
    draft = draft_medication_request(case.lower(), rxnorm, display, request_id="d1")
    if dose_mg is not None:
        draft["dosageInstruction"] = [{"doseAndRate": [{"doseQuantity": {"value": dose_mg, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}}]}]
    cards = harness.hook(OS, order_select_request(bundle(case), [draft])).json()["cards"]
    return [c for c in cards if c["indicator"] == "critical"]


def test_hypocalcaemia_blocks_every_antiresorptive(make_app):
    """V45: corrected calcium 8.1 mg/dL."""
    harness = make_app()
    cards = by_kind(harness.hook(PV, patient_view_request(bundle("V45"))).json()["cards"])
    assert "treatment" not in cards
    assert (
        "every bisphosphonate and denosumab (albumin-corrected calcium 8.1 mg/dL on 15 Feb 2026)" in cards["assessment"]["detail"]
    )
    for rxnorm, name in (("993449", "denosumab"), ("77655", "zoledronic acid"), ("904431", "alendronate 70 mg"), ("73056", "risedronate")):
        critical = critical_for(harness, "V45", rxnorm, name)
        assert len(critical) == 1, name
        assert "This patient: albumin-corrected calcium 8.1 mg/dL on 15 Feb 2026." in critical[0]["detail"]
        assert "K1C" not in str(critical[0]) and "Observation/" not in critical[0]["detail"]
    # Anastrozole itself is no antiresorptive: no safety card.
    assert critical_for(harness, "V45", "199224", "anastrozole") == []


def test_crcl_32_blocks_alendronate_and_reclast_not_zometa(make_app):
    """V44: computed CrCl 32 mL/min."""
    harness = make_app()
    cards = by_kind(harness.hook(PV, patient_view_request(bundle("V44"))).json()["cards"])
    assert drugs_offered(cards) == ["denosumab", "zoledronic acid"]  # ZA 4 mg stays, at a reduced dose
    assert "Give zoledronic acid 4 mg at a reduced dose" in cards["assessment"]["detail"]
    assert "alendronate and zoledronic acid 5 mg (creatinine clearance 32 mL/min on 15 Feb 2026)" in cards["assessment"]["detail"]
    assert critical_for(harness, "V44", "904431", "alendronate 70 mg")
    assert critical_for(harness, "V44", "77655", "zoledronic acid", dose_mg=5)  # Reclast
    assert not critical_for(harness, "V44", "77655", "zoledronic acid", dose_mg=3.0)  # Zometa, reduced
    assert critical_for(harness, "V44", "77655", "zoledronic acid")  # strength unknown: safe side
    assert not critical_for(harness, "V44", "73056", "risedronate")


def test_egfr_28_leaves_no_drug_to_suggest(make_app):
    """V43: eGFR 28: every bisphosphonate blocked, denosumab only after a CKD-MBD evaluation."""
    harness = make_app()
    cards = by_kind(harness.hook(PV, patient_view_request(bundle("V43"))).json()["cards"])
    assert "treatment" not in cards
    assert "Refer to a bone specialist" in cards["assessment"]["detail"]
    (card,) = critical_for(harness, "V43", "993449", "denosumab")
    assert "This patient: eGFR 28 mL/min/1.73 m² on 15 Feb 2026." in card["detail"]
    assert "(eGFR 28 mL/min/1.73 m² on 15 Feb 2026)" in card["summary"]


def test_low_vitamin_d_blocks_iv_zoledronic_acid_and_denosumab(make_app):
    """V46: 25-OH vitamin D 15 ng/mL."""
    harness = make_app()
    cards = by_kind(harness.hook(PV, patient_view_request(bundle("V46"))).json()["cards"])
    assert drugs_offered(cards) == []
    assert critical_for(harness, "V46", "993449", "denosumab")
    assert not critical_for(harness, "V46", "73056", "risedronate")


def test_an_agent_the_table_does_not_know_blocks_every_antiresorptive(make_app, tmp_path, caplog):
    harness = make_app(safety=_table(tmp_path, "agents: {}\n"))
    with caplog.at_level(logging.WARNING, logger="fhir_aibl.cds"):
        cards = by_kind(harness.hook(PV, patient_view_request(bundle("V44"))).json()["cards"])
    assert "treatment" not in cards
    assert "every bisphosphonate and denosumab" in cards["assessment"]["detail"]
    # The operator learns which agent is missing; the clinician is not told our table's names.
    assert any("'alendronate'" in r.getMessage() for r in caplog.records)
    assert "alendronate" not in cards["assessment"]["detail"]
    assert critical_for(harness, "V44", "73056", "risedronate")


def test_a_bad_safety_table_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("blocks:\n  - id: X\n    when: []\n    blocks: {}\n    reason: r\n")
    with pytest.raises(RulesError, match="invalid safety table"):
        load_safety_table(path)


def test_as_of_defaults_to_today(make_app):
    harness = make_app(as_of=None)
    harness.clock[0] = dt.datetime(2027, 3, 4, 12, 0).timestamp()
    cards = harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    risk = suggestion_resources(cards[0])[0]
    assert risk["resourceType"] == "RiskAssessment" and risk["occurrenceDateTime"] == "2027-03-04"


# --------------------------------------------------------------------------- the clinician layer

RULE_IDS = {r["id"] for r in yaml.safe_load((ROOT / "rules" / "aibl.yaml").read_text())["rules"]}
RESOURCE_REF = re.compile(
    r"\b(?:Patient|Observation|Condition|Medication\w*|FamilyMemberHistory|Procedure|DiagnosticReport|Encounter|"
    r"RiskAssessment|CarePlan|ServiceRequest)/|_history"
)
SPEC_REF = re.compile(
    r"\bCLINICAL\b|\bPROPOSAL\b|\bUNVERIFIED\b|DESIGN\.md|\barticle [AB]\b|\bruleset\b|`|\b[0-9a-f]{12}\b"
    r"|\b(?!D[23]\b)(?:OP|RF|[ABCDEGKLMPRSV])\d{1,2}[a-e]?\b"
)
#: Where a clinician reads text in a resource; codings, identifiers and extensions are structured fields.
TEXT_KEYS = {"title", "description", "text", "rationale", "mitigation", "display", "label", "summary", "detail"}
DRAFTS = (("904431", "alendronate 70 mg"), ("73056", "risedronate"), ("77655", "zoledronic acid"), ("993449", "denosumab"), ("199224", "anastrozole"))


def _catalogue_codes() -> set[str]:
    from fhir_aibl.assessment import RISK_FACTOR_ORDER

    catalogue = yaml.safe_load((ROOT / "rules" / "recommendations.yaml").read_text())
    safety = yaml.safe_load(DEFAULT_TABLE.read_text())
    codes = {*catalogue["recommendations"], *catalogue["flags"], *RISK_FACTOR_ORDER, *safety["agents"]}
    return {c for c in codes if "-" in c}  # a plain word ("exercise", "denosumab") is not a code


CATALOGUE_CODES = _catalogue_codes()
CODE_RE = re.compile(r"(?<![\w-])(?:" + "|".join(re.escape(c) for c in sorted(CATALOGUE_CODES, key=len, reverse=True)) + r")(?![\w-])")


def texts_of(node, key: str | None = None) -> list[str]:
    """Every string a clinician reads in a card or a resource (JSON)."""
    if isinstance(node, dict):
        out = []
        for k, v in node.items():
            if k in ("coding", "identifier", "extension", "resourceId", "url", "uuid", "system", "topic"):
                continue
            out += texts_of(v, k)
        return out
    if isinstance(node, list):
        return [t for item in node for t in texts_of(item, key)]
    return [node] if isinstance(node, str) and key in TEXT_KEYS else []


def leaks(text: str) -> list[str]:
    found = [m.group(0) for m in RESOURCE_REF.finditer(text)]
    found += [m.group(0) for m in SPEC_REF.finditer(text)]
    found += [m.group(0) for m in CODE_RE.finditer(text)]
    found += [w for w in re.findall(r"[A-Z0-9][A-Z0-9-]+[A-Z0-9]", text) if w in RULE_IDS]
    return found


def answers(harness, record: dict, patient_id: str, drafts=DRAFTS) -> list[list[dict]]:
    out = [harness.hook(PV, patient_view_request(record)).json()["cards"]]
    for rxnorm, name in drafts:
        draft = draft_medication_request(patient_id, rxnorm, name, request_id=f"d-{rxnorm}")
        out.append(harness.hook(OS, order_select_request(record, [draft])).json()["cards"])
    return out


def worked_examples() -> list[str]:
    return sorted(p.stem for p in (ROOT / "fixtures" / "bundles").glob("V*.json"))


def test_leak_patterns_catch_what_they_must():
    for bad in ("rules C-HIGH-1", "`Observation/v06-dxa-ls/_history/1`", "see CLINICAL.md G12", "(PROPOSAL)", "potent-ar",
                "dxa-12m", "article A (S4)", "K1d", "age-over-65", "ruleset aibl-1.0.0-0123456789ab"):
        assert leaks(bad), bad
    for good in ("vitamin D3 800 to 1,000 IU", "T-score -2.3 at the lumbar spine on 10 Feb 2026", "age over 65",
                 "creatinine clearance 28 mL/min on 3 Jan 2026", "on hold", "zoledronic acid 4 mg"):
        assert not leaks(good), good


def test_no_reviewer_material_in_anything_a_clinician_reads(make_app, assessor):
    """Every worked example (patient-view, and order-select with each antiresorptive and an AI
    drafted) and a synthetic population: cards, suggestion labels and the resources they create."""
    from fhir_aibl.careplan import build_resources, load_catalogue
    from fhir_aibl.synth import patient_record

    harness = make_app()
    problems = []
    for case in worked_examples():
        for cards in answers(harness, bundle(case), case.lower()):
            for text in texts_of(cards):
                if leaks(text):
                    problems.append((case, leaks(text), text[:200]))
    catalogue = load_catalogue(ROOT / "rules" / "recommendations.yaml")
    for index in range(40):
        record = patient_record(11, index)
        patient = next(r for r in record if r["resourceType"] == "Patient")
        wrapped = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in record]}
        for cards in answers(harness, wrapped, patient["id"], drafts=DRAFTS[:1]):
            for text in texts_of(cards):
                if leaks(text):
                    problems.append((f"synth {index}", leaks(text), text[:200]))
        # The command's CarePlan (`assess --write`), built without the resources' dates.
        assessment = assessor.assess(f"Patient/{patient['id']}", record, dt.date(2026, 6, 1)).assessment
        for resource in build_resources(assessment, catalogue):
            for text in texts_of(resource.model_dump(mode="json")):
                if leaks(text):
                    problems.append((f"synth {index} CarePlan", leaks(text), text[:200]))
    assert not problems, problems[:10]


def _paragraphs(detail: str) -> list[str]:
    """Paragraphs and list items of a Markdown detail."""
    out = []
    for block in detail.split("\n\n"):
        lines = block.split("\n")
        out += [line for line in lines] if all(line.startswith("- ") for line in lines) else [block]
    return [p.strip() for p in out if p.strip()]


@pytest.mark.parametrize("case", worked_examples())
def test_one_card_per_decision_short_and_without_repeats(make_app, case):
    harness = make_app()
    for cards in answers(harness, bundle(case), case.lower()):
        main = [c for c in cards if c["selectionBehavior"] == "any" and c["indicator"] != "critical"]
        assert len(main) <= 1
        if main:
            assert len(main[0]["detail"]) < 600, (case, len(main[0]["detail"]), main[0]["detail"])
        seen: dict[str, int] = {}
        for n, card in enumerate(cards):
            assert len(card["summary"]) <= SUMMARY_MAX
            for paragraph in _paragraphs(card["detail"]):
                assert seen.setdefault(paragraph, n) == n, (case, paragraph)
        assert len([c for c in cards if c["selectionBehavior"] == "at-most-one"]) <= 1


@pytest.mark.parametrize(
    "case, rxnorm, name, value",
    [
        ("V43", "904431", "alendronate 70 mg", "creatinine clearance 28 mL/min on 15 Feb 2026"),
        ("V44", "77655", "zoledronic acid", "creatinine clearance 32 mL/min on 15 Feb 2026"),
        ("V45", "73056", "risedronate", "albumin-corrected calcium 8.1 mg/dL on 15 Feb 2026"),
        ("V46", "993449", "denosumab", "25-OH vitamin D 15 ng/mL on 15 Feb 2026"),
    ],
)
def test_a_safety_card_gives_the_measured_value_and_its_date(make_app, case, rxnorm, name, value):
    (card,) = critical_for(make_app(), case, rxnorm, name)
    assert f"This patient: {value}." in card["detail"]
    assert value in card["summary"]
    assert "below" in card["detail"] or "until" in card["detail"] or "before" in card["detail"]  # the label's limit


def test_the_source_names_a_page_that_exists(make_app):
    harness = make_app()
    cards = harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    for card in cards:
        source = card["source"]
        assert source["label"] and source["topic"]["code"] == "aibl"
        assert source["url"] == "http://testserver/about"
    page = harness.client.get("/about")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Hadji P et al. J Bone Oncol 2017" in page.text and "https://doi.org/10.1016/j.jbo.2017.03.001" in page.text
    assert "<script" not in page.text and "src=" not in page.text  # nothing loaded from elsewhere
    assert not leaks(re.sub(r"<[^>]+>", " ", page.text))
    # Behind a proxy: the configured public base; or a page of the hospital's own.
    proxied = make_app(public_base_url="https://cds.hospital.example/aibl")
    card = proxied.hook(PV, patient_view_request(bundle("V06"))).json()["cards"][0]
    assert card["source"]["url"] == "https://cds.hospital.example/aibl/about"
    own = make_app(source_url="https://intranet.hospital.example/bone-health")
    card = own.hook(PV, patient_view_request(bundle("V06"))).json()["cards"][0]
    assert card["source"]["url"] == "https://intranet.hospital.example/bone-health"


def test_data_notes_reach_the_clinician_only_when_they_change_what_to_do(make_app, caplog):
    record = bundle("V06")
    for entry in record["entry"]:
        res = entry["resource"]
        if res["id"] == "v06-dxa-th":
            del res["effectiveDateTime"]  # a DXA result without a date
        if res["id"] == "v06-weight":
            res["valueQuantity"]["code"] = res["valueQuantity"]["unit"] = "stone"  # a unit nobody converts
    with caplog.at_level(logging.WARNING, logger="fhir_aibl.cds"):
        cards = make_app().hook(PV, patient_view_request(record)).json()["cards"]
    detail = cards[0]["detail"]
    assert "A DXA result on record has no date" in detail
    assert "stone" not in json.dumps(cards)
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "body-weight unit 'stone' not convertible" in logged
    assert "v06-weight" not in logged  # which resource: only with log_patient_data


def test_the_card_builder_has_a_slot_for_a_view_of_the_patient(make_app):
    harness = make_app()
    harness.cds.cards.view_link = lambda a: {"label": "Bone health view", "url": "https://cds.example.org/view/launch", "type": "smart"}
    cards = harness.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    assert cards[0]["links"][0] == {"label": "Bone health view", "url": "https://cds.example.org/view/launch", "type": "smart"}


def test_the_assessment_card_launches_the_bone_health_view_as_a_smart_app(make_app):
    """CDS Hooks link of type smart: the EHR launches /app/launch with iss and launch (fhir_aibl/view)."""
    cards = make_app().hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    smart = [link for link in cards[0]["links"] if link["type"] == "smart"]
    assert len(smart) == 1 and smart[0]["url"].startswith("http") and smart[0]["url"].endswith("/app/launch")
    configured = make_app(public_base_url="https://cds.example.org/aibl")
    cards = configured.hook(PV, patient_view_request(bundle("V06"))).json()["cards"]
    assert [link["url"] for link in cards[0]["links"] if link["type"] == "smart"] == ["https://cds.example.org/aibl/app/launch"]


def test_the_catalogue_gives_clinician_text_for_every_entry():
    from fhir_aibl.careplan import load_catalogue
    from fhir_aibl.clinician_text import PLACEHOLDERS, placeholders_of

    catalogue = load_catalogue(ROOT / "rules" / "recommendations.yaml")
    for code, entry in [*catalogue.recommendations.items(), *catalogue.flags.items()]:
        assert entry.clinician is not None, f"{code}: add `clinician: {{action, why}}`"
        for text in (entry.clinician.action, entry.clinician.why, entry.title):
            assert placeholders_of(text) <= set(PLACEHOLDERS), (code, text)
            assert not leaks(text.replace("{", "").replace("}", "")), (code, text)
    assert set(catalogue.references) <= set(catalogue.citations)
    for ref in catalogue.references.values():
        assert ref.url is None or ref.url.startswith("https://")
    table = load_safety_table()
    for name, drugs in table.agents.items():
        assert drugs.display and drugs.limit and placeholders_of(drugs.reason or "") <= set(PLACEHOLDERS), name
        assert not leaks(drugs.display + " " + drugs.limit), name


def test_clinician_text_helpers(assessor):
    from fhir_aibl.clinician_text import PatientValues, capitalised, day, fill

    assert day(dt.date(2026, 2, 10)) == "10 Feb 2026"
    assert capitalised("eGFR 28 mL/min") == "eGFR 28 mL/min" and capitalised("calcium low") == "Calcium low"
    assert fill("{crcl}, below 35 mL/min; {nonsense}", {"crcl": "creatinine clearance 28 mL/min"}) == (
        "creatinine clearance 28 mL/min, below 35 mL/min; "
    )  # an unknown placeholder is left out, never shown as braces (the catalogue test names it)
    record = [e["resource"] for e in bundle("V43")["entry"]]
    result = assessor.assess("Patient/v43", record, dt.date(2026, 6, 1))
    dated = PatientValues(result.assessment, result.facts, record).phrases()
    assert dated["crcl"] == "creatinine clearance 28 mL/min on 15 Feb 2026"
    assert dated["egfr"] == "eGFR 28 mL/min/1.73 m² on 15 Feb 2026"
    # Without the resources (the command's CarePlan): the values, without a date.
    undated = PatientValues(result.assessment, result.facts).phrases()
    assert undated["crcl"] == "creatinine clearance 28 mL/min" and undated["score"] == "T-score -2.6 at the lumbar spine"
    # Without facts: what the assessment holds; a value it cannot see is named, never said to be missing.
    bare = PatientValues(result.assessment).phrases()
    assert bare["crcl"] == "creatinine clearance as recorded"
    assert PatientValues(result.assessment, result.facts).phrases()["crcl"] != "creatinine clearance not on record"
