"""The population outputs `fhir-aibl write-back` reads, made from the worked examples in each shape."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from fhir_aibl.cli import fhir_bundle_json, with_careplans
from fhir_aibl.sources import iter_records
from fhir_aibl.writeback import command

from ..conftest import AS_OF, FIXTURES
from ..fhir.conftest import CommandRun, shared_assessor

SHAPES = ("explained-array", "assessment-lines", "fhir-bundle", "resource-ndjson")


def make_outputs(folder: Path, paths: list[Path] | None = None, assessor=None) -> dict[str, list[Path]]:
    """Every shape of the same assessments; {shape: FROM paths}."""
    assessor = assessor or shared_assessor()
    problems: list = []
    records = iter_records(paths or [FIXTURES / "bundles"], terminology=assessor.terminology)
    made = list(with_careplans(assessor, records, AS_OF, problems))
    assert not problems
    explained = [result.assessment.explained() for result, _pair in made]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "explained.json").write_text(json.dumps(explained, indent=1))
    lines = folder / "assessments"
    lines.mkdir(exist_ok=True)
    half = len(explained) // 2
    for n, part in enumerate((explained[:half], explained[half:])):
        (lines / f"part-{n:05d}.json").write_text("".join(json.dumps(a) + "\n" for a in part))
    (lines / "_SUCCESS").write_text("")
    bundle = fhir_bundle_json([pair for _result, pair in made])
    (folder / "bundle.json").write_text(bundle)
    ndjson = folder / "fhir"
    ndjson.mkdir(exist_ok=True)
    by_type: dict[str, list[str]] = {"CarePlan": [], "RiskAssessment": []}
    for entry in json.loads(bundle)["entry"]:
        by_type[entry["resource"]["resourceType"]].append(json.dumps(entry["resource"]))
    for rtype, rows in by_type.items():
        (ndjson / f"{rtype}.ndjson").write_text("\n".join(rows) + "\n")
    return {
        "explained-array": [folder / "explained.json"],
        "assessment-lines": [lines],
        "fhir-bundle": [folder / "bundle.json"],
        "resource-ndjson": [ndjson],
    }


def on_ai(folder: Path) -> list[str]:
    """The patients of the outputs on an aromatase inhibitor: those written back."""
    return sorted(a["patient"] for a in json.loads((folder / "explained.json").read_text())
                  if a["ai_status"] in ("active", "planned"))


def write_back(*argv: str, session=None, environ: dict | None = None) -> CommandRun:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([str(a) for a in argv])
    out, err = io.StringIO(), io.StringIO()
    code = command.run(args, session=session, environ=environ if environ is not None else {}, stdout=out, stderr=err)
    return CommandRun(code, out.getvalue(), err.getvalue())


def write_requests(stderr: str) -> int:
    """The write-back's requests, from its summary line."""
    line = next(x for x in stderr.splitlines() if x.startswith("round trips: "))
    return int(line.split("(", 1)[1].split(" requests", 1)[0])
