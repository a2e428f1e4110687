"""The value sets in rules/valuesets load, and the look-ups the rules depend on answer right."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from fhir_aibl.errors import RulesError
from fhir_aibl.terminology import Terminology

VALUESETS = Path(__file__).resolve().parent.parent / "rules" / "valuesets"

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
V3_ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"


@pytest.fixture(scope="module")
def term() -> Terminology:
    return Terminology.load(VALUESETS)


def test_load_succeeds_with_every_value_set(term: Terminology) -> None:
    for vs_id in (
        "dxa",
        "body-sites",
        "observations",
        "units",
        "smoking-status",
        "conditions",
        "medications",
        "family-relationships",
        "statuses",
    ):
        assert vs_id in term.valueset_ids
    assert len(term.content_hash) == 64


def test_every_entry_has_status_and_declared_source() -> None:
    import yaml

    for path in sorted(VALUESETS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        if "systems" in doc:
            continue
        declared = set(doc.get("sources") or {})
        for entry in doc.get("concepts") or []:
            assert entry.get("status"), f"{path.name}: {entry.get('code')} has no status"
            assert entry.get("source"), f"{path.name}: {entry.get('code')} has no source"
            for src in entry["source"]:
                assert src in declared, f"{path.name}: {entry['code']} cites undeclared source {src}"
            if entry["status"] == "UNVERIFIED":
                assert entry.get("unverified_ok") and entry.get("note"), f"{path.name}: {entry['code']}"


# --- medications ----------------------------------------------------------------------------
def test_anastrozole_scd_is_an_aromatase_inhibitor(term: Terminology) -> None:
    hit = term.lookup("medications", RXNORM, "199224")
    assert hit is not None
    assert hit.get("ingredient") == "anastrozole"
    assert hit.get("class") == "aromatase-inhibitor"
    assert hit.get("tty") == "SCD"


def test_rxnorm_alias_system_is_resolved(term: Terminology) -> None:
    hit = term.lookup("medications", "urn:oid:2.16.840.1.113883.6.88", "199224")
    assert hit is not None and hit.get("class") == "aromatase-inhibitor"


@pytest.mark.parametrize("system,code", [(RXNORM, "10324"), (ATC, "L02BA01")])
def test_tamoxifen_is_a_serm_never_an_ai(term: Terminology, system: str, code: str) -> None:
    hit = term.lookup("medications", system, code)
    assert hit is not None
    assert hit.get("class") == "serm"
    assert hit.get("ingredient") == "tamoxifen"


def test_no_tamoxifen_code_is_an_aromatase_inhibitor(term: Terminology) -> None:
    vs = term.valueset("medications")
    for concept in list(vs.exact.values()) + vs.prefixes:
        if concept.get("ingredient") == "tamoxifen":
            assert concept.get("class") == "serm"


def test_synthea_alendronate_is_an_oral_bisphosphonate(term: Terminology) -> None:
    hit = term.lookup("medications", RXNORM, "904419")
    assert hit is not None
    assert hit.get("ingredient") == "alendronate"
    assert hit.get("class") == "bisphosphonate"
    assert hit.get("route") == "oral"


def test_oral_glucocorticoid_products_are_oral(term: Terminology) -> None:
    hit = term.lookup("medications", RXNORM, "312617")  # prednisone 5 MG Oral Tablet
    assert hit is not None
    assert (hit.get("class"), hit.get("route")) == ("glucocorticoid", "oral")


def test_unverified_ingredients_keep_their_status(term: Terminology) -> None:
    for code in ("6902", "10379"):
        hit = term.lookup("medications", RXNORM, code)
        assert hit is not None and hit.status == "UNVERIFIED"


# --- conditions -----------------------------------------------------------------------------
@pytest.mark.parametrize("code", ["C50.912", "C50912", "c50.912"])
def test_icd_breast_cancer_dotted_or_not(term: Terminology, code: str) -> None:
    hit = term.lookup("conditions", ICD10CM, code)
    assert hit is not None and hit.get("concept") == "breast-cancer"


def test_icd10_who_system_spelling_is_accepted(term: Terminology) -> None:
    hit = term.lookup("conditions", "http://hl7.org/fhir/sid/icd-10", "C50.912")
    assert hit is not None and hit.get("concept") == "breast-cancer"


@pytest.mark.parametrize("code", ["M80.08XA", "M8008XA"])
def test_m80_08_is_a_vertebral_fragility_fracture(term: Terminology, code: str) -> None:
    hit = term.lookup("conditions", ICD10CM, code)
    assert hit is not None
    assert hit.get("concept") == "fracture"
    assert hit.get("fracture_site") == "vertebral"
    assert hit.get("fragility") is True


def test_longest_prefix_wins_for_m80(term: Terminology) -> None:
    assert term.lookup("conditions", ICD10CM, "M80.051A").get("fracture_site") == "hip"
    assert term.lookup("conditions", ICD10CM, "M80.00XA").get("fracture_site") == "other"


def test_s72_0_is_a_traumatic_hip_fracture_possibly_fragility_from_50(term: Terminology) -> None:
    hit = term.lookup("conditions", ICD10CM, "S72.001A")
    assert hit is not None
    assert hit.get("concept") == "fracture"
    assert hit.get("fracture_site") == "hip"
    assert hit.get("fragility") is False
    assert hit.get("possible_fragility_age") == 50


def test_synthea_traumatic_fractures(term: Terminology) -> None:
    expected = {"263102004": "wrist", "65966004": "wrist", "58150001": "other", "16114001": "other", "33737001": "other"}
    for code, site in expected.items():
        hit = term.lookup("conditions", SNOMED, code)
        assert hit is not None, code
        assert (hit.get("concept"), hit.get("fracture_site"), hit.get("fragility")) == ("fracture", site, False)


def test_fragility_mechanism_text(term: Terminology) -> None:
    assert term.match_text("conditions", "Low-trauma fall from standing height") == {"fragility": True}
    # a high-energy mechanism is recognised too, and says the opposite (CLINICAL.md G25)
    assert term.match_text("conditions", "Motor vehicle accident") == {"high_energy": True}
    assert term.match_text("conditions", "Fell off a bicycle") is None


# --- DXA and body sites ---------------------------------------------------------------------
def test_38263_0_is_femur_t_score(term: Terminology) -> None:
    hit = term.lookup("dxa", LOINC, "38263-0")
    assert hit is not None
    assert hit.get("measure") == "T"
    assert hit.get("site") == "FEMUR"


def test_38265_5_is_forearm_not_generic(term: Terminology) -> None:
    hit = term.lookup("dxa", LOINC, "38265-5")
    assert hit is not None and hit.get("site") == "FA" and hit.get("measure") == "T"


def test_laterality_codes(term: Terminology) -> None:
    assert term.lookup("dxa", LOINC, "80946-7").get("laterality") == "left"
    assert term.lookup("dxa", LOINC, "80945-9").get("laterality") == "right"


@pytest.mark.parametrize(
    "text,site",
    [("Femoral neck", "FN"), ("Left neck of femur", "FN"), ("Total hip", "TH"), ("AP lumbar spine L1-L4", "LS"), ("Forearm 1/3 radius", "FA")],
)
def test_body_site_text(term: Terminology, text: str, site: str) -> None:
    assert term.match_text("body-sites", text) == {"site": site}


def test_femoral_neck_snomed_is_flagged_unverified(term: Terminology) -> None:
    hit = term.lookup("body-sites", SNOMED, "29627003")
    assert hit is not None and hit.get("site") == "FN" and hit.status == "UNVERIFIED"


# --- observations, smoking, units, family ---------------------------------------------------
def test_observation_concepts_and_units(term: Terminology) -> None:
    assert term.lookup("observations", LOINC, "62292-8").properties == {"concept": "vitamin-d-25oh", "unit": "ng/mL"}
    egfr = term.lookup("observations", LOINC, "98979-8")
    assert (egfr.get("concept"), egfr.get("method")) == ("egfr", "ckd-epi-2021")
    assert term.lookup("observations", LOINC, "62238-1").get("method") == "ckd-epi-2009"


def test_smoking_answers(term: Terminology) -> None:
    former = term.lookup("smoking-status", SNOMED, "8517006")
    assert (former.get("smoking"), former.get("frax_current")) == ("former", False)
    daily = term.lookup("smoking-status", SNOMED, "449868002")
    assert (daily.get("smoking"), daily.get("frax_current")) == ("current", True)
    assert term.lookup("smoking-status", SNOMED, "266927001").get("smoking") == "unknown"


def test_units_aliases_and_conversions(term: Terminology) -> None:
    data = term.valueset("units").data
    assert data["aliases"]["g/cm-2"] == "g/cm2"
    assert data["aliases"]["{T-score}"] == "{score}"
    vit_d = data["conversions"]["vitamin-d-25oh"]
    assert vit_d["unit"] == "ng/mL"
    assert vit_d["factors"]["nmol/L"] * 2.496 == pytest.approx(1.0)
    assert data["conversions"]["creatinine"]["factors"]["umol/L"] * 88.4 == pytest.approx(1.0)


def test_family_parents(term: Terminology) -> None:
    for code in ("MTH", "FTH", "PRN", "NMTH", "NFTH", "NPRN"):
        assert term.lookup("family-relationships", V3_ROLE, code).get("parent") is True
    for code in ("SIS", "GRMTH", "STPMTH", "ADOPTF", "MAUNT"):
        assert term.lookup("family-relationships", V3_ROLE, code).get("parent") is False


# --- refusal of unverified codes ------------------------------------------------------------
def _copy_systems(tmp_path: Path) -> Path:
    shutil.copy(VALUESETS / "systems.yaml", tmp_path / "systems.yaml")
    return tmp_path


def test_unverified_code_without_unverified_ok_is_refused(tmp_path: Path) -> None:
    directory = _copy_systems(tmp_path)
    (directory / "bad.yaml").write_text(
        "id: bad\n"
        "sources: {X: 'test'}\n"
        "concepts:\n"
        "  - {system: rxnorm, code: '6902', status: UNVERIFIED, source: [X], properties: {class: glucocorticoid}}\n",
        encoding="utf-8",
    )
    with pytest.raises(RulesError):
        Terminology.load(directory)


def test_unverified_code_with_unverified_ok_loads(tmp_path: Path) -> None:
    directory = _copy_systems(tmp_path)
    (directory / "ok.yaml").write_text(
        "id: ok\n"
        "sources: {X: 'test'}\n"
        "concepts:\n"
        "  - {system: rxnorm, code: '6902', status: UNVERIFIED, unverified_ok: true, note: why,\n"
        "     source: [X], properties: {class: glucocorticoid}}\n",
        encoding="utf-8",
    )
    term = Terminology.load(directory)
    assert term.lookup("ok", RXNORM, "6902").status == "UNVERIFIED"


# --------------------------------------------------------------------------- remembered look-ups


def _codeables(term: Terminology) -> list:
    """Codes of every value set, in every spelling the look-ups accept, and junk."""
    out: list = [None, {}, [], "x", 5, {"coding": None}, {"coding": "abc"}, {"coding": [None, 3]}, {"code": "38267-1"}]
    for vs_id in term.valueset_ids:
        vs = term.valueset(vs_id)
        for concept in list(vs.exact.values())[:40] + vs.prefixes[:10]:
            coding = {"system": concept.system, "code": concept.code}
            out += [coding, {"coding": [coding]}, [coding], {"coding": [{"system": "urn:x", "code": "1"}, coding]},
                    {"coding": [coding, {"system": "http://loinc.org", "code": "38267-1"}]},
                    {"coding": [{"system": concept.system, "code": concept.code + "9"}]},
                    {"coding": [{"system": concept.system, "code": 1}, {"system": concept.system, "code": True}]}]
    return out


def test_firsts_is_first_for_each_value_set(term: Terminology) -> None:
    vs_ids = ("dxa", "observations", "conditions")
    for codeable in _codeables(term):
        for _ in range(2):  # the second time from the remembered answers
            assert term.firsts(vs_ids, codeable) == tuple(term.first(v, codeable) for v in vs_ids), codeable


def test_remembered_lookups_equal_fresh_ones(term: Terminology) -> None:
    fresh = Terminology.load(term.valueset("dxa").path.parent)
    for codeable in _codeables(term):
        for vs_id in term.valueset_ids:
            assert term.match(vs_id, codeable) == fresh.match(vs_id, codeable)
            assert term.match(vs_id, codeable) == fresh.match(vs_id, codeable)


def test_numbers_and_booleans_are_not_confused_in_the_cache(term: Terminology) -> None:
    loinc = "http://loinc.org"
    assert term.lookup("dxa", loinc, "38267-1") is not None
    assert term.lookup("dxa", loinc, 1) is None and term.lookup("dxa", loinc, True) is None
