"""Terminology as data, reviewed: UNVERIFIED codes stay flagged, every drug of CLINICAL.md 3.4 maps to its ingredient."""

from __future__ import annotations

import shutil

import pytest
import yaml

from fhir_aibl.assess import DEFAULT_RULES
from fhir_aibl.errors import RulesError
from fhir_aibl.terminology import Terminology

from .conftest import shared

VALUESETS = DEFAULT_RULES.parent / "valuesets"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"

# CLINICAL.md 3.4: ingredient -> (RxNorm IN, ATC)
SECTION_3_4 = {
    "anastrozole": ("84857", "L02BG03"), "letrozole": ("72965", "L02BG04"), "exemestane": ("258494", "L02BG06"),
    "tamoxifen": ("10324", "L02BA01"), "alendronate": ("46041", "M05BA04"), "risedronate": ("73056", "M05BA07"),
    "ibandronate": ("115264", "M05BA06"), "zoledronic-acid": ("77655", "M05BA08"), "denosumab": ("993449", "M05BX04"),
    "prednisone": ("8640", "H02AB07"), "prednisolone": ("8638", "H02AB06"), "dexamethasone": ("3264", "H02AB02"),
    "hydrocortisone": ("5492", "H02AB09"), "goserelin": ("50610", "L02AE03"), "leuprolide": ("42375", "L02AE02"),
}


def test_unverified_list_matches_the_specification():
    clinical = shared(".").parent / "CLINICAL.md"  # ../shared/CLINICAL.md, beside data/
    if not clinical.exists():
        pytest.skip("../shared/CLINICAL.md is not beside the project")
    lines = [line for line in clinical.read_text().splitlines() if "UNVERIFIED" in line]
    listed = yaml.safe_load((VALUESETS / "unverified.yaml").read_text())["codes"]
    for entry in listed:
        assert any(str(entry["code"]) in line for line in lines), f"{entry['code']} is not marked UNVERIFIED in CLINICAL.md"


def test_an_unverified_code_passed_off_as_verified_is_refused(tmp_path):
    target = tmp_path / "valuesets"
    shutil.copytree(VALUESETS, target)
    meds = (target / "medications.yaml").read_text()
    meds = meds.replace('code: "6902", display: "methylprednisolone", status: UNVERIFIED, unverified_ok: true',
                        'code: "6902", display: "methylprednisolone", status: V')
    (target / "medications.yaml").write_text(meds)
    with pytest.raises(RulesError, match="6902 is marked UNVERIFIED in the specification"):
        Terminology.load(target)


@pytest.mark.parametrize("ingredient", sorted(SECTION_3_4))
def test_every_drug_of_section_3_4_maps_to_its_ingredient(assessor, ingredient):
    rxnorm, atc = SECTION_3_4[ingredient]
    term = assessor.terminology
    by_in = term.lookup("medications", RXNORM, rxnorm)
    by_atc = term.lookup("medications", ATC, atc)
    assert by_in is not None and by_in.get("ingredient") == ingredient
    assert by_atc is not None and by_atc.get("ingredient") == ingredient
    products = [c for c in term.valueset("medications").exact.values()
                if c.get("ingredient") == ingredient and c.system == RXNORM and c.code != rxnorm]
    if ingredient in ("anastrozole", "letrozole", "exemestane", "alendronate", "denosumab", "goserelin"):
        assert products, f"no product or brand code maps to {ingredient}"
