"""The hostile corpus (tests/hostile/generate.py) through `fhir-aibl run`, the server played by `responses`.

One patient's (p2's) T-score comes back from the server as a case of the corpus, inside
the search results. An answer that is not JSON, or JSON that FHIR JSON forbids (a duplicate
key, nesting too deep), fails that patient by name; a parsed but invalid resource is left
out with a warning. Either way p1 is assessed as without it, and no traceback is printed.
"""

from __future__ import annotations

import json

import pytest

from ..hostile.generate import cases
from .conftest import run_command
from .fakes import BASE, FakeFhir, mock, record

TARGET = next(r for r in record("p2") if r["id"] == "p2-ls")
CASES = [c for c in cases(TARGET, other_patient="Patient/p1") if c.spliceable]


class HostileFhir(FakeFhir):
    """Answers as FakeFhir, with p2's T-score replaced in every answer by the bytes of a case."""

    payload: bytes = b""
    #: the whole answer to any request about p2 is the payload
    whole: bool = False

    def _callback(self, request):
        status, headers, body = super()._callback(request)
        about_p2 = "p2" in request.url or b"Patient/p2" in (request.body or b"")
        if self.whole and about_p2:
            return 200, headers, self.payload
        data = body.encode()
        return status, headers, data.replace(json.dumps(TARGET).encode(), self.payload)


def run(payload: bytes | None, whole: bool = False):
    fake = HostileFhir(resources=record("p1") + record("p2"))
    fake.whole = whole
    fake.payload = json.dumps(TARGET).encode() if payload is None else payload
    with mock() as rsps:
        fake.install(rsps)
        return run_command("--fhir-base", BASE, "--as-of", "2026-06-01", "--patient", "p1", "p2", "--format", "json")


@pytest.fixture(scope="module")
def reference() -> dict:
    result = run(None)
    assert result.code == 0, result.stderr
    return {a["patient"]: a for a in result.json()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_one_hostile_resource_from_the_server(case, reference):
    result = run(case.data)
    assert "Traceback" not in result.stderr
    assessed = {a["patient"]: a for a in result.json()}
    assert assessed["Patient/p1"] == reference["Patient/p1"]
    if case.expect in ("not-json", "refused"):
        assert result.code == 1
        assert "Patient/p2" not in assessed
        failed = [line for line in result.stderr.splitlines() if line.startswith("failed: Patient/p2:")]
        assert failed and "not valid FHIR JSON" in failed[0], result.stderr
    else:  # parsed, invalid: left out with a warning, the patient assessed without it (as the file reader does)
        assert result.code in (0, 1)
        assert "Observation/p2-ls" in result.stderr or "failed: Patient/p2" in result.stderr, result.stderr


def test_a_duplicate_subject_cannot_move_a_resource_between_patients(reference):
    """Issue 10, item 5: a second `subject` silently won."""
    case = next(c for c in CASES if c.name == "duplicate-subject")
    result = run(case.data)
    assert "failed: Patient/p2:" in result.stderr and "duplicate key 'subject'" in result.stderr
    assert {a["patient"]: a for a in result.json()}["Patient/p1"] == reference["Patient/p1"]


@pytest.mark.parametrize("case", cases(TARGET, other_patient="Patient/p1"), ids=lambda c: c.name)
def test_a_hostile_answer_about_one_patient(case, reference):
    """The server's whole answer to p2's pull is a case of the corpus: p2 fails by name, p1 is untouched."""
    result = run(case.data, whole=True)
    assert "Traceback" not in result.stderr
    assessed = {a["patient"]: a for a in result.json()}
    assert assessed["Patient/p1"] == reference["Patient/p1"]
    assert "Patient/p2" not in assessed and result.code == 1
    assert any(line.startswith("failed: Patient/p2:") for line in result.stderr.splitlines()), result.stderr
