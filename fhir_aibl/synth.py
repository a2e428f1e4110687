"""`fhir-aibl synth`: a deterministic synthetic population in FHIR R4 Bulk Data NDJSON layout.

    fhir-aibl synth --patients N --seed S --out DIR [--as-of YYYY-MM-DD] [--force]

Writes one NDJSON file per resource type into DIR (`Patient.000.ndjson`,
`Observation.000.ndjson`, `Condition.000.ndjson`, `MedicationStatement.000.ndjson`,
`MedicationRequest.000.ndjson`, `FamilyMemberHistory.000.ndjson`, `Encounter.000.ndjson`,
`Bundle.000.ndjson`), the layout of a Bulk Data `$export`, so that `fhir-aibl assess DIR`
reads it and the benchmarks (`bench/`) can drive every stage with it.

What the population is for
--------------------------
It drives benchmarks and tests, so it must exercise what real records do to the reader
and the rules, at realistic volume, and be byte-for-byte reproducible:

- every output category of docs/clinical-specification.md section 0 (`high`, `moderate`, `low`,
  `indeterminate`, `not-applicable`) and every `ai_status` (`active`, `planned`, `stopped`,
  `none`), in proportions like an oncology cohort's (about half on an AI, a fifth with
  none, one in six having stopped, one in twelve about to start; T-scores around -1.1 with
  the spread of AI-treated postmenopausal women);
- the messiness of real data: product (SCD), branded (SBD), brand-name (BN) and ingredient
  RxNorm codes, sometimes with an ATC coding beside them; aromatase inhibitors both as
  MedicationStatement and as MedicationRequest; several DXA scans over years (some stale,
  some forearm-only in Synthea's style, some BMD without a T-score, femoral neck told
  from total hip only by `bodySite`); entered-in-error and refuted records; an amended
  DXA result sent twice with two `meta.versionId`s; relative, absolute and versioned
  patient references, and about one patient in twenty delivered as a transaction Bundle
  (one line of `Bundle.000.ndjson`) whose references are `urn:uuid:` fullUrls;
- mostly data the rules do not use: vital signs at every visit, laboratory panels, unrelated
  conditions and medications, Encounters; 50 to 300 resources per patient (about 150 on
  average).

Codes come from `rules/valuesets/*.yaml` (every code this module emits for a concept the
rules read is listed there) and, for the unrelated data, from the codes Synthea uses.

Determinism: patient i is generated from `random.Random(f"{seed}/{i}")` alone and every date
is counted back from `--as-of` (default 2026-06-01, the date of the worked examples), never
from the clock; so the same arguments give the same bytes, and the first N patients of a
larger population are the same N patients.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from .errors import AiblError

__all__ = [
    "DEFAULT_AS_OF",
    "RESOURCE_FILES",
    "SynthError",
    "SynthSettings",
    "SynthSummary",
    "add_arguments",
    "generate",
    "patient_resources",
    "run",
]

#: The reference date of the worked examples (docs/clinical-specification.md section 5); dates are counted back from it.
DEFAULT_AS_OF = dt.date(2026, 6, 1)

#: Resource type -> file name, in the Bulk Data `$export` style (`<Type>.<part>.ndjson`).
RESOURCE_FILES = {
    rtype: f"{rtype}.000.ndjson"
    for rtype in (
        "Patient",
        "Encounter",
        "Observation",
        "Condition",
        "MedicationStatement",
        "MedicationRequest",
        "FamilyMemberHistory",
        "Bundle",
    )
}

#: Records outside [MIN, MAX] resources are topped up with visits or trimmed of old unrelated data.
MIN_RESOURCES, MAX_RESOURCES = 50, 300


class SynthError(AiblError):
    """The population cannot be written (the output directory is not usable)."""

    code = "synth-output"
    issue_type = "processing"


@dataclass(frozen=True)
class SynthSettings:
    #: how many patients
    patients: int = 1000
    #: the seed; patient i is drawn from random.Random(f"{seed}/{i}")
    seed: int = 1
    #: output directory (created if missing)
    out: Path = Path("out/synth")
    #: reference date every generated date is counted back from
    as_of: dt.date = DEFAULT_AS_OF
    #: overwrite NDJSON files already in `out`
    force: bool = False


@dataclass
class SynthSummary:
    patients: int
    resources: int
    files: dict[str, int]  #: file name -> lines
    bytes: int


# =========================================================================== code tables
# (system, code, display). Systems as docs/clinical-specification.md section 3 gives them.

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
ATC = "http://www.whocc.no/atc"
UCUM = "http://unitsofmeasure.org"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"
COND_VER = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
ROLE = "http://terminology.hl7.org/CodeSystem/v3-RoleCode"
ABS_BASE = "https://ehr.example.org/fhir/R4/"

# Aromatase inhibitors: (ingredient, [(code, display, tty)], ATC) -- rules/valuesets/medications.yaml
AI_DRUGS = {
    "anastrozole": (
        [("199224", "anastrozole 1 MG Oral Tablet"), ("151124", "anastrozole 1 MG Oral Tablet [Arimidex]"),
         ("262485", "Arimidex"), ("84857", "anastrozole")],
        ("L02BG03", "anastrozole"),
    ),
    "letrozole": (
        [("200064", "letrozole 2.5 MG Oral Tablet"), ("203769", "Femara"), ("72965", "letrozole")],
        ("L02BG04", "letrozole"),
    ),
    "exemestane": (
        [("310261", "exemestane 25 MG Oral Tablet"), ("262105", "Aromasin"), ("258494", "exemestane")],
        ("L02BG06", "exemestane"),
    ),
}
# Product codes are what MedicationStatements carry most (docs/clinical-specification.md 3.4): weights per position above.
AI_CODE_WEIGHTS = {"anastrozole": [60, 15, 10, 15], "letrozole": [65, 15, 20], "exemestane": [65, 15, 20]}
TAMOXIFEN = [("198240", "tamoxifen 10 MG Oral Tablet"), ("10324", "tamoxifen")]
BISPHOSPHONATES = [
    ("904419", "alendronic acid 10 MG Oral Tablet", "oral"),
    ("904431", "alendronic acid 70 MG Oral Tablet", "oral"),
    ("904421", "alendronic acid 10 MG Oral Tablet [Fosamax]", "oral"),
    ("114265", "Fosamax", "oral"),
    ("877300", "{4 (risedronate 35 MG Oral Tablet [Actonel]) } Pack [Actonel 35]", "oral"),
    ("77655", "zoledronic acid", "iv"),
]
DENOSUMAB = [("993449", "denosumab"), ("993452", "denosumab 60 MG/ML Prefilled Syringe"),
             ("993456", "denosumab 60 MG/ML Prefilled Syringe [Prolia]")]
PREDNISONE = [("312617", "prednisone 5 MG Oral Tablet"), ("198145", "prednisone 10 MG Oral Tablet"),
              ("312615", "prednisone 20 MG Oral Tablet"), ("8640", "prednisone")]
GOSERELIN = ("50610", "goserelin")
TESTOSTERONE_ATC = ("G03BA03", "testosterone")
# Medications the rules do not read (Synthea's common outpatient drugs, and supplements).
OTHER_MEDS = [
    ("314076", "lisinopril 10 MG Oral Tablet"),
    ("197361", "amlodipine 5 MG Oral Tablet"),
    ("259255", "atorvastatin 80 MG Oral Tablet"),
    ("860975", "24 HR metformin hydrochloride 500 MG Extended Release Oral Tablet"),
    ("313782", "acetaminophen 325 MG Oral Tablet"),
    ("310965", "ibuprofen 200 MG Oral Tablet"),
    ("966222", "levothyroxine sodium 0.075 MG Oral Tablet"),
]
SUPPLEMENTS = [("1897", "calcium carbonate"), ("2418", "cholecalciferol")]

BREAST_CANCER = [
    [(SNOMED, "254837009", "Malignant neoplasm of breast (disorder)")],
    [(SNOMED, "372064008", "Malignant neoplasm of female breast")],
    [(ICD10, "C50.912", "Malignant neoplasm of unspecified site of left female breast"),
     (SNOMED, "372064008", "Malignant neoplasm of female breast")],
    [(ICD10, "C50.911", "Malignant neoplasm of unspecified site of right female breast")],
    [(ICD10, "C50.919", "Malignant neoplasm of unspecified site of unspecified female breast")],
    [(SNOMED, "353431000119107", "Primary malignant neoplasm of female left breast")],
]
MALE_BREAST_CANCER = [(ICD10, "C50.921", "Malignant neoplasm of unspecified site of right male breast")]
ER_POSITIVE = (ICD10, "Z17.0", "Estrogen receptor positive status [ER+]")
PROSTATE_CANCER = (SNOMED, "399068003", "Malignant tumor of prostate")
FRAGILITY_FRACTURES = [
    [(SNOMED, "443165006", "Pathological fracture due to osteoporosis (disorder)")],
    [(ICD10, "M80.08XA", "Age-related osteoporosis with current pathological vertebral fracture, initial encounter")],
    [(SNOMED, "431031001", "Pathological fracture of neck of femur due to osteoporosis")],
    [(ICD10, "Z87.310", "Personal history of (healed) osteoporosis fracture")],
    [(SNOMED, "240198002", "Osteoporotic vertebral collapse")],
]
TRAUMATIC_FRACTURES = [
    [(SNOMED, "16114001", "Fracture of ankle")],
    [(SNOMED, "65966004", "Fracture of forearm")],
    [(SNOMED, "58150001", "Fracture of clavicle")],
    [(SNOMED, "33737001", "Fracture of rib")],
]
HIP_FRACTURE_ICD = [(ICD10, "S72.001A", "Fracture of unspecified part of neck of right femur, initial encounter")]
RHEUMATOID = [[(SNOMED, "69896004", "Rheumatoid arthritis")], [(ICD10, "M06.9", "Rheumatoid arthritis, unspecified")]]
PREMATURE_MENOPAUSE = [(ICD10, "E28.310", "Symptomatic premature menopause")]
OSTEOPOROSIS = [[(SNOMED, "64859006", "Osteoporosis (disorder)")], [(ICD10, "M81.0", "Age-related osteoporosis without current pathological fracture")]]
OSTEOPENIA = [[(SNOMED, "312894000", "Osteopenia")], [(ICD10, "M85.80", "Other specified disorders of bone density and structure, unspecified site")]]
SMOKER_CONDITIONS = {"current": (SNOMED, "449868002", "Smokes tobacco daily"), "former": (SNOMED, "8517006", "Former smoker")}
LONG_TERM_AI = (ICD10, "Z79.811", "Long term (current) use of aromatase inhibitors")
# Conditions the rules do not read (Synthea's common chronic and acute problems).
OTHER_CONDITIONS = [
    ((SNOMED, "38341003", "Hypertension"), 0.40),
    ((SNOMED, "55822004", "Hyperlipidemia"), 0.35),
    ((SNOMED, "15777000", "Prediabetes"), 0.15),
    ((SNOMED, "44054006", "Diabetes mellitus type 2"), 0.12),
    ((SNOMED, "162864005", "Body mass index 30+ - obesity"), 0.20),
    ((SNOMED, "271737000", "Anemia"), 0.10),
    ((SNOMED, "35489007", "Depressive disorder"), 0.12),
    ((SNOMED, "40930008", "Hypothyroidism"), 0.10),
    ((SNOMED, "239873007", "Osteoarthritis of knee"), 0.20),
    ((SNOMED, "40055000", "Chronic sinusitis"), 0.08),
    ((SNOMED, "10509002", "Acute bronchitis"), 0.15),
]

SMOKING_ANSWERS = {
    "never": ("266919005", "Never smoker"),
    "former": ("8517006", "Former smoker"),
    "current": ("449868002", "Current every day smoker"),
    "someday": ("428041000124106", "Current some day smoker"),
    "unknown": ("266927001", "Tobacco smoking consumption unknown"),
}

# (code, display, unit, low, high, decimals): the panels Synthea draws, and the labs of docs/clinical-specification.md 3.2.
CBC = [
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL", 3.8, 10.8, 1),
    ("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "10*6/uL", 3.9, 5.2, 2),
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 11.5, 15.5, 1),
    ("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "%", 35.0, 46.0, 1),
    ("787-2", "MCV [Entitic volume] by Automated count", "fL", 80.0, 98.0, 1),
    ("785-6", "MCH [Entitic mass] by Automated count", "pg", 27.0, 33.0, 1),
    ("786-4", "MCHC [Mass/volume] by Automated count", "g/dL", 32.0, 36.0, 1),
    ("21000-5", "Erythrocyte distribution width [Entitic volume] by Automated count", "fL", 39.0, 46.0, 1),
    ("777-3", "Platelets [#/volume] in Blood by Automated count", "10*3/uL", 150.0, 400.0, 0),
]
METABOLIC = [
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma", "mg/dL", 70.0, 130.0, 0),
    ("3094-0", "Urea nitrogen [Mass/volume] in Serum or Plasma", "mg/dL", 7.0, 22.0, 0),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L", 136.0, 145.0, 0),
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L", 3.5, 5.1, 1),
    ("2075-0", "Chloride [Moles/volume] in Serum or Plasma", "mmol/L", 98.0, 107.0, 0),
    ("2028-9", "Carbon dioxide, total [Moles/volume] in Serum or Plasma", "mmol/L", 22.0, 29.0, 0),
]
LIPIDS = [
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "mg/dL", 150.0, 260.0, 0),
    ("2571-8", "Triglyceride [Mass/volume] in Serum or Plasma", "mg/dL", 60.0, 220.0, 0),
    ("18262-6", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by Direct assay", "mg/dL", 70.0, 180.0, 0),
    ("2085-9", "Cholesterol in HDL [Mass/volume] in Serum or Plasma", "mg/dL", 35.0, 85.0, 0),
]

# DXA LOINC codes (rules/valuesets/dxa.yaml), with the bodySite codes of body-sites.yaml.
DXA_T = {
    "LS": ("38267-1", "DXA Lumbar spine [T-score] Bone density"),
    "TH": ("38264-8", "DXA Hip [T-score] Bone density"),
    "FN": ("38263-0", "DXA Femur [T-score] Bone density"),
    "FA": ("38265-5", "DXA Radius and Ulna [T-score] Bone density"),
}
DXA_BMD = {
    "LS": ("24966-4", "DXA Lumbar spine [Mass/area] Bone density"),
    "TH": ("38261-4", "DXA Hip [Mass/area] Bone density"),
}
DXA_Z_LS = ("85394-5", "DXA Lumbar spine [Z-score] Bone density")
BODY_SITES = {
    "LS": (SNOMED, "122496007", "Lumbar spine structure"),
    "TH": (SNOMED, "29836001", "Hip region structure"),
    "FN": (SNOMED, "29627003", "Structure of neck of femur"),
}
# Young-adult reference means and SDs (g/cm2) that tie a BMD to its T-score, Hologic-like.
BMD_REF = {"LS": (1.047, 0.110), "TH": (0.942, 0.122)}
DEVICES = [("Device/dxa-hologic-1", "Hologic Horizon A"), ("Device/dxa-lunar-2", "GE Lunar iDXA")]

GIVEN = ["Alexia", "Caridad", "Cathryn", "Dorthy", "Evelina", "Francis", "Glenna", "Hortensia", "Ines", "Joanna",
         "Kathlyn", "Lavonne", "Marisol", "Nilda", "Ofelia", "Pamila", "Queenie", "Rosalia", "Shirlene", "Tamara"]
GIVEN_M = ["Arnold", "Bennie", "Cletus", "Dewayne", "Emory", "Forrest", "Gilberto", "Hank"]
FAMILY = ["Senger", "Olivares", "Windler", "Hermiston", "VonRueden", "Kuhic", "Bechtelar", "Gleason", "Mraz",
          "Okuneva", "Pfannerstill", "Runolfsdottir", "Schowalter", "Tromp", "Upton", "Wolff"]
CITIES = ["Boston", "Worcester", "Springfield", "Lowell", "Cambridge", "Quincy", "Lynn", "Newton"]


# =========================================================================== one patient


def _weighted(rng: random.Random, table: dict[str, float]) -> str:
    return rng.choices(list(table), weights=list(table.values()))[0]


def _codeable(codings, text: str | None = None) -> dict:
    out: dict = {"coding": [{"system": s, "code": c, "display": d} for s, c, d in codings]}
    if text:
        out["text"] = text
    return out


class _Patient:
    """Draws one patient's story, then writes it as FHIR R4 resources."""

    def __init__(self, seed: int, index: int, as_of: dt.date):
        self.rng = rng = random.Random(f"{seed}/{index}")
        self.as_of = as_of
        self.index = index
        self.pid = self.uuid()
        # ~5% arrive as a transaction Bundle with urn:uuid references; the rest as Bulk lines.
        self.in_bundle = rng.random() < 0.05
        # Which reference forms this source system uses (some mix them within one record).
        self.ref_mix = rng.choices(["relative", "mixed"], weights=[80, 20])[0]
        self.urn_encounters = rng.random() < 0.25  # Synthea-style urn:uuid encounter links
        self.resources: list[dict] = []

    # -- small helpers -------------------------------------------------------------------
    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def day(self, days_before: float) -> dt.date:
        return self.as_of - dt.timedelta(days=int(days_before))

    def stamp(self, when: dt.date) -> str:
        rng = self.rng
        return f"{when.isoformat()}T{rng.randint(7, 18):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}-05:00"

    def subject(self) -> dict:
        if self.in_bundle:
            return {"reference": f"urn:uuid:{self.pid}"}
        if self.ref_mix == "mixed":
            form = self.rng.random()
            if form < 0.3:
                return {"reference": f"{ABS_BASE}Patient/{self.pid}"}
            if form < 0.5:
                return {"reference": f"Patient/{self.pid}/_history/1"}
        return {"reference": f"Patient/{self.pid}"}

    def ref(self, rtype: str, rid: str) -> dict:
        if self.in_bundle or (rtype == "Encounter" and self.urn_encounters):
            return {"reference": f"urn:uuid:{rid}"}
        return {"reference": f"{rtype}/{rid}"}

    def add(self, resource: dict) -> dict:
        self.resources.append(resource)
        return resource

    # -- the story -----------------------------------------------------------------------
    def draw(self) -> None:
        rng = self.rng
        self.sex = "male" if rng.random() < 0.04 else "female"
        premenopausal = self.sex == "female" and rng.random() < 0.04
        if premenopausal:
            age = rng.randint(36, 48)
        elif self.sex == "male":
            age = rng.randint(48, 84)
        else:
            age = min(92, max(46, int(rng.triangular(48, 90, 66))))
        self.age = age
        self.birth = self.as_of - dt.timedelta(days=int(age * 365.25 + rng.randint(10, 350)))
        self.premenopausal = premenopausal
        # AI story (docs/clinical-specification.md E1): about half on an AI now, 1 in 12 about to start, 1 in 6 stopped.
        self.ai = _weighted(rng, {"active": 0.55, "planned": 0.08, "stopped": 0.17, "none": 0.20})
        self.none_kind = _weighted(rng, {"tamoxifen": 0.45, "no-endocrine": 0.30, "eie-only": 0.10, "no-cancer": 0.15})
        self.ingredient = "exemestane" if premenopausal else rng.choices(list(AI_DRUGS), weights=[55, 35, 10])[0]
        # Risk factors (RF0) at rates like an older female cohort's.
        self.bmi = round(min(45.0, max(16.0, rng.gauss(27.0, 5.0))), 1)
        self.smoking = _weighted(rng, {"never": 0.52, "former": 0.30, "current": 0.10, "someday": 0.03, "unknown": 0.05})
        self.parent_hip = rng.random() < 0.07
        self.steroid_long = rng.random() < 0.03
        self.steroid_short = rng.random() < 0.08
        self.alcohol = rng.random() < 0.05
        self.ra = rng.random() < 0.02
        self.premature_menopause = self.sex == "female" and not premenopausal and rng.random() < 0.02
        self.fragility_fx = rng.random() < 0.04
        # Latent bone density: AI-treated postmenopausal women, T about N(-1.1, 0.95), lower
        # with age and low BMI (Hadji 2017 cohort figures are of this order).
        base = rng.gauss(-1.1, 0.95) - max(0, age - 60) * 0.02 - max(0.0, 22.0 - self.bmi) * 0.08
        if self.sex == "male":
            base += 0.5
        self.t_base = min(2.0, max(-4.2, base))
        self.rapid_loss = rng.random() < 0.05

    def build(self) -> list[dict]:
        self.draw()
        rng = self.rng
        self.patient_resource()
        visits = self.visits()
        bc = self.conditions()
        self.medications(bc)
        self.dxa_history()
        self.family_history()
        self.vitals_and_labs(visits)
        self.fit_size(visits)
        return self.resources if not self.in_bundle else [self.bundle()]

    def patient_resource(self) -> None:
        rng = self.rng
        given = rng.choice(GIVEN_M if self.sex == "male" else GIVEN)
        res = {
            "resourceType": "Patient",
            "id": self.pid,
            "meta": {"versionId": "1", "lastUpdated": f"{self.day(rng.randint(1, 400)).isoformat()}T00:00:00Z"},
            "identifier": [{"system": "https://ehr.example.org/mrn", "value": f"MRN{self.index:08d}"}],
            "name": [{"use": "official", "family": f"{rng.choice(FAMILY)}{rng.randint(10, 999)}", "given": [f"{given}{rng.randint(10, 999)}"]}],
            "gender": self.sex,
            "birthDate": self.birth.isoformat(),
            "address": [{"city": rng.choice(CITIES), "state": "MA", "country": "US"}],
        }
        if rng.random() < 0.03:
            del res["meta"]  # some sources send no meta at all
        self.add(res)

    def visits(self) -> list[tuple[str, dt.date]]:
        rng = self.rng
        n = rng.randint(4, 13)
        days = sorted({rng.randint(5, 6 * 365) for _ in range(n)}, reverse=True)
        out = []
        for d in days:
            when = self.day(d)
            enc_id = self.uuid()
            self.add({
                "resourceType": "Encounter",
                "id": enc_id,
                "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [_codeable([(SNOMED, "185349003", "Encounter for check up (procedure)")])],
                "subject": self.subject(),
                "period": {"start": self.stamp(when), "end": self.stamp(when)},
            })
            out.append((enc_id, when))
        return out

    # -- conditions ----------------------------------------------------------------------
    def condition(self, codings, onset: dt.date, *, clinical: str = "active", verification: str = "confirmed",
                  text: str | None = None, note: str | None = None, category: str = "problem-list-item") -> dict:
        rng = self.rng
        res: dict = {"resourceType": "Condition", "id": self.uuid(), "meta": {"versionId": str(rng.choice([1, 1, 1, 2]))}}
        if clinical:
            res["clinicalStatus"] = _codeable([(COND_CLIN, clinical, clinical.capitalize())])
        if verification:
            res["verificationStatus"] = _codeable([(COND_VER, verification, verification.capitalize())])
        res["category"] = [_codeable([(COND_CAT, category, category.replace("-", " ").title())])]
        res["code"] = _codeable(codings, text)
        res["subject"] = self.subject()
        res["onsetDateTime"] = onset.isoformat() if rng.random() < 0.7 else self.stamp(onset)
        res["recordedDate"] = (onset + dt.timedelta(days=rng.randint(0, 20))).isoformat()
        if note:
            res["note"] = [{"text": note}]
        return self.add(res)

    def conditions(self) -> dict | None:
        rng = self.rng
        bc = None
        has_cancer = not (self.ai == "none" and self.none_kind == "no-cancer")
        if has_cancer:
            if self.sex == "male" and rng.random() < 0.4 and self.ai == "none":
                bc = self.condition([PROSTATE_CANCER], self.day(rng.randint(200, 3000)))
            else:
                codings = MALE_BREAST_CANCER if self.sex == "male" else rng.choice(BREAST_CANCER)
                self.dx_day = rng.randint(60, 9 * 365) if self.ai == "stopped" else rng.randint(30, 5 * 365)
                clinical = "active" if self.ai != "stopped" or rng.random() < 0.4 else rng.choice(["remission", "resolved"])
                bc = self.condition(codings, self.day(self.dx_day), clinical=clinical, text="Breast cancer" if rng.random() < 0.5 else None)
                if rng.random() < 0.6:
                    self.condition([ER_POSITIVE], self.day(self.dx_day - 5), category="encounter-diagnosis")
        if self.ai == "active" and rng.random() < 0.25:
            self.condition([LONG_TERM_AI], self.day(rng.randint(30, 700)), category="encounter-diagnosis")
        # Risk factors recorded as conditions.
        if self.ra:
            self.condition(rng.choice(RHEUMATOID), self.day(rng.randint(400, 7000)))
        if self.premature_menopause:
            self.condition(PREMATURE_MENOPAUSE, self.day((self.age - rng.randint(36, 39)) * 365), clinical="resolved")
        if self.fragility_fx:
            codings = rng.choice(FRAGILITY_FRACTURES)
            self.condition(codings, self.day(rng.randint(100, 4000)), clinical=rng.choice(["active", "resolved"]))
        if rng.random() < 0.06:  # traumatic fractures: not fragility fractures
            self.condition(rng.choice(TRAUMATIC_FRACTURES), self.day(rng.randint(100, 8000)), clinical="resolved")
        if rng.random() < 0.012:  # hip fracture without mechanism: POSSIBLE fragility at >= 50
            self.condition(HIP_FRACTURE_ICD, self.day(rng.randint(100, 3000)), clinical="resolved",
                           note="Fall from standing height" if rng.random() < 0.5 else None)
        if rng.random() < 0.015:  # D1: a refuted fracture never counts
            self.condition(rng.choice(FRAGILITY_FRACTURES), self.day(rng.randint(30, 900)), verification="refuted")
        if rng.random() < 0.01:  # D1: entered in error
            self.condition(rng.choice(RHEUMATOID), self.day(rng.randint(30, 900)), verification="entered-in-error")
        if self.smoking in ("current", "former") and rng.random() < 0.06:  # also as a problem (G6: counted once)
            key = "current" if self.smoking == "current" else "former"
            self.condition([SMOKER_CONDITIONS[key]], self.day(rng.randint(100, 2000)), category="problem-list-item")
        if self.t_base <= -2.5 and rng.random() < 0.4:
            self.condition(rng.choice(OSTEOPOROSIS), self.day(rng.randint(60, 1500)))
        elif -2.5 < self.t_base <= -1.0 and rng.random() < 0.3:
            self.condition(rng.choice(OSTEOPENIA), self.day(rng.randint(60, 1500)))
        for coding, share in OTHER_CONDITIONS:
            if rng.random() < share:
                self.condition([coding], self.day(rng.randint(60, 9000)),
                               clinical="active" if rng.random() < 0.8 else "resolved")
        return bc

    # -- medications ---------------------------------------------------------------------
    def med_code(self, ingredient: str) -> dict:
        rng = self.rng
        codes, atc = AI_DRUGS[ingredient]
        code, display = rng.choices(codes, weights=AI_CODE_WEIGHTS[ingredient])[0]
        codings = [(RXNORM, code, display)]
        if rng.random() < 0.15:
            codings.append((ATC, atc[0], atc[1]))
        return _codeable(codings, display if rng.random() < 0.5 else None)

    def statement(self, code: dict, status: str, start: dt.date | None, end: dt.date | None = None,
                  reason: dict | None = None, dosage: str | None = None) -> dict:
        res: dict = {"resourceType": "MedicationStatement", "id": self.uuid(), "meta": {"versionId": "1"},
                     "status": status, "medicationCodeableConcept": code, "subject": self.subject()}
        period = {}
        if start is not None:
            period["start"] = start.isoformat()
        if end is not None:
            period["end"] = end.isoformat()
        if period:
            res["effectivePeriod"] = period
        res["dateAsserted"] = self.day(self.rng.randint(1, 60)).isoformat()
        if reason is not None:
            res["reasonReference"] = [self.ref("Condition", reason["id"])]
        if dosage:
            res["dosage"] = [{"text": dosage}]
        return self.add(res)

    def request(self, code: dict, status: str, start: dt.date, *, intent: str = "order", end: dt.date | None = None,
                supply_days: int | None = 90, repeats: int = 3, reason: dict | None = None, route_oral: bool = True) -> dict:
        res: dict = {"resourceType": "MedicationRequest", "id": self.uuid(), "status": status, "intent": intent,
                     "medicationCodeableConcept": code, "subject": self.subject(),
                     "authoredOn": self.stamp(start - dt.timedelta(days=self.rng.randint(0, 10)))}
        if reason is not None:
            res["reasonReference"] = [self.ref("Condition", reason["id"])]
        bounds: dict = {"start": start.isoformat()}
        if end is not None:
            bounds["end"] = end.isoformat()
        dosage: dict = {"sequence": 1, "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d", "boundsPeriod": bounds}}}
        if route_oral:
            dosage["route"] = _codeable([(SNOMED, "26643006", "Oral route")])
        res["dosageInstruction"] = [dosage]
        if supply_days:
            res["dispenseRequest"] = {"numberOfRepeatsAllowed": repeats,
                                      "expectedSupplyDuration": {"value": supply_days, "unit": "days", "system": UCUM, "code": "d"}}
        return self.add(res)

    def ai_record(self, status_kind: str, start: dt.date, end: dt.date | None, reason: dict | None) -> None:
        """One AI course as a MedicationStatement (about 60%) or a MedicationRequest."""
        rng = self.rng
        code = self.med_code(self.ingredient)
        as_statement = rng.random() < 0.6
        if status_kind == "active":
            if as_statement:
                status = "on-hold" if rng.random() < 0.03 else "active"
                self.statement(code, status, start, None, reason, f"{self.ingredient} orally once daily")
            else:
                self.request(code, "on-hold" if rng.random() < 0.02 else "active", start, reason=reason)
        elif status_kind == "planned":
            kind = rng.random()
            if as_statement:
                self.statement(code, "intended", start, None, reason)
            elif kind < 0.5:
                self.request(code, "active", start, intent=rng.choice(["plan", "proposal"]), reason=reason)
            else:
                self.request(code, "active", start, reason=reason)  # an order that starts after as_of
        elif status_kind == "stopped":
            if as_statement:
                status = rng.choice(["completed", "completed", "stopped", "active"])  # active but ended: E1-ENDED
                self.statement(code, status, start, end, reason)
            else:
                self.request(code, rng.choice(["completed", "stopped"]), start, end=end, reason=reason)

    def medications(self, bc: dict | None) -> None:
        rng = self.rng
        reason = bc if bc is not None and rng.random() < 0.7 else None
        self.on_antiresorptive = None
        if self.ai == "active":
            start = self.day(rng.randint(20, min(5 * 365, getattr(self, "dx_day", 400) + 30)))
            self.ai_start = start
            if rng.random() < 0.2:  # switched from tamoxifen (a sequential strategy)
                t_start = start - dt.timedelta(days=rng.randint(700, 900))
                self.statement(_codeable([(RXNORM, *rng.choice(TAMOXIFEN))]), "completed", t_start, start - dt.timedelta(days=3), reason)
            self.ai_record("active", start, None, reason)
            if rng.random() < 0.03:  # a duplicate entered in error beside the real one (D1)
                self.statement(self.med_code(self.ingredient), "entered-in-error", start, None)
        elif self.ai == "planned":
            start = self.as_of + dt.timedelta(days=rng.randint(7, 60))
            self.ai_start = start
            self.ai_record("planned", start, None, reason)
        elif self.ai == "stopped":
            end = self.day(rng.randint(20, 4 * 365))
            start = end - dt.timedelta(days=rng.randint(400, 5 * 365))
            self.ai_start = start
            self.ai_record("stopped", start, end, reason)
        else:
            self.ai_start = None
            if self.none_kind == "tamoxifen":
                code = _codeable([(RXNORM, *rng.choice(TAMOXIFEN))])
                start = self.day(rng.randint(30, 4 * 365))
                if rng.random() < 0.6:
                    self.statement(code, "active", start, None, reason, "tamoxifen 20 mg daily")
                else:
                    self.request(code, "active", start, reason=reason)
            elif self.none_kind == "eie-only":
                self.statement(self.med_code(self.ingredient), "entered-in-error", self.day(rng.randint(30, 600)), None)
        if self.premenopausal and self.ai in ("active", "planned"):
            self.statement(_codeable([(RXNORM, *GOSERELIN)]), "active", self.day(rng.randint(30, 400)), None, reason)
        if self.sex == "male" and self.ai == "active" and rng.random() < 0.5:
            self.statement(_codeable([(ATC, *TESTOSTERONE_ATC)]), "active", self.day(rng.randint(200, 2000)), None)
        # Antiresorptives: more likely the lower the T-score; denosumab left running after the AI stopped (A2).
        p_ar = 0.55 if self.t_base < -2.0 else 0.12 if self.t_base < -1.5 else 0.03
        if self.ai in ("active", "stopped") and rng.random() < p_ar:
            start = self.day(rng.randint(60, 3 * 365))
            if rng.random() < 0.35:
                code = _codeable([(RXNORM, *rng.choice(DENOSUMAB))])
                self.on_antiresorptive = "denosumab"
                self.statement(code, "active", start, None, None, "denosumab 60 mg subcutaneously every 6 months")
            else:
                code_, display, route = rng.choice(BISPHOSPHONATES)
                codings = [(RXNORM, code_, display)]
                self.on_antiresorptive = "bisphosphonate"
                if rng.random() < 0.5:
                    self.statement(_codeable(codings), rng.choice(["active", "active", "completed"]), start, None)
                else:
                    self.request(_codeable(codings), "active", start, supply_days=84, route_oral=route == "oral")
        # Glucocorticoids: long courses (> 6 months cumulative, a risk factor) and short bursts.
        if self.steroid_long:
            start = self.day(rng.randint(300, 1500))
            end = start + dt.timedelta(days=rng.randint(200, 700))
            self.request(_codeable([(RXNORM, *rng.choice(PREDNISONE))]), "completed" if end < self.as_of else "active",
                         start, end=min(end, self.as_of), supply_days=30)
        if self.steroid_short:
            for _ in range(rng.randint(1, 3)):
                start = self.day(rng.randint(30, 2000))
                self.request(_codeable([(RXNORM, *rng.choice(PREDNISONE))]), "completed", start,
                             end=start + dt.timedelta(days=rng.randint(5, 21)), supply_days=None)
        for code, display in OTHER_MEDS:
            if rng.random() < 0.22:
                self.request(_codeable([(RXNORM, code, display)]), rng.choice(["active", "active", "stopped"]),
                             self.day(rng.randint(30, 3000)), supply_days=30, repeats=rng.randint(0, 11))
        if self.ai in ("active", "planned") and rng.random() < 0.5:
            for code, display in SUPPLEMENTS:
                self.statement(_codeable([(RXNORM, code, display)]), "active", self.day(rng.randint(10, 900)), None)

    # -- observations ---------------------------------------------------------------------
    def observation(self, code, display, when: dt.date, *, category: str, value: dict | None = None,
                    status: str = "final", encounter: str | None = None, extra: dict | None = None,
                    version: str | None = None) -> dict:
        res: dict = {"resourceType": "Observation", "id": self.uuid()}
        if version:
            res["meta"] = {"versionId": version}
        res["status"] = status
        res["category"] = [{"coding": [{"system": OBS_CAT, "code": category, "display": category}]}]
        res["code"] = {"coding": [{"system": LOINC, "code": code, "display": display}]}
        res["subject"] = self.subject()
        if encounter:
            res["encounter"] = self.ref("Encounter", encounter)
        res["effectiveDateTime"] = self.stamp(when)
        if value is not None:
            res.update(value)
        if extra:
            res.update(extra)
        return self.add(res)

    @staticmethod
    def qty(value: float, unit: str) -> dict:
        return {"valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit}}

    def dxa_history(self) -> None:
        """0 to 4 DXA scans, 12 to 30 months apart; loss on an AI; stale, forearm-only and BMD-only variants."""
        rng = self.rng
        p_dxa = {"active": 0.82, "planned": 0.30, "stopped": 0.60, "none": 0.35}[self.ai]
        if rng.random() >= p_dxa:
            return
        # How old is the latest scan: most recent within 24 months (valid for B1), some stale (B2).
        latest = rng.randint(10, 700) if rng.random() < 0.8 else rng.randint(760, 1900)
        n = rng.choices([1, 2, 3, 4], weights=[35, 35, 20, 10])[0]
        days = [latest]
        for _ in range(n - 1):
            days.append(days[-1] + rng.randint(365, 900))
        variant = _weighted(rng, {"axial": 0.68, "ls-th": 0.12, "forearm-only": 0.06, "bmd-only": 0.05, "axial+forearm": 0.09})
        device = rng.choice(DEVICES)
        loss_per_year = rng.uniform(0.06, 0.25) if self.ai in ("active", "stopped") else rng.uniform(0.0, 0.08)
        if self.rapid_loss:
            loss_per_year = rng.uniform(0.6, 0.9)  # about 6-9 %/yr in BMD terms (rule L1)
        offsets = {"LS": rng.gauss(0.0, 0.4), "TH": 0.2 + rng.gauss(0.0, 0.3), "FN": -0.2 + rng.gauss(0.0, 0.3)}
        z_instead = self.premenopausal
        amended_done = False
        for d in sorted(days, reverse=True):  # oldest first
            when = self.day(d)
            years_back = (d - latest) / 365.25
            for site in ("LS", "TH", "FN", "FA"):
                if variant in ("ls-th",) and site in ("FN", "FA"):
                    continue
                if variant == "axial" and site == "FA":
                    continue
                if variant == "forearm-only" and site != "FA":
                    continue
                if variant == "bmd-only" and site not in ("LS", "TH"):
                    continue
                t = self.t_base + (offsets.get(site, -0.3)) + years_back * loss_per_year
                t = round(min(3.0, max(-4.8, t)), 1)
                site_ext: dict = {}
                if site in BODY_SITES and (site == "FN" or rng.random() < 0.5):
                    site_ext["bodySite"] = _codeable([BODY_SITES[site]])
                if site in ("LS", "TH") and variant != "forearm-only":
                    site_ext["device"] = {"reference": device[0], "display": device[1]}
                if variant != "bmd-only":
                    if z_instead and site == "LS":
                        code, display = DXA_Z_LS
                        unit = "{Z-score}"
                    else:
                        code, display = DXA_T[site]
                        if variant == "forearm-only":
                            display = "DXA [T-score] Bone density"  # Synthea's label on 38265-5
                        unit = rng.choice(["{T-score}", "{T-score}", "{SD}", "1"])
                    if not amended_done and not self.in_bundle and site == "LS" and rng.random() < 0.03:
                        # The same result sent twice: preliminary v1, then amended v2 (dedup keeps v2).
                        first = self.observation(code, display, when, category="imaging", status="preliminary",
                                                 value=self.qty(round(t - 0.3, 1), unit), extra=site_ext, version="1")
                        second = dict(first, meta={"versionId": "2"}, status="amended")
                        second.update(self.qty(t, unit))
                        self.add(second)
                        amended_done = True
                    else:
                        self.observation(code, display, when, category="imaging", value=self.qty(t, unit), extra=site_ext,
                                         version="1")
                if site in BMD_REF and (variant != "forearm-only") and (variant == "bmd-only" or rng.random() < 0.6):
                    mean, sd = BMD_REF[site]
                    bmd = round(mean + sd * t, 3)
                    code, display = DXA_BMD[site]
                    self.observation(code, display, when, category="imaging", value=self.qty(bmd, "g/cm2"),
                                     extra=site_ext, version="1")
        if rng.random() < 0.03:  # D1: a wrong result entered in error, never used
            self.observation(*DXA_T["LS"], self.day(latest + 3), category="imaging", status="entered-in-error",
                             value=self.qty(-2.9, "{T-score}"))

    def family_history(self) -> None:
        rng = self.rng
        entries = []
        if self.parent_hip:
            rel = rng.choice([("MTH", "mother"), ("FTH", "father"), ("PRN", "parent")])
            code = rng.choice([(SNOMED, "5913000", "Fracture of neck of femur"), (SNOMED, "263225007", "Fracture of proximal end of femur")])
            entries.append((rel, code))
        if rng.random() < 0.04:  # another relative's hip fracture: not a risk factor (G15)
            entries.append((rng.choice([("SIS", "sister"), ("GRMTH", "grandmother"), ("MAUNT", "maternal aunt")]),
                            (SNOMED, "5913000", "Fracture of neck of femur")))
        if rng.random() < 0.05:  # family osteoporosis: informational only (G15)
            entries.append((rng.choice([("MTH", "mother"), ("SIS", "sister")]), (SNOMED, "64859006", "Osteoporosis (disorder)")))
        if rng.random() < 0.10:  # unrelated family history
            entries.append((rng.choice([("FTH", "father"), ("BRO", "brother")]), (SNOMED, "38341003", "Hypertension")))
        for (role, role_display), code in entries:
            res = {
                "resourceType": "FamilyMemberHistory",
                "id": self.uuid(),
                "status": "entered-in-error" if rng.random() < 0.02 else "completed",
                "patient": self.subject(),
                "date": self.day(rng.randint(30, 3000)).isoformat(),
                "relationship": _codeable([(ROLE, role, role_display)]),
                "condition": [{"code": _codeable([code])}],
            }
            self.add(res)

    def vitals_and_labs(self, visits: list[tuple[str, dt.date]]) -> None:
        rng = self.rng
        height = round(rng.gauss(162.0 if self.sex == "female" else 176.0, 6.5), 1)
        for i, (enc, when) in enumerate(visits):
            self.visit_vitals(enc, when, height)
            if rng.random() < 0.30:
                self.panel(CBC, enc, when)
            if rng.random() < 0.35:
                self.panel(METABOLIC, enc, when)
                self.bone_labs(enc, when)
            if rng.random() < 0.18:
                self.panel(LIPIDS, enc, when)
            if i % 3 == 0 or i == len(visits) - 1:
                self.smoking_obs(enc, when)
        if self.alcohol or rng.random() < 0.15:
            enc, when = visits[-1]
            drinks = rng.choice([3, 4, 5]) if self.alcohol else rng.choice([0, 1, 1, 2])
            self.observation("11287-0", "Alcoholic drinks per drinking day", when, category="social-history",
                             value=self.qty(drinks, "{drinks}/d"), encounter=enc)
        if rng.random() < 0.05:
            enc, when = visits[-1]
            self.observation("41171-0", "Collagen crosslinked C-telopeptide [Mass/volume] in Serum or Plasma", when,
                             category="laboratory", value=self.qty(rng.randint(200, 900), "pg/mL"), encounter=enc)

    def visit_vitals(self, enc: str, when: dt.date, height: float) -> None:
        rng = self.rng
        bmi = round(max(14.0, self.bmi + rng.gauss(0.0, 0.6)), 1)
        weight = round(bmi * (height / 100.0) ** 2, 1)
        status = "entered-in-error" if rng.random() < 0.01 else "final"
        obs = self.observation
        obs("8302-2", "Body Height", when, category="vital-signs", value=self.qty(height, "cm"), encounter=enc)
        if rng.random() < 0.1:  # some sources weigh in pounds (units.yaml converts)
            obs("29463-7", "Body Weight", when, category="vital-signs", value=self.qty(round(weight * 2.20462, 1), "[lb_av]"), encounter=enc)
        else:
            obs("29463-7", "Body Weight", when, category="vital-signs", value=self.qty(weight, "kg"), encounter=enc, status=status)
        obs("39156-5", "Body mass index (BMI) [Ratio]", when, category="vital-signs", value=self.qty(bmi, "kg/m2"), encounter=enc)
        sys_bp, dia_bp = rng.randint(105, 160), rng.randint(62, 98)
        obs("85354-9", "Blood pressure panel with all children optional", when, category="vital-signs", encounter=enc, extra={
            "component": [
                {"code": {"coding": [{"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}]},
                 "valueQuantity": {"value": sys_bp, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
                {"code": {"coding": [{"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}]},
                 "valueQuantity": {"value": dia_bp, "unit": "mm[Hg]", "system": UCUM, "code": "mm[Hg]"}},
            ]})
        obs("8867-4", "Heart rate", when, category="vital-signs", value=self.qty(rng.randint(56, 98), "/min"), encounter=enc)
        obs("9279-1", "Respiratory rate", when, category="vital-signs", value=self.qty(rng.randint(12, 20), "/min"), encounter=enc)
        obs("72514-3", "Pain severity - 0-10 verbal numeric rating [Score] - Reported", when, category="vital-signs",
            value=self.qty(rng.randint(0, 6), "{score}"), encounter=enc)

    def panel(self, panel, enc: str, when: dt.date) -> None:
        rng = self.rng
        for code, display, unit, low, high, decimals in panel:
            value = round(rng.uniform(low, high), decimals)
            if decimals == 0:
                value = int(value)
            self.observation(code, display, when, category="laboratory", value=self.qty(value, unit), encounter=enc)

    def bone_labs(self, enc: str, when: dt.date) -> None:
        rng = self.rng
        obs = self.observation
        creat = round(rng.uniform(0.55, 1.25) if rng.random() < 0.95 else rng.uniform(1.6, 2.8), 2)
        if rng.random() < 0.1:
            obs("14682-9", "Creatinine [Moles/volume] in Serum or Plasma", when, category="laboratory",
                value=self.qty(round(creat * 88.4, 0), "umol/L"), encounter=enc)
        else:
            obs("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", when, category="laboratory",
                value=self.qty(creat, "mg/dL"), encounter=enc)
        egfr = int(max(15, min(110, 100 - (self.age - 40) * 0.7 - (creat - 0.9) * 40 + rng.gauss(0, 6))))
        obs("98979-8", "Glomerular filtration rate/1.73 sq M.predicted [Volume Rate/Area] in Serum, Plasma or Blood by Creatinine-based formula (CKD-EPI 2021)",
            when, category="laboratory", value=self.qty(egfr, "mL/min/{1.73_m2}"), encounter=enc)
        obs("17861-6", "Calcium [Mass/volume] in Serum or Plasma", when, category="laboratory",
            value=self.qty(round(rng.uniform(8.3, 10.3), 1), "mg/dL"), encounter=enc)
        if rng.random() < 0.4:
            obs("1751-7", "Albumin [Mass/volume] in Serum or Plasma", when, category="laboratory",
                value=self.qty(round(rng.uniform(3.4, 4.8), 1), "g/dL"), encounter=enc)
        if rng.random() < 0.35:
            vitd = round(rng.uniform(12.0, 52.0), 1)
            if rng.random() < 0.12:  # the D3-only trap (docs/clinical-specification.md 3.2)
                obs("1989-3", "25-Hydroxyvitamin D3 [Mass/volume] in Serum or Plasma", when, category="laboratory",
                    value=self.qty(vitd, "ng/mL"), encounter=enc)
            else:
                obs("62292-8", "25-Hydroxyvitamin D2+25-Hydroxyvitamin D3 [Mass/volume] in Serum or Plasma", when,
                    category="laboratory", value=self.qty(vitd, "ng/mL"), encounter=enc)

    def smoking_obs(self, enc: str, when: dt.date) -> None:
        code, display = SMOKING_ANSWERS[self.smoking]
        self.observation("72166-2", "Tobacco smoking status", when, category="social-history", encounter=enc,
                         value={"valueCodeableConcept": _codeable([(SNOMED, code, display)], display)})

    # -- size and packaging --------------------------------------------------------------
    def fit_size(self, visits: list[tuple[str, dt.date]]) -> None:
        """Keep every record within [MIN_RESOURCES, MAX_RESOURCES], touching only unrelated data."""
        rng = self.rng
        while len(self.resources) < MIN_RESOURCES:
            when = self.day(rng.randint(5, 6 * 365))
            enc = self.uuid()
            self.add({"resourceType": "Encounter", "id": enc, "status": "finished",
                      "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                      "subject": self.subject(), "period": {"start": self.stamp(when)}})
            self.visit_vitals(enc, when, 165.0)
        if len(self.resources) > MAX_RESOURCES:
            # Drop the oldest laboratory results first: they are never read by the rules' lab facts (latest wins).
            labs = [r for r in self.resources if r["resourceType"] == "Observation"
                    and r["category"][0]["coding"][0]["code"] == "laboratory"]
            labs.sort(key=lambda r: r["effectiveDateTime"])
            drop = {id(r) for r in labs[: len(self.resources) - MAX_RESOURCES]}
            self.resources = [r for r in self.resources if id(r) not in drop]

    def bundle(self) -> dict:
        """The whole record as one transaction Bundle: urn:uuid fullUrls, POSTs, some entries without ids."""
        rng = self.rng
        drop_ids = rng.random() < 0.5  # POST style: the server assigns ids; the reader takes the uuid
        entries = []
        for res in self.resources:
            full = f"urn:uuid:{res['id']}"
            body = res
            if drop_ids:
                body = {k: v for k, v in res.items() if k != "id"}
            entries.append({"fullUrl": full, "resource": body, "request": {"method": "POST", "url": res["resourceType"]}})
        return {"resourceType": "Bundle", "id": self.uuid(), "type": "transaction",
                "timestamp": f"{self.as_of.isoformat()}T06:00:00Z", "entry": entries}


def patient_resources(seed: int, index: int, as_of: dt.date = DEFAULT_AS_OF) -> list[dict]:
    """Patient `index` of the population `seed`: its resources (or its one transaction Bundle)."""
    return _Patient(seed, index, as_of).build()


def patient_record(seed: int, index: int, as_of: dt.date = DEFAULT_AS_OF) -> list[dict]:
    """Patient `index` as a flat list of resources, never a Bundle (for a CDS prefetch or a FHIR server)."""
    p = _Patient(seed, index, as_of)
    p.in_bundle = False
    return p.build()


def iter_population(seed: int, patients: int, as_of: dt.date = DEFAULT_AS_OF) -> Iterator[list[dict]]:
    for index in range(patients):
        yield patient_resources(seed, index, as_of)


# =========================================================================== writing


def generate(settings: SynthSettings) -> SynthSummary:
    """Write the population; return what was written. Raises SynthError if `out` is not usable."""
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise SynthError("exists and is not a directory", source=str(out))
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.glob("*.ndjson"))
    if existing and not settings.force:
        raise SynthError(f"already holds NDJSON files ({', '.join(existing[:3])}...); use --force to replace them", source=str(out))
    for name in existing:
        (out / name).unlink()
    handles: dict[str, object] = {}
    counts: dict[str, int] = {}
    total = 0
    written = 0
    try:
        for resources in iter_population(settings.seed, settings.patients, settings.as_of):
            for res in resources:
                rtype = res["resourceType"]
                fh = handles.get(rtype)
                if fh is None:
                    fh = handles[rtype] = open(out / RESOURCE_FILES[rtype], "wb", buffering=1 << 20)
                line = orjson.dumps(res) + b"\n"
                fh.write(line)  # type: ignore[attr-defined]
                written += len(line)
                counts[rtype] = counts.get(rtype, 0) + 1
                total += len(res["entry"]) if rtype == "Bundle" else 1
    except OSError as exc:
        raise SynthError(f"cannot write: {exc.strerror or exc}", source=str(out)) from exc
    finally:
        for fh in handles.values():
            fh.close()  # type: ignore[attr-defined]
    return SynthSummary(
        patients=settings.patients,
        resources=total,
        files={RESOURCE_FILES[t]: n for t, n in sorted(counts.items())},
        bytes=written,
    )


# =========================================================================== command


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SynthSettings()
    parser.add_argument("--patients", type=_count, default=defaults.patients, metavar="N",
                        help=f"number of patients (default: {defaults.patients})")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="S",
                        help=f"seed; the same seed and arguments give the same bytes (default: {defaults.seed})")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument("--as-of", type=_date, default=defaults.as_of, metavar="YYYY-MM-DD",
                        help=f"reference date every generated date is counted back from (default: {defaults.as_of})")
    parser.add_argument("--force", action="store_true", help="replace NDJSON files already in DIR")


def run(args: argparse.Namespace) -> int:
    settings = SynthSettings(patients=args.patients, seed=args.seed, out=args.out, as_of=args.as_of, force=args.force)
    try:
        summary = generate(settings)
    except SynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = ", ".join(f"{name} ({n})" for name, n in summary.files.items())
    print(f"{summary.patients} patients, {summary.resources} resources, {summary.bytes / 1e6:.1f} MB in {settings.out}: {files}")
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m fhir_aibl.synth` until the command is wired
    parser = argparse.ArgumentParser(prog="fhir-aibl synth", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
