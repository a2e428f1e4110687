"""Inputs for the Spark tests, written as Bulk NDJSON (one file per resource type)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from fhir_aibl.cli import FIXTURES_DIR
from fhir_aibl.sources import read_paths


def write_ndjson(resources: list[dict], folder: Path, suffix: str = "000") -> None:
    by_type: dict[str, list[dict]] = defaultdict(list)
    for resource in resources:
        by_type[resource["resourceType"]].append(resource)
    folder.mkdir(parents=True, exist_ok=True)
    for rtype, items in by_type.items():
        with (folder / f"{rtype}.{suffix}.ndjson").open("a") as fh:
            for item in items:
                fh.write(json.dumps(item) + "\n")


def fixture_resources() -> list[dict]:
    """The worked examples' resources, as the reader groups them (references in the Patient/<id> form)."""
    return [r for record in read_paths(FIXTURES_DIR, validate=False).patients for r in record.resources]


def by_reference(resources: list[dict]) -> list[dict]:
    """The medications' codes moved into Medication resources that the statements and requests reference."""
    out: list[dict] = []
    for n, resource in enumerate(resources):
        concept = resource.get("medicationCodeableConcept")
        if resource["resourceType"].startswith("Medication") and concept is not None:
            medication = {"resourceType": "Medication", "id": f"med-{n}", "code": concept}
            resource = {k: v for k, v in resource.items() if k != "medicationCodeableConcept"}
            resource["medicationReference"] = {"reference": f"Medication/med-{n}"}
            out.append(medication)
        out.append(resource)
    return out
