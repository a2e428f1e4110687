"""Fixtures of the connector tests: a SEKMET FHIR server loaded with the worked examples and
the real records of ../shared/data, started once and copied for tests that write.

`sekmet_seed` loads the data into a server once per session and keeps its database;
`loaded_server` is a server on a copy of it for tests that only read; `server_factory`
starts another copy for each test that writes (about a second each), so that no test
sees another's writes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fhir_aibl.assess import Assessor
from fhir_aibl.fhir import command

from ..conftest import FIXTURES, SHARED_DATA
from ..fhir_server import SekmetUnavailable, data_dir_of, sekmet_fixture, sekmet_server, unavailable
from .loading import load_files

SYNTHEA = SHARED_DATA / "synthea-r4-osteoporosis" / "bundles"
JENNY = SHARED_DATA / "mcode-stu4-examples" / "Bundle-mcode-patient-bundle-jenny-m.json"
AS_OF = "2026-06-01"


@dataclass
class Seed:
    data_dir: Path
    #: files loaded, and whether the real records of ../shared/data were among them
    files: list[Path] = field(default_factory=list)
    shared: bool = False
    resources: int = 0


def seed_files() -> tuple[list[Path], bool]:
    files = sorted((FIXTURES / "bundles").glob("*.json"))
    shared = SYNTHEA.is_dir() and JENNY.is_file()
    if shared:
        files += sorted(SYNTHEA.glob("*.json")) + [JENNY]
    return files, shared


@pytest.fixture(scope="session")
def sekmet_seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    tmp = tmp_path_factory.mktemp("sekmet-seed")
    files, shared = seed_files()
    try:
        # Loading skips SEKMET's validation of each resource (a third of the load time): the
        # files pass fhir-aibl's own R4 validation when read (read_paths reports no problem),
        # and the servers the tests run against, copies of this one, validate every write.
        with sekmet_server(tmp, extra_config={"validation": {"inbound": "off"}}) as base_url:
            resources = load_files(base_url, files)
    except SekmetUnavailable as exc:
        unavailable(str(exc))
    return Seed(data_dir=data_dir_of(base_url, tmp), files=files, shared=shared, resources=resources)


def _copy_of_seed(seed: Seed, tmp: Path) -> Iterator[str]:
    stack = contextlib.ExitStack()
    try:
        base_url = stack.enter_context(sekmet_server(tmp, seed=seed.data_dir))
    except SekmetUnavailable as exc:
        unavailable(str(exc))
    with stack:
        yield base_url


@pytest.fixture(scope="session")
def loaded_server(sekmet_seed: Seed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server holding every loaded record, for the session; tests using it must not write."""
    yield from _copy_of_seed(sekmet_seed, tmp_path_factory.mktemp("sekmet-read"))


@pytest.fixture()
def fresh_server(sekmet_seed: Seed, tmp_path: Path) -> Iterator[str]:
    """A server of this test's own holding every loaded record, stopped after the test."""
    yield from _copy_of_seed(sekmet_seed, tmp_path)


@dataclass
class CommandRun:
    code: int
    stdout: str
    stderr: str

    def json(self) -> list[dict]:
        return json.loads(self.stdout)


@functools.cache
def shared_assessor() -> Assessor:
    """One Assessor for every command run of the tests, as the command shares one per process."""
    return Assessor()


def run_command(*argv: str, session=None, environ: dict | None = None) -> CommandRun:
    """`fhir-aibl run ARGV` through add_arguments/run, capturing its output; no FHIR_AIBL_TOKEN
    from the test environment unless `environ` gives one."""
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = command.run(
        args,
        assessor=shared_assessor(),
        session=session,
        environ=environ if environ is not None else {},
        stdout=out,
        stderr=err,
    )
    return CommandRun(code, out.getvalue(), err.getvalue())


#: The shared fixture of tests/fhir_server.py, as any conftest would use it (tested in test_fhir_server.py).
sekmet_base_url = sekmet_fixture()
