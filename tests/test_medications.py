"""Medications as real records send them: by reference, in other files, coded only in text.

Every worked example of fixtures/bundles is assessed again in two variants built here, at
test time (no fixture files are added):

- "referenced Medication": every medication's `medicationCodeableConcept` moves into a
  Medication resource that the MedicationStatement/Request/Administration references, in the
  same Bundle (urn:uuid, relative, absolute and versioned references, before or after the
  referring entry) or in an NDJSON Medication file of its own: the same result;
- "only text": every aromatase-inhibitor coding is replaced by the drug's name in text:
  the same result, plus the flag `medication-by-text`.

And the unhappy paths: a reference to a Medication that is nowhere in the input keeps the
patient visible, flagged `medication-unresolved`, with a warning.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from fhir_aibl.cli import main
from fhir_aibl.references import MedicationIndex, parse_reference
from fhir_aibl.sources import iter_records, read_paths
from fhir_aibl.terminology import default_terminology

from .conftest import FIXTURES

EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
VECTORS = sorted(EXPECTED)
MED_TYPES = ("MedicationStatement", "MedicationRequest", "MedicationAdministration")
FIELDS = ("ai_status", "category", "risk_factors", "recommendations", "flags")
# How the referenced variant names the Medication, cycled over the vectors.
FORMS = ("urn", "relative", "absolute", "versioned")


def _bundle(vector: str) -> dict:
    return json.loads((FIXTURES / "bundles" / f"{vector}.json").read_text())


def _is_ai(codeable) -> bool:
    term = default_terminology()
    return any(c.get("class") == "aromatase-inhibitor" for c in term.match("medications", codeable))


def referenced_variant(bundle: dict, form: str, *, medications_first: bool) -> dict:
    """The bundle with every medicationCodeableConcept moved into a referenced Medication entry."""
    out = copy.deepcopy(bundle)
    meds: list[dict] = []
    for entry in out["entry"]:
        res = entry["resource"]
        if res["resourceType"] not in MED_TYPES or "medicationCodeableConcept" not in res:
            continue
        mid = f"{res['id']}-med"
        med = {"resourceType": "Medication", "id": mid, "code": res.pop("medicationCodeableConcept")}
        if form == "urn":
            uuid = f"urn:uuid:7d1b0c1e-0000-4000-8000-{abs(hash(mid)) % 10**12:012d}"
            del med["id"]  # a transaction-style entry: its id comes from the fullUrl
            meds.append({"fullUrl": uuid, "resource": med})
            ref = uuid
        else:
            meds.append({"fullUrl": f"https://ehr.example/fhir/Medication/{mid}", "resource": med})
            ref = {
                "relative": f"Medication/{mid}",
                "absolute": f"https://ehr.example/fhir/Medication/{mid}",
                "versioned": f"Medication/{mid}/_history/1",
            }[form]
        res["medicationReference"] = {"reference": ref}
    out["entry"] = meds + out["entry"] if medications_first else out["entry"] + meds
    return out


def text_variant(bundle: dict) -> tuple[dict, bool]:
    """The bundle with every aromatase-inhibitor coding replaced by the drug's name; (bundle, flag expected)."""
    out = copy.deepcopy(bundle)
    flagged = False
    term = default_terminology()
    for entry in out["entry"]:
        res = entry["resource"]
        code = res.get("medicationCodeableConcept")
        if res["resourceType"] not in MED_TYPES or not _is_ai(code):
            continue
        ingredient = next(c.get("ingredient") for c in term.match("medications", code) if c.get("ingredient"))
        res["medicationCodeableConcept"] = {"text": f"{ingredient.upper()} 1 tablet daily"}
        flagged = flagged or res.get("status") != "entered-in-error"
    return out, flagged


def _assess(capsys, *paths) -> tuple[int, list[dict], str]:
    code = main(["assess", *map(str, paths), "--as-of", "2026-06-01", "--format", "json"])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def _want(vector: str, extra_flags=()) -> dict:
    want = {k: EXPECTED[vector][k] for k in FIELDS}
    want["flags"] = sorted(set(want["flags"]) | set(extra_flags))
    return want


def _got(result: dict) -> dict:
    got = {k: result[k] for k in FIELDS}
    for k in ("risk_factors", "recommendations", "flags"):
        got[k] = sorted(got[k])
    return got


