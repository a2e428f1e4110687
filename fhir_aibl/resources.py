"""Where the shipped data is: the ruleset and the worked examples, as package data.

The rule files live in the repository's top-level `rules/` (reviewers edit them there) and the
worked examples in `fixtures/`. pyproject.toml maps those two folders into the package as
`fhir_aibl.rules` and `fhir_aibl.examples`, so a wheel carries them and an editable install
points at the folders themselves; either way they are found with importlib.resources, never by
walking up from the package folder.

A ruleset is three things that move together: the rule file, its value sets (`valuesets/`
beside it) and its recommendation catalogue (`recommendations.yaml` beside it).
`ruleset_paths(path)` takes what `--rules` names, a folder holding `aibl.yaml` or a rule file,
and returns all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .errors import RulesError

RULE_FILE = "aibl.yaml"
VALUESETS = "valuesets"
CATALOGUE = "recommendations.yaml"


def _package_dir(package: str, member: str) -> Path:
    """A folder of package data as a file-system path (wheels and editable installs are unzipped)."""
    path = Path(str(files(package).joinpath(member)))
    if not path.exists():
        raise RulesError(f"package data missing: {package}/{member} (a broken installation)")
    return path


def shipped_rules_dir() -> Path:
    """The shipped ruleset's folder: `rules/` of the repository, `fhir_aibl/rules/` of a wheel."""
    return _package_dir("fhir_aibl.rules", RULE_FILE).parent


def examples_dir() -> Path:
    """The worked examples' folder (`bundles/` and `expected.json`): `fixtures/` of the repository."""
    return _package_dir("fhir_aibl.examples", "bundles").parent


@dataclass(frozen=True)
class RulesetPaths:
    rules: Path
    valuesets: Path
    catalogue: Path


def ruleset_paths(path: Path | str | None = None) -> RulesetPaths:
    """The rule file, value sets and catalogue of a ruleset: a folder, a rule file, or None (shipped)."""
    if path is None:
        folder = shipped_rules_dir()
        rules = folder / RULE_FILE
    else:
        path = Path(path)
        if path.is_dir():
            folder, rules = path, path / RULE_FILE
            if not rules.is_file():
                raise RulesError(f"rule file not found: {rules} (a --rules folder must hold {RULE_FILE})")
        elif path.is_file():
            folder, rules = path.parent, path
        else:
            raise RulesError(f"rule file not found: {path}")
    return RulesetPaths(rules=rules, valuesets=folder / VALUESETS, catalogue=folder / CATALOGUE)


RULES_HELP = (
    "the ruleset to use: a folder holding aibl.yaml, or a rule file; its value sets (valuesets/) and "
    "recommendation catalogue (recommendations.yaml) are taken from the same folder "
    "(default: the ruleset shipped inside the package)"
)
