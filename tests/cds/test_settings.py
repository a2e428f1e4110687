"""Settings: defaults, YAML and JSON files, refusals with the reason, and the README documents every one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from fhir_aibl.cds.settings import ASYMMETRIC_ALGORITHMS, Settings, SettingsError, load_settings, settings_for_tests

from ..conftest import ROOT

DOC = ROOT / "docs" / "cds-hooks.md"


def test_defaults_are_safe():
    s = Settings()
    assert s.allow_unsigned is False
    assert s.jwt.issuers == [] and s.fhir.allowlist == [] and s.cors_origins == []
    assert set(s.jwt.algorithms) == set(ASYMMETRIC_ALGORITHMS)
    assert s.feedback.suppression_days == 30
    assert s.fhir.budget_seconds < s.request_deadline_seconds


def test_yaml_file_with_relative_paths(tmp_path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "ehr.json").write_text("{}")
    config = tmp_path / "cds.yaml"
    config.write_text(
        "public_base_url: https://cds.example.org/\n"
        "cors_origins: [https://ehr.example.org]\n"
        "jwt:\n  issuers:\n    - {iss: https://ehr.example.org, jku: [https://ehr.example.org/jwks.json], jwks_file: keys/ehr.json}\n"
        "fhir: {allowlist: [https://ehr.example.org/fhir/], budget_seconds: 2}\n"
        "feedback: {database: data/feedback.sqlite3, suppression_days: 7}\n"
    )
    s = load_settings(config)
    assert s.public_base_url == "https://cds.example.org"
    assert s.fhir.allowlist == ["https://ehr.example.org/fhir"]
    assert s.jwt.issuers[0].jwks_file == tmp_path / "keys" / "ehr.json"
    assert s.feedback.database == tmp_path / "data" / "feedback.sqlite3"
    assert s.feedback.suppression_days == 7


def test_json_file_and_overrides(tmp_path):
    config = tmp_path / "cds.json"
    config.write_text(json.dumps({"request_deadline_seconds": 8, "allow_unsigned": False}))
    s = load_settings(config, allow_unsigned=True)
    assert s.request_deadline_seconds == 8 and s.allow_unsigned is True


def test_an_empty_file_is_the_defaults(tmp_path):
    config = tmp_path / "empty.yaml"
    config.write_text("")
    assert load_settings(config) == Settings()


@pytest.mark.parametrize(
    "text, why",
    [
        ("unknown_setting: 1\n", "unknown_setting"),
        ("jwt: {algorithms: [HS256]}\n", "only asymmetric algorithms"),
        ("jwt: {algorithms: [none]}\n", "only asymmetric algorithms"),
        ("jwt: {issuers: [{iss: x}]}\n", "needs jku URLs or a jwks_file"),
        ("jwt: {issuers: [{iss: x, jku: ['ftp://x/jwks']}]}\n", "absolute http(s) URL"),
        ("fhir: {allowlist: ['https://user:pw@ehr/fhir']}\n", "must not carry credentials"),
        ("fhir: {budget_seconds: 9}\n", "below request_deadline_seconds"),
        ("patient_view_id: 'a/b'\n", "patient_view_id"),
        ("order_select_id: aibl-patient-view\n", "must differ"),
        ("- a list\n", "a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_files_are_refused_with_the_reason(tmp_path, text, why):
    config = tmp_path / "cds.yaml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=re.escape(why)):
        load_settings(config)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="cannot read configuration"):
        load_settings(tmp_path / "nope.yaml")


def test_settings_for_tests_puts_the_database_in_the_directory(tmp_path):
    s = settings_for_tests(tmp_path, feedback={"suppression_days": 1})
    assert s.feedback.database == tmp_path / "cds-feedback.sqlite3" and s.feedback.suppression_days == 1


def _setting_names(model: type[BaseModel], prefix: str = "") -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and name in ("jwt", "fhir", "feedback"):
            names += _setting_names(annotation, f"{prefix}{name}.")
        else:
            names.append(prefix + name)
    return names


def test_the_readme_part_documents_every_setting():
    # The configuration reference is generated from the settings (tests/test_docs.py checks it is current).
    reference = DOC.parent / "configuration.md"
    if not reference.exists():
        pytest.fail("docs/configuration.md is missing")
    text = reference.read_text()
    missing = [name for name in _setting_names(Settings) if f"`{name}`" not in text]
    assert missing == []


def test_the_readme_example_configuration_loads(tmp_path):
    text = DOC.read_text()
    block = re.search(r"```yaml\n(# cds\.yaml.*?)```", text, re.S)
    assert block, "docs/cds-hooks.md has no example configuration (a ```yaml block starting with '# cds.yaml')"
    config = tmp_path / "cds.yaml"
    config.write_text(block.group(1))
    s = load_settings(config)
    assert s.jwt.issuers and s.fhir.allowlist
    assert Path(s.feedback.database).is_absolute()
