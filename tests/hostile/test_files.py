"""The hostile corpus through `fhir-aibl assess`: as a file, an NDJSON line and a Bundle entry.

Each case stands in for one patient's (p2's) lumbar-spine T-score beside a clean patient p1.
Whatever the case: no traceback, a clear `error:` line naming where, exit 1 (0 for the
benign ones), and p1 assessed exactly as without it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from fhir_aibl import cli

from ..fhir.fakes import record
from .generate import cases

AS_OF = "2026-06-01"
CLEAN = [r for r in record("p1") + record("p2") if r["id"] != "p2-ls"]
TARGET = next(r for r in record("p2") if r["id"] == "p2-ls")
CASES = cases(TARGET, other_patient="Patient/p1")


def line(resource: dict) -> bytes:
    return json.dumps(resource, separators=(",", ":")).encode()


def assess(capsys, *paths: Path) -> tuple[int, dict, str]:
    code = cli.main(["assess", *map(str, paths), "--as-of", AS_OF, "--format", "json"])
    out, err = capsys.readouterr()
    return code, {a["patient"]: a for a in json.loads(out)}, err


def check(code: int, results: dict, err: str, expect: str, where: str, reference: dict) -> None:
    assert "Traceback" not in err
    assert results["Patient/p1"] == reference["Patient/p1"]  # the other patient, untouched
    if expect == "benign":
        assert code == 0 and results == reference, err
        return
    assert code == 1, err
    errors = [e for e in err.splitlines() if e.startswith("error:")]
    assert any(where in e for e in errors), (where, err)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("ref") / "clean.ndjson"
    path.write_bytes(b"\n".join(map(line, CLEAN + [TARGET])) + b"\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["assess", str(path), "--as-of", AS_OF, "--format", "json"]) == 0
    return {a["patient"]: a for a in json.loads(out.getvalue())}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_as_a_file_of_its_own(case, tmp_path, capsys, reference):
    clean = tmp_path / "clean.ndjson"
    clean.write_bytes(b"\n".join(map(line, CLEAN)) + b"\n")
    hostile = tmp_path / "hostile.json"
    hostile.write_bytes(case.data)
    code, results, err = assess(capsys, clean, hostile)
    check(code, results, err, case.expect, str(hostile), reference)


@pytest.mark.parametrize("case", [c for c in CASES if b"\n" not in c.data and c.name != "empty"], ids=lambda c: c.name)
def test_as_an_ndjson_line(case, tmp_path, capsys, reference):
    lines = list(map(line, CLEAN))
    if case.expect == "benign":  # a byte order mark is allowed at the start of the file only
        lines.insert(0, case.data)
        where = 1
    else:
        lines.insert(3, case.data)
        where = 4
    path = tmp_path / "export.ndjson"
    path.write_bytes(b"\n".join(lines) + b"\n")
    code, results, err = assess(capsys, path)
    check(code, results, err, case.expect, f"{path}:{where}", reference)


@pytest.mark.parametrize("case", [c for c in CASES if c.spliceable and c.expect != "not-json"], ids=lambda c: c.name)
def test_as_one_entry_of_a_bundle(case, tmp_path, capsys, reference):
    entries = [b'{"resource":' + line(r) + b"}" for r in CLEAN]
    entries.insert(4, b'{"resource":' + case.data + b"}")
    path = tmp_path / "bundle.json"
    path.write_bytes(b'{"resourceType":"Bundle","type":"collection","entry":[' + b",".join(entries) + b"]}")
    code, results, err = assess(capsys, path)
    check(code, results, err, case.expect, str(path), reference)
    named = [e for e in err.splitlines() if e.startswith("error:") and ("entry[4]" in e or "Observation/p2-ls" in e)]
    assert named, err