@pytest.mark.parametrize("vector", VECTORS)
def test_referenced_medication_variant(vector, tmp_path, capsys):
    i = VECTORS.index(vector)
    bundle = referenced_variant(_bundle(vector), FORMS[i % len(FORMS)], medications_first=bool(i % 2))
    path = tmp_path / f"{vector}.json"
    path.write_text(json.dumps(bundle))
    code, [result], err = _assess(capsys, path)
    assert code == 0, err
    assert _got(result) == _want(vector), EXPECTED[vector]["note"]
    assert "medication-unresolved" not in err


@pytest.mark.parametrize("vector", VECTORS)
def test_text_only_variant(vector, tmp_path, capsys):
    bundle, flagged = text_variant(_bundle(vector))
    path = tmp_path / f"{vector}.json"
    path.write_text(json.dumps(bundle))
    code, [result], err = _assess(capsys, path)
    assert code == 0, err
    assert _got(result) == _want(vector, ["medication-by-text"] if flagged else []), EXPECTED[vector]["note"]
    if flagged:
        assert "recognised by its name only" in err


def _ndjson_layout(vectors) -> dict[str, list[dict]]:
    """The vectors' resources by type, as a Bulk export has them (patient references already
    plain `Patient/<id>`: read through the file source), medications by relative reference."""
    by_type: dict[str, list[dict]] = {}
    for vector in vectors:
        [record] = read_paths(FIXTURES / "bundles" / f"{vector}.json", validate=False).patients
        bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in record.resources]}
        for entry in referenced_variant(bundle, "relative", medications_first=False)["entry"]:
            by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    return by_type


def test_all_vectors_as_ndjson_with_a_separate_medication_file(tmp_path, capsys):
    """A Bulk-export layout: one file per type, the Medications (no patient) in their own file, read first."""
    by_type = _ndjson_layout(VECTORS)
    assert by_type["Medication"], "no medication moved"
    # "A-Medication" sorts before every other file: the Medications are read before anything refers to them;
    # "Z-Medication" would be read last; both must work.
    for name in ("A-Medication", "Z-Medication"):
        folder = tmp_path / name
        folder.mkdir()
        for rtype, resources in by_type.items():
            fname = f"{name}.ndjson" if rtype == "Medication" else f"{rtype}.ndjson"
            (folder / fname).write_text("".join(json.dumps(r) + "\n" for r in resources))
        code, results, err = _assess(capsys, folder)
        assert code == 0, err
        got = {r["patient"]: r for r in results}
        for vector in VECTORS:
            assert _got(got[f"Patient/{vector.lower()}"]) == _want(vector), (name, vector)


def test_spilled_index_resolves_the_same(tmp_path):
    """The two-pass reader spills its index to disk on big inputs; Medications resolve all the same."""
    folder = tmp_path / "bulk"
    folder.mkdir()
    for rtype, rows in _ndjson_layout(VECTORS[:10]).items():
        (folder / f"{rtype}.ndjson").write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = [r for r in iter_records([folder], spool_limit=3) if hasattr(r, "resources")]
    big = [r for r in iter_records([folder]) if hasattr(r, "resources")]
    assert [r.resources for r in small] == [r.resources for r in big]
    contained = [
        res for r in big for res in r.resources if res["resourceType"] in MED_TYPES and res.get("contained")
    ]
    assert contained and all(res["medicationReference"]["reference"].startswith("#") for res in contained)


def _ai_only_by_reference(reference: str | dict, *, with_medication: dict | None = None) -> dict:
    entries = [
        {"resource": {"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1960-01-01"}},
        {
            "resource": {
                "resourceType": "MedicationStatement",
                "id": "ms1",
                "status": "active",
                "subject": {"reference": "Patient/p1"},
                "effectivePeriod": {"start": "2025-01-01"},
                "medicationReference": reference if isinstance(reference, dict) else {"reference": reference},
            }
        },
    ]
    if with_medication is not None:
        entries.append({"resource": with_medication})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def test_unresolved_reference_keeps_the_patient_visible_and_flagged(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_ai_only_by_reference("Medication/nowhere")))
    code, [result], err = _assess(capsys, path)
    assert code == 0
    assert result["patient"] == "Patient/p1"
    assert result["ai_status"] == "none"  # nothing says which drug: not guessed
    assert result["flags"] == ["medication-unresolved"]
    assert "MED-FLAG-UNRESOLVED" in result["rules"]
    assert "MedicationStatement/ms1: its medication (Medication/nowhere) could not be found" in err


