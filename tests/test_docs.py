"""The documentation: generated pages are current, and nothing names a file outside the repository."""

from __future__ import annotations

import re

from fhir_aibl import configdoc

from .conftest import ROOT


def test_configuration_reference_is_current():
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == configdoc.build(), "docs/configuration.md is stale: run `python -m fhir_aibl.configdoc`"


def test_configuration_reference_names_every_setting():
    from fhir_aibl.cds.settings import Settings

    page = configdoc.build()
    for name in Settings.model_fields:
        assert f"**`{name}`**" in page or f"**`{name}." in page


def _documents():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))


def test_no_document_names_a_folder_of_a_machine():
    for path in _documents():
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"(?<![\w.])/(?:work|root|home|tmp)/\S*", text)
        assert not found, f"{path.relative_to(ROOT)} names {found[:3]}"
        assert "../shared" not in text, f"{path.relative_to(ROOT)} refers to ../shared, outside the repository"


def test_hand_written_documents_cite_nothing_outside_the_repository():
    # docs/rules.md is generated from the rule files, whose citations are reviewed with the rules.
    for path in _documents():
        if path.name == "rules.md":
            continue
        text = path.read_text(encoding="utf-8")
        assert "CLINICAL.md" not in text and "DESIGN.md" not in text, path.relative_to(ROOT)


def test_the_clinical_specification_in_the_docs_is_the_current_one():
    """docs/clinical-specification.md is the specification the rules cite, kept in the repository so
    that every citation resolves inside it; it must not drift from the one the team maintains
    (../shared/CLINICAL.md, beside the project where it is available)."""
    shared = ROOT.parent / "shared" / "CLINICAL.md"
    if not shared.exists():
        pytest.skip("../shared/CLINICAL.md is not beside the project")
    ours = (ROOT / "docs" / "clinical-specification.md").read_text(encoding="utf-8")
    assert ours == shared.read_text(encoding="utf-8"), "copy ../shared/CLINICAL.md to docs/clinical-specification.md"
