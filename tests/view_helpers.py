"""Helpers shared by the bone-health view tests: bundles with a DXA history, the clinician text of a page."""

from __future__ import annotations

import copy
import json
import re
from html.parser import HTMLParser
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bundles"


def bundle(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def with_history(name: str = "V06") -> dict:
    """A worked example with two earlier lumbar-spine scans (T -1.0, T -1.3) and a Z-score beside the latest.

    Seven DXA results in all (V06 has three, on 15 Feb 2026), four of them lumbar spine T or Z.
    """
    data = bundle(name)
    ls = next(e["resource"] for e in data["entry"] if e["resource"]["id"].endswith("-dxa-ls"))
    for when, value in (("2024-02-10", -1.0), ("2025-02-12", -1.3)):
        earlier = copy.deepcopy(ls)
        earlier["id"] = f"{ls['id']}-{when}"
        earlier["effectiveDateTime"] = when
        earlier["valueQuantity"]["value"] = value
        data["entry"].append({"fullUrl": f"urn:uuid:{earlier['id']}", "resource": earlier})
    z = copy.deepcopy(ls)
    z["id"] = f"{ls['id']}-z"
    z["code"] = {"coding": [{"system": "http://loinc.org", "code": "85394-5", "display": "DXA Lumbar spine [Z-score] Bone density"}]}
    z["valueQuantity"] = {"value": -0.8, "unit": "{Z-score}", "system": "http://unitsofmeasure.org", "code": "{Z-score}"}
    data["entry"].append({"fullUrl": f"urn:uuid:{z['id']}", "resource": z})
    return data


def write(data: dict, folder: Path, name: str) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data))
    return path


class _Text(HTMLParser):
    """The text a reader sees, split at the reviewer's <details> (attributes and markup left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.clinician: list[str] = []
        self.reviewer: list[str] = []
        self._in_reviewer = 0
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag == "details" and ("class", "reviewer") in attrs:
            self._in_reviewer += 1
        elif tag in ("style", "title") and not self._in_reviewer:
            self._skip += 1

    def handle_endtag(self, tag):
        if tag == "details" and self._in_reviewer:
            self._in_reviewer -= 1
        elif tag in ("style", "title") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if self._in_reviewer:
            self.reviewer.append(data)
        elif not self._skip:
            self.clinician.append(data)


def texts(html: str) -> tuple[str, str]:
    """(clinician text, reviewer text) of a page."""
    parser = _Text()
    parser.feed(html)
    return " ".join(parser.clinician), " ".join(parser.reviewer)


RESOURCE_REF = re.compile(
    r"\b(?:Patient|Observation|Condition|Medication[A-Za-z]*|Procedure|DiagnosticReport|ServiceRequest|"
    r"FamilyMemberHistory|Encounter|Device|CarePlan|RiskAssessment|Provenance)/[A-Za-z0-9.-]+"
)