@pytest.mark.parametrize(
    "reference",
    ["#missing", "urn:uuid:0b8c2c9e-1f00-4d8e-9a44-000000000001", {"identifier": {"system": "urn:oid:2.16.840.1.113883.2.4.4.7", "value": "2076667"}}],
)
def test_other_unresolvable_forms_are_flagged(reference, tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_ai_only_by_reference(reference)))
    _code, [result], _err = _assess(capsys, path)
    assert result["flags"] == ["medication-unresolved"]


def test_entered_in_error_unresolved_is_not_flagged(tmp_path, capsys):
    bundle = _ai_only_by_reference("Medication/nowhere")
    bundle["entry"][1]["resource"]["status"] = "entered-in-error"
    path = tmp_path / "p.json"
    path.write_text(json.dumps(bundle))
    _code, [result], _err = _assess(capsys, path)
    assert result["flags"] == []


def test_reference_to_a_medication_the_rules_do_not_read_is_resolved_not_flagged(tmp_path, capsys):
    metformin = {
        "resourceType": "Medication",
        "id": "met",
        "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "6809", "display": "metformin"}]},
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_ai_only_by_reference("Medication/met", with_medication=metformin)))
    _code, [result], err = _assess(capsys, path)
    assert result["ai_status"] == "none" and result["flags"] == []
    assert "could not be found" not in err


def test_ingredient_item_reference_counts_as_a_code(tmp_path, capsys):
    """A Medication whose only code is its ingredient, given by reference to a Substance."""
    substance = {
        "resourceType": "Substance",
        "id": "sub-ana",
        "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "84857"}]},
    }
    medication = {
        "resourceType": "Medication",
        "id": "tab",
        "code": {"text": "tablet 1 mg"},
        "ingredient": [{"itemReference": {"reference": "Substance/sub-ana"}}],
    }
    bundle = _ai_only_by_reference("Medication/tab", with_medication=medication)
    bundle["entry"].insert(0, {"resource": substance})
    path = tmp_path / "p.json"
    path.write_text(json.dumps(bundle))
    _code, [result], _err = _assess(capsys, path)
    assert result["ai_status"] == "active"
    assert result["flags"] == []


def test_text_never_removes_a_coded_drug(tmp_path, capsys):
    """A coded anastrozole whose text says something else is still anastrozole, without a flag."""
    med = {
        "resourceType": "Medication",
        "id": "m",
        "code": {"text": "tamoxifen", "coding": [{"system": "http://www.whocc.no/atc", "code": "L02BG03"}]},
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_ai_only_by_reference("Medication/m", with_medication=med)))
    _code, [result], _err = _assess(capsys, path)
    assert result["ai_status"] == "active" and "medication-by-text" not in result["flags"]


@pytest.mark.parametrize("text", ["ARIMIDEX 1mg", "femara", "Aromasin 25 mg", "Letrozol Sandoz 2,5 mg", "reference display only"])
def test_brand_and_national_names_in_any_case(text, tmp_path, capsys):
    bundle = _ai_only_by_reference("Medication/nowhere")
    ref = bundle["entry"][1]["resource"]["medicationReference"]
    if text == "reference display only":
        ref["display"], text = "Anastrozole 1 mg", None
    else:
        bundle["entry"].append({"resource": {"resourceType": "Medication", "id": "nowhere", "code": {"text": text}}})
    path = tmp_path / "p.json"
    path.write_text(json.dumps(bundle))
    _code, [result], _err = _assess(capsys, path)
    assert result["ai_status"] == "active"
    assert "medication-by-text" in result["flags"]


def test_no_cross_talk_between_patients_sharing_a_medication(tmp_path):
    """Two patients reference one Medication: each gets their own copy, nothing of the other."""
    med = {"resourceType": "Medication", "id": "shared", "code": {"coding": [{"system": "http://www.whocc.no/atc", "code": "L02BG04"}]}}
    a = _ai_only_by_reference("Medication/shared", with_medication=med)
    b = copy.deepcopy(_ai_only_by_reference("Medication/shared"))
    b["entry"][0]["resource"]["id"] = "p2"
    b["entry"][1]["resource"].update(id="ms2", subject={"reference": "Patient/p2"})
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    result = read_paths([tmp_path])
    assert not result.problems
    for record in result.patients:
        [stmt] = [r for r in record.resources if r["resourceType"] == "MedicationStatement"]
        assert stmt["subject"]["reference"] == record.patient_ref
        assert [c["id"] for c in stmt["contained"]] == ["shared"]


