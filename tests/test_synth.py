"""`fhir-aibl synth`: deterministic, Bulk-shaped, covering every category, messy like real data."""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
from pathlib import Path

import pytest

from fhir_aibl import synth
from fhir_aibl.assess import Assessor
from fhir_aibl.cli import main as cli_main

AS_OF = "2026-06-01"
#: A population of a few hundred: every category must show up in it.
POPULATION = 240


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    return synth.run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def population(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("population")
    summary = synth.generate(synth.SynthSettings(patients=POPULATION, seed=7, out=out))
    assert summary.patients == POPULATION
    return out


@pytest.fixture(scope="module")
def resources(population) -> dict[str, list[dict]]:
    """Resource type -> every resource, Bundle entries unpacked (as the reader sees them)."""
    out: dict[str, list[dict]] = collections.defaultdict(list)
    for path in population.glob("*.ndjson"):
        for res in lines(path):
            if res["resourceType"] == "Bundle":
                for entry in res["entry"]:
                    out[entry["resource"]["resourceType"]].append(entry["resource"])
            else:
                out[res["resourceType"]].append(res)
    return out


@pytest.fixture(scope="module")
def assessed(population) -> list[dict]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = cli_main(["assess", str(population), "--as-of", AS_OF, "--format", "json"])
    assert status == 0  # every generated resource is valid FHIR R4 and belongs to a patient
    return json.loads(buffer.getvalue())


# --------------------------------------------------------------------------- determinism and layout


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        synth.generate(synth.SynthSettings(patients=12, seed=seed, out=out))
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_patient_i_does_not_depend_on_the_population_size(tmp_path):
    small, large = tmp_path / "small", tmp_path / "large"
    synth.generate(synth.SynthSettings(patients=5, seed=9, out=small))
    synth.generate(synth.SynthSettings(patients=9, seed=9, out=large))
    for path in small.iterdir():
        head = (large / path.name).read_bytes()[: path.stat().st_size]
        assert head == path.read_bytes(), path.name


def test_the_reference_date_moves_every_date(tmp_path):
    synth.generate(synth.SynthSettings(patients=3, seed=1, out=tmp_path / "a", as_of=synth.DEFAULT_AS_OF))
    synth.generate(synth.SynthSettings(patients=3, seed=1, out=tmp_path / "b", as_of=synth.dt.date(2030, 1, 1)))
    pa = lines(tmp_path / "a" / "Patient.000.ndjson")
    pb = lines(tmp_path / "b" / "Patient.000.ndjson")
    assert [p["id"] for p in pa] == [p["id"] for p in pb]
    assert all(x["birthDate"] < y["birthDate"] for x, y in zip(pa, pb))


def test_bulk_layout_one_file_per_resource_type(population):
    names = sorted(p.name for p in population.iterdir())
    assert names == sorted(synth.RESOURCE_FILES.values())
    for path in population.iterdir():
        rtype = path.name.split(".")[0]
        assert {res["resourceType"] for res in lines(path)} == {rtype}


def test_every_patient_has_50_to_300_resources(population):
    per_patient: collections.Counter = collections.Counter()
    for path in population.glob("*.ndjson"):
        for res in lines(path):
            if res["resourceType"] == "Bundle":
                per_patient[res["entry"][0]["fullUrl"]] += len(res["entry"])
            elif res["resourceType"] == "Patient":
                per_patient[res["id"]] += 1
            else:
                ref = (res.get("subject") or res.get("patient"))["reference"]
                per_patient[ref.split("Patient/")[1].split("/")[0]] += 1
    assert len(per_patient) == POPULATION
    assert min(per_patient.values()) >= synth.MIN_RESOURCES
    assert max(per_patient.values()) <= synth.MAX_RESOURCES
    assert 110 <= sum(per_patient.values()) / POPULATION <= 190  # about 150 on average


# --------------------------------------------------------------------------- clinical coverage


def test_every_category_and_ai_status_appears(assessed):
    assert len(assessed) == POPULATION
    categories = collections.Counter(a["category"] for a in assessed)
    statuses = collections.Counter(a["ai_status"] for a in assessed)
    assert set(categories) == {"high", "moderate", "low", "indeterminate", "not-applicable"}
    assert set(statuses) == {"active", "planned", "stopped", "none"}
    # realistic proportions: about half on an AI now, a minority in each rarer group
    assert 0.40 <= statuses["active"] / POPULATION <= 0.70
    assert all(categories[c] >= 0.04 * POPULATION for c in categories)
    # every risk factor of RF0 and the data-quality flags real data raises
    factors = {f for a in assessed for f in a["risk_factors"]}
    assert {"age-over-65", "low-bmi", "smoking", "parental-hip-fracture"} <= factors
    flags = {f for a in assessed for f in a["flags"]}
    assert {"dxa-stale", "osteoporosis-by-dxa", "low-with-rf"} <= flags


# --------------------------------------------------------------------------- messiness


def codes(resources: list[dict], element: str) -> set[str]:
    return {c["code"] for r in resources for c in (r.get(element) or {}).get("coding", [])}


def test_product_and_brand_rxnorm_codes_in_statements_and_requests(resources):
    statement_codes = codes(resources["MedicationStatement"], "medicationCodeableConcept")
    request_codes = codes(resources["MedicationRequest"], "medicationCodeableConcept")
    ai_products = {"199224", "200064", "310261"}  # SCD
    ai_brands = {"151124", "262485", "203769", "262105"}  # SBD, BN
    assert statement_codes & ai_products and request_codes & ai_products
    assert (statement_codes | request_codes) & ai_brands
    assert {"904419", "993449"} & (statement_codes | request_codes)  # alendronate product, denosumab


def test_reference_forms(resources):
    refs = [r["subject"]["reference"] for r in resources["Observation"]]
    assert any(ref.startswith("Patient/") and "/_history/" not in ref for ref in refs)
    assert any(ref.startswith("urn:uuid:") for ref in refs)
    assert any(ref.startswith("https://") for ref in refs)
    assert any("/_history/" in ref for ref in refs)


def test_several_dxa_scans_over_years_and_entered_in_error_records(resources):
    scans: dict[str, set[str]] = collections.defaultdict(set)
    for obs in resources["Observation"]:
        if obs["code"]["coding"][0]["code"] in ("38267-1", "38264-8", "38263-0"):
            scans[obs["subject"]["reference"]].add(obs["effectiveDateTime"][:4])
    assert sum(1 for years in scans.values() if len(years) >= 2) >= 0.15 * POPULATION
    fn = [o for o in resources["Observation"] if o["code"]["coding"][0]["code"] == "38263-0"]
    assert fn and all(o["bodySite"]["coding"][0]["code"] == "29627003" for o in fn)
    assert any(o["status"] == "entered-in-error" for o in resources["Observation"])
    assert any(m["status"] == "entered-in-error" for m in resources["MedicationStatement"])
    assert any(c["verificationStatus"]["coding"][0]["code"] in ("refuted", "entered-in-error") for c in resources["Condition"])
    smoking = {o["valueCodeableConcept"]["coding"][0]["code"] for o in resources["Observation"]
               if o["code"]["coding"][0]["code"] == "72166-2"}
    assert {"266919005", "8517006", "449868002"} <= smoking


def test_unrelated_observations_are_most_of_the_volume(resources):
    terminology = Assessor().terminology
    total = sum(len(v) for v in resources.values())
    unrelated = [
        o for o in resources["Observation"]
        if not (terminology.first("dxa", o["code"]) or terminology.first("observations", o["code"]))
    ]
    assert len(unrelated) > total / 2


# --------------------------------------------------------------------------- the command


def test_command_writes_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "pop"
    assert command(["--patients", "3", "--seed", "2", "--out", str(out)]) == 0
    assert "3 patients" in capsys.readouterr().out
    before = digest(out)
    assert command(["--patients", "3", "--seed", "5", "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert digest(out) == before  # nothing touched
    assert command(["--patients", "3", "--seed", "5", "--out", str(out), "--force"]) == 0
    assert digest(out) != before


def test_command_rejects_bad_arguments(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synth.add_arguments(parser)
    for argv in (["--patients", "0", "--out", "x"], ["--patients", "many", "--out", "x"], ["--as-of", "June", "--out", "x"], []):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args(argv)
        assert exc.value.code == 2
    (tmp_path / "file").write_text("not a directory")
    assert command(["--patients", "1", "--out", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().err
