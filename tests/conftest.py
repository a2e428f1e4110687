"""Shared test fixtures: one Assessor per test session (value sets and rules load once)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from fhir_aibl.assess import Assessor

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data"
AS_OF = dt.date(2026, 6, 1)


@pytest.fixture(scope="session")
def assessor() -> Assessor:
    return Assessor()


@pytest.fixture(scope="session")
def expected() -> dict:
    return json.loads((FIXTURES / "expected.json").read_text())


def shared(rel: str) -> Path:
    """A path in ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"../shared/data/{rel} is not beside the project")
    return path