def test_parse_reference_forms():
    urns = {"urn:uuid:abc": ("Medication", "abc")}
    assert parse_reference("Medication/1") == ("Medication", "1")
    assert parse_reference("Medication/1/_history/3") == ("Medication", "1")
    assert parse_reference("https://x.example/fhir/R4/Medication/1") == ("Medication", "1")
    assert parse_reference("urn:uuid:abc", urns) == ("Medication", "abc")
    assert parse_reference("urn:uuid:zzz", urns) is None
    assert parse_reference("#m1") == ("#", "m1")
    assert parse_reference("#") is None and parse_reference("") is None and parse_reference(None) is None


def test_index_never_modifies_its_input():
    med = {"resourceType": "Medication", "id": "m", "code": {"text": "anastrozole"}}
    stmt = {"resourceType": "MedicationRequest", "id": "r", "medicationReference": {"reference": "Medication/m"}}
    before = copy.deepcopy((med, stmt))
    index = MedicationIndex()
    index.add(med)
    inlined = index.inline(stmt)
    assert (med, stmt) == before
    assert inlined["medicationReference"]["reference"] == "#m" and inlined["contained"][0]["code"] == med["code"]
    assert index.unresolved(stmt) == [] and index.unresolved({"medicationReference": {"reference": "Medication/x"}}) == [("Medication", "x")]


def test_compact_index_remembers_unread_medications_as_seen():
    term = default_terminology()
    from fhir_aibl.sources import _medication_keep

    index = MedicationIndex(keep=_medication_keep(term))
    index.add({"resourceType": "Medication", "id": "met", "code": {"text": "metformin"}})
    index.add({"resourceType": "Medication", "id": "ana", "code": {"text": "anastrozole"}})
    assert index.get("Medication", "met") is None and index.knows("Medication", "met")
    assert index.get("Medication", "ana") is not None
    assert not index.knows("Medication", "other")


def test_fhir_r4_spec_examples_resolve_every_medication_reference():
    """The FHIR R4 specification's examples (../shared/data): MedicationRequests and
    MedicationStatements naming `Medication/medNNNN` held in separate files of the folder."""
    root = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fhir-r4-spec-examples"
    if not root.is_dir():
        pytest.skip("../shared/data/fhir-r4-spec-examples is not beside the project")
    originally = {}
    for path in root.glob("Medication*.json"):
        res = json.loads(path.read_text())
        ref = (res.get("medicationReference") or {}).get("reference")
        if res.get("resourceType") in MED_TYPES and ref:
            originally[(res["resourceType"], res["id"])] = ref
    from_elsewhere = {k for k, ref in originally.items() if not ref.startswith("#")}
    assert from_elsewhere, "the examples reference Medications in other files"
    result = read_paths([root])
    seen = set()
    for record in result.patients:
        for res in record.resources:
            key = (res["resourceType"], res.get("id"))
            if key in originally:
                seen.add(key)
                assert res["medicationReference"]["reference"].startswith("#"), key  # resolved, contained
    assert from_elsewhere <= seen


# --------------------------------------------------------------------------- third-party shapes

# The HL7 International Patient Summary example IPS-bundle-01 (HL7/fhir-ips,
# input/fsh/instances/IPS-bundle-01.fsh at commit 7bd05b66194c6e713147f1687372d8071943231f):
# a document Bundle of urn:uuid entries; Martha DeLarosa, female, born 1972-05-01; a
# MedicationStatement (active since 2015-03) whose medicationReference is the urn:uuid of a
# Medication coded SNOMED CT 108774000, two Dutch G-Standaard codes and ATC L02BG03; breast
# cancer in remission. The shape is rebuilt here from that description (the file is not copied).
IPS_PATIENT = "urn:uuid:2b90dd2b-2dab-4c75-9bb9-a355e07401e8"
IPS_MEDICATION = "urn:uuid:976d0804-cae0-45ae-afe3-a19f3ceba6bc"
SCT_ANASTROZOLE = {"system": "http://snomed.info/sct", "code": "108774000", "display": "Product containing anastrozole (medicinal product)"}
NL_HPK = {"system": "urn:oid:2.16.840.1.113883.2.4.4.1", "code": "99872", "display": "ANASTROZOL 1MG TABLET"}
NL_PRK = {"system": "urn:oid:2.16.840.1.113883.2.4.4.7", "code": "2076667", "display": "ANASTROZOL CF TABLET FILMOMHULD 1MG"}
ATC_ANASTROZOLE = {"system": "http://www.whocc.no/atc", "code": "L02BG03", "display": "anastrozole"}


