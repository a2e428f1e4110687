"""Where the ruleset and the worked examples are found, and `--rules` moving the whole ruleset.

The wheel itself is built, installed into a fresh environment and run from another folder by
scripts/check_wheel.sh (CI); these tests cover what can be checked in process.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest

from fhir_aibl import cli
from fhir_aibl.assess import Assessor
from fhir_aibl.cds import command as cds_command
from fhir_aibl.errors import RulesError
from fhir_aibl.resources import examples_dir, ruleset_paths, shipped_rules_dir

from .conftest import FIXTURES, ROOT

MARKER = "Marker text of a copied catalogue"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def moved_rules(tmp_path: Path) -> Path:
    """A copy of the shipped ruleset elsewhere, whose catalogue says something the shipped one does not."""
    folder = tmp_path / "site-rules"
    shutil.copytree(ROOT / "rules", folder, ignore=shutil.ignore_patterns("__init__.py", "__pycache__"))
    catalogue = folder / "recommendations.yaml"
    text = catalogue.read_text(encoding="utf-8")
    assert "title: Repeat DXA in 12 months" in text
    catalogue.write_text(text.replace("title: Repeat DXA in 12 months", f"title: {MARKER}"), encoding="utf-8")
    return folder


def test_shipped_data_is_package_data():
    # In this (editable) install the package data are the repository's own folders.
    assert shipped_rules_dir() == ROOT / "rules"
    assert examples_dir() == FIXTURES
    paths = ruleset_paths()
    assert paths.rules.is_file() and paths.valuesets.is_dir() and paths.catalogue.is_file()


def test_ruleset_paths_take_a_folder_or_a_file(moved_rules):
    by_dir, by_file = ruleset_paths(moved_rules), ruleset_paths(moved_rules / "aibl.yaml")
    assert by_dir == by_file
    assert by_dir.valuesets == moved_rules / "valuesets" and by_dir.catalogue == moved_rules / "recommendations.yaml"


def test_a_folder_without_a_rule_file_is_refused(tmp_path):
    with pytest.raises(RulesError, match="must hold aibl.yaml"):
        ruleset_paths(tmp_path)


def test_rules_folder_moves_the_catalogue_for_fhir_output(capsys, moved_rules):
    v06 = FIXTURES / "bundles" / "V06.json"
    code, shipped, err = run(capsys, "assess", v06, "--as-of", "2026-06-01", "--format", "fhir")
    assert code == 0, err
    assert MARKER not in shipped
    code, moved, err = run(capsys, "assess", v06, "--as-of", "2026-06-01", "--format", "fhir", "--rules", moved_rules)
    assert code == 0, err
    assert MARKER in moved
    # The catalogue is part of the ruleset's content hash, so the name says which texts were used.
    assert Assessor(moved_rules).rulebook.name != Assessor().rulebook.name


def test_demo_takes_rules_and_extra_paths(capsys, tmp_path, moved_rules):
    extra = tmp_path / "extra.json"
    bundle = json.loads((FIXTURES / "bundles" / "V06.json").read_text())
    for entry in bundle["entry"]:  # the same record under another patient id
        text = json.dumps(entry["resource"]).replace("v06", "extra06")
        entry["resource"] = json.loads(text)
    extra.write_text(json.dumps(bundle))
    out_dir = tmp_path / "demo"
    code, out, err = run(capsys, "demo", extra, "--out", out_dir, "--rules", moved_rules)
    assert code == 0, err
    n = len(list((FIXTURES / "bundles").glob("*.json")))
    assert re.search(rf"^{n + 1} patients assessed, 0 inputs rejected\.$", out, re.M)
    assert MARKER in (out_dir / "careplans-bundle.json").read_text()
    assert f"ruleset {Assessor(moved_rules).rulebook.name}" in out.splitlines()[0]


def test_rules_doc_writes_to_the_current_folder(capsys, tmp_path, monkeypatch):
    committed = ROOT / "docs" / "rules.md"
    before = committed.stat().st_mtime_ns
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "rules", "doc")
    assert code == 0
    assert (tmp_path / "rules.md").is_file() and (tmp_path / "rules.html").is_file()
    assert committed.stat().st_mtime_ns == before  # the project's copy is written only when asked


def test_rules_check_takes_a_folder(capsys, moved_rules):
    code, out, err = run(capsys, "rules", "check", "--rules", moved_rules, "--mode", "default")
    assert code == 0, out + err
    assert Assessor(moved_rules).rulebook.name in out


def test_serve_rules_moves_the_ruleset(tmp_path, moved_rules):
    parser = argparse.ArgumentParser()
    cds_command.add_arguments(parser)
    config = tmp_path / "cds.yaml"
    config.write_text(f"public_base_url: https://cds.example.org\nfeedback: {{database: {tmp_path / 'f.sqlite3'}}}\n")
    served = []
    args = parser.parse_args(["--config", str(config), "--rules", str(moved_rules), "--workers", "1"])
    assert cds_command.run(args, serve=lambda app, **kw: served.append(app)) == 0
    service = served[0].state.cds
    try:
        assert service.assessor.paths.rules == moved_rules / "aibl.yaml"
        assert service.catalogue.recommendations["dxa-12m"].title == MARKER
    finally:
        service.close()


def test_every_subpackage_is_packaged():
    """pyproject.toml lists the packages (the data folders are mapped in), so a new one must be added there."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "fhir_aibl").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert config["package-dir"] == {"fhir_aibl.rules": "rules", "fhir_aibl.examples": "fixtures"}


def test_no_module_finds_data_by_walking_up():
    """Shipped data is package data (fhir_aibl/resources.py): nothing looks above the package folder."""
    offenders = []
    for path in (ROOT / "fhir_aibl").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        if re.search(r"__file__\)?\.resolve\(\)\.parent\.parent|__file__\)?\.resolve\(\)\.parents\[", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_rules_doc_into_a_folder_that_cannot_be_made_exits_2(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run(capsys, "rules", "doc", "--out", blocker / "docs")
    assert code == 2
    assert err.startswith("fatal: cannot write into") and "Traceback" not in err