def ips_bundle(codings: list[dict]) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "document",
        "entry": [
            {
                "fullUrl": IPS_PATIENT,
                "resource": {"resourceType": "Patient", "gender": "female", "birthDate": "1972-05-01", "active": True},
            },
            {
                "fullUrl": "urn:uuid:c220e36c-eb67-4fc4-9ba1-2fabc52acec6",
                "resource": {
                    "resourceType": "MedicationStatement",
                    "status": "active",
                    "medicationReference": {"reference": IPS_MEDICATION},
                    "subject": {"reference": IPS_PATIENT},
                    "effectivePeriod": {"start": "2015-03"},
                },
            },
            {"fullUrl": IPS_MEDICATION, "resource": {"resourceType": "Medication", "code": {"coding": codings}}},
            {
                "fullUrl": "urn:uuid:c4597aa2-688a-401b-a658-70acc6de28c6",
                "resource": {
                    "resourceType": "Condition",
                    "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "remission"}]},
                    "code": {"coding": [{"system": "http://snomed.info/sct", "code": "254837009", "display": "Malignant tumor of breast"}]},
                    "subject": {"reference": IPS_PATIENT},
                    "onsetDateTime": "2015-01",
                },
            },
        ],
    }


@pytest.mark.parametrize(
    "codings, flags",
    [
        ([SCT_ANASTROZOLE, NL_HPK, NL_PRK, ATC_ANASTROZOLE], []),  # as the IPS example has it
        ([SCT_ANASTROZOLE], []),
        ([ATC_ANASTROZOLE], []),
        ([NL_HPK, NL_PRK], ["medication-by-text"]),  # national codes only: through their display, flagged
    ],
)
def test_ips_shaped_bundle(codings, flags, tmp_path, capsys):
    path = tmp_path / "ips.json"
    path.write_text(json.dumps(ips_bundle(codings)))
    code, [result], err = _assess(capsys, path)
    assert code == 0, err
    assert result["patient"] == "Patient/2b90dd2b-2dab-4c75-9bb9-a355e07401e8"
    assert result["ai_status"] == "active"
    assert result["category"] == "indeterminate" and "dxa-now" in result["recommendations"]
    assert [f for f in result["flags"] if f.startswith("medication-")] == flags


@pytest.mark.parametrize("spelling", ["62559-670-30", "62559067030", "0062559-670-30"])
def test_ndc_spellings(spelling, tmp_path, capsys):
    """The 10-digit hyphenated NDC and its 11-digit form are one code; a malformed one is not."""
    term = default_terminology()
    coding = {"system": "http://hl7.org/fhir/sid/ndc", "code": spelling}
    hits = term.match("medications", {"coding": [coding]})
    if spelling == "0062559-670-30":
        assert not hits
    else:
        assert [h.get("ingredient") for h in hits] == ["anastrozole"]


def test_new_codes_carry_a_source_and_a_verification_status():
    vs = default_terminology().valueset("medications")
    sources = vs.data["sources"]
    for entry in vs.data["concepts"]:
        assert entry.get("source") and all(s in sources for s in entry["source"]), entry
        assert entry.get("status") in ("V", "V2", "UNVERIFIED"), entry


def test_prolia_by_ndc_is_denosumab_60mg():
    term = default_terminology()
    [hit] = term.match("medications", {"coding": [{"system": "http://hl7.org/fhir/sid/ndc", "code": "55513071001"}]})
    assert hit.get("class") == "denosumab" and hit.get("formulation") == "prolia-60mg" and hit.get("route") == "sc"


def test_an_ingredient_reference_to_nothing_is_flagged(tmp_path, capsys):
    medication = {
        "resourceType": "Medication",
        "id": "tab",
        "code": {"text": "tablet 1 mg"},
        "ingredient": [{"itemReference": {"reference": "Substance/nowhere"}}],
    }
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_ai_only_by_reference("Medication/tab", with_medication=medication)))
    _code, [result], _err = _assess(capsys, path)
    assert result["ai_status"] == "none" and result["flags"] == ["medication-unresolved"]
