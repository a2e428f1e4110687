"""Rule files: load, check and compile them. Pure: no engine, no I/O beyond reading the file.

A rule file (`rules/aibl.yaml`) is data a clinical reviewer reads. Each rule has a
stable `id`, a `stage`, a condition (`when`: named fact patterns that must all
match; `unless`: patterns that must not), what it asserts, a citation and, where it
implements a PROPOSAL of docs/clinical-specification.md, a note. This module turns that file into a
durable_rules JSON ruleset (`Rulebook.durable_definition`), and refuses a file that
could not be evaluated soundly.

Stages are how negation stays sound under forward chaining. The engine asserts
the base facts, then a stage marker for stage 1, 2, ... in turn, each only after
the previous stage has run to quiescence; a rule of stage k that has an `unless`
joins the marker of stage k. So a rule that says "no risk factor" is only ever
evaluated once every rule that could assert a risk factor has run. The compiler
enforces it: an `unless` pattern may only name fact types produced by base facts
or by rules of earlier stages, and a `when` pattern only types that no rule of a
later stage produces. A rule with only `when` patterns cannot be changed by what
arrives later, so it fires as soon as its facts exist and joins no marker
(`needs_stage_marker`): the same facts are derived, with fewer joins.

Pattern syntax (a mapping of field -> test):
    field: value                 equal
    field: {in: [a, b]}          one of
    field: {not_in: [a, b]}      none of
    field: {lt|le|gt|ge|ne: x}   comparison with a number or string (several operators: all hold)
    field: {exists: true|false}  present or absent
    x may be `$alias.field`, a field of another pattern of the same rule (a join); a pattern
    with a join may not also hold an `in` test of several values (`_check_or_beside_join`).
    `${param}` anywhere is replaced by the file's `params` value.
Assert templates copy fields from matched facts with `$alias.field`.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RulesError

STAGE_FACT = "$stage"
_NEVER_FACT = "$never"
#: the one rule that matches every fact and never fires (see compile_document)
SINK_RULE = "$sink"
_OPS = {"lt": "$lt", "le": "$lte", "gt": "$gt", "ge": "$gte", "ne": "$neq"}
_REF = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_PARAM = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ID = re.compile(r"^[A-Z][A-Z0-9]*(-[A-Z0-9]+)*$")
_RESERVED_FIELDS = {"id", "sid", "t"}


@dataclass(frozen=True)
class Rule:
    id: str
    stage: int
    title: str
    when: Mapping[str, Mapping[str, Any]]
    unless: tuple[Mapping[str, Any], ...]
    asserts: tuple[Mapping[str, Any], ...]
    citation: tuple[str, ...]
    note: str | None
    implements: tuple[str, ...]
    detail: str | None = None


@dataclass
class Rulebook:
    path: Path
    id: str
    version: str
    title: str
    content_hash: str
    params: Mapping[str, Any]
    base_facts: Mapping[str, Mapping[str, str]]
    outputs: Mapping[str, Mapping[str, Any]]
    citations: Mapping[str, str]
    rules: tuple[Rule, ...]
    stages: tuple[int, ...]
    durable_definition: dict = field(repr=False)
    fact_types: frozenset[str] = frozenset()
    boundary_mode: str = "default"
    modes: tuple[str, ...] = ("default",)
    #: whole-ruleset checks for `fhir-aibl rules check` (exclusive groups, requirements)
    checks: Mapping[str, Any] = field(default_factory=dict)
    #: the rule file's `modes` section: each mode's note and the params it replaces
    modes_spec: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The durable_rules ruleset name: id, version, content hash and boundary mode.

        A registered ruleset cannot be replaced in durable_rules, so every variant has its own name.
        """
        return f"{self.id}-{self.version}-{self.content_hash}-{self.boundary_mode}"

    def rule(self, rule_id: str) -> Rule:
        return self._by_id[rule_id]  # KeyError for an unknown id

    @functools.cached_property
    def _by_id(self) -> dict[str, Rule]:
        # asked for every output item of every assessment: a scan of 130 rules was a tenth of its cost
        return {rule.id: rule for rule in self.rules}

    def ruleset_definition(self) -> dict:
        """A fresh deep copy: durable_rules deletes `run` from the dict it is given."""
        return {self.name: copy.deepcopy(self.durable_definition)}


def load_rulebook(path: Path, *, extra_hash: str = "", mode: str = "default") -> Rulebook:
    """Load and compile a rule file in one boundary mode. `extra_hash` folds the value sets' hash into the content hash."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RulesError(f"cannot read rule file: {exc}", source=str(path)) from exc
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise RulesError(f"not valid YAML: {exc}", source=str(path)) from exc
    if not isinstance(doc, dict):
        raise RulesError("a rule file is a mapping", source=str(path))
    digest = hashlib.sha256(raw + b"\0" + extra_hash.encode()).hexdigest()[:12]
    return compile_document(doc, path=path, content_hash=digest, mode=mode)


def compile_document(doc: Mapping[str, Any], *, path: Path, content_hash: str, mode: str = "default") -> Rulebook:
    where = str(path)
    for key in ("id", "version", "rules", "facts", "outputs"):
        if key not in doc:
            raise RulesError(f"missing top-level '{key}'", source=where)
    rb_id = str(doc["id"])
    if not re.fullmatch(r"[a-z][a-z0-9-]*", rb_id):
        raise RulesError(f"ruleset id {rb_id!r} must be lower-case letters, digits and '-'", source=where)
    params = dict(doc.get("params") or {})
    modes = doc.get("modes") or {"default": {"params": {}}}
    if mode not in modes:
        raise RulesError(f"unknown boundary mode {mode!r}; the rule file defines {sorted(modes)}", source=where)
    params.update((modes[mode] or {}).get("params") or {})
    params["boundary_mode"] = mode
    citations = {str(k): str(v) for k, v in (doc.get("citations") or {}).items()}
    base_facts = {str(t): dict((spec or {}).get("fields") or {}) for t, spec in doc["facts"].items()}

    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw_rule in enumerate(doc["rules"]):
        rule = _parse_rule(raw_rule, index, params, citations, where)
        if rule.id in seen:
            raise RulesError(f"duplicate rule id {rule.id}", source=where)
        seen.add(rule.id)
        rules.append(rule)
    if not rules:
        raise RulesError("no rules", source=where)

    produced = _check_strata(rules, base_facts, where)
    outputs = dict(doc["outputs"])
    for name, spec in outputs.items():
        if spec.get("fact") not in produced:
            raise RulesError(f"output {name!r} reads fact type {spec.get('fact')!r} that no rule asserts", source=where)

    definition: dict[str, Any] = {}
    for rule in rules:
        definition[rule.id] = _compile_rule(rule)
    # One sink that matches every fact and never fires, so that asserting a fact no rule
    # is interested in (an output-only fact, a lab no rule reads yet, a stage marker no
    # rule joins) is not an error in durable_rules, which raises on a fact that reaches no
    # rule. One sink, not one per fact type: every join node costs each session's creation
    # and deletion about half a microsecond (bench/ "engine"), and the sinks were a quarter
    # of them.
    fact_types = frozenset(produced)
    definition[SINK_RULE] = {"all": [{"x": {"$ex": {"t": 1}}}, {"y": {"t": _NEVER_FACT}}], "run": SINK_RULE}
    stages = tuple(sorted({r.stage for r in rules}))
    return Rulebook(
        path=path,
        id=rb_id,
        version=str(doc["version"]),
        title=str(doc.get("title", rb_id)),
        content_hash=content_hash,
        params=params,
        base_facts=base_facts,
        outputs=outputs,
        citations=citations,
        rules=tuple(rules),
        stages=stages,
        durable_definition=definition,
        fact_types=fact_types,
        boundary_mode=mode,
        modes=tuple(modes),
        checks=dict(doc.get("checks") or {}),
        modes_spec=dict(modes),
    )


# -- parsing -------------------------------------------------------------------------------


def _substitute(value: Any, params: Mapping[str, Any], where: str) -> Any:
    if isinstance(value, str):
        whole = _PARAM.fullmatch(value)
        if whole:
            name = whole.group(1)
            if name not in params:
                raise RulesError(f"unknown parameter ${{{name}}}", source=where)
            return params[name]

        def repl(m: re.Match) -> str:
            if m.group(1) not in params:
                raise RulesError(f"unknown parameter ${{{m.group(1)}}}", source=where)
            return str(params[m.group(1)])

        return _PARAM.sub(repl, value)
    if isinstance(value, list):
        return [_substitute(v, params, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, params, where) for k, v in value.items()}
    return value


def _parse_rule(raw: Any, index: int, params: Mapping[str, Any], citations: Mapping[str, str], where: str) -> Rule:
    if not isinstance(raw, dict) or "id" not in raw:
        raise RulesError(f"rules[{index}] needs an 'id'", source=where)
    rid = str(raw["id"])
    here = f"{where}: rule {rid}"
    if not _ID.match(rid):
        raise RulesError("rule ids are upper-case words joined by '-' (e.g. C-HIGH-1)", source=here)
    for key in ("stage", "when", "assert", "citation"):
        if key not in raw:
            raise RulesError(f"missing '{key}'", source=here)
    raw = _substitute(raw, params, here)
    stage = raw["stage"]
    if not isinstance(stage, int) or stage < 1:
        raise RulesError("stage must be a whole number >= 1", source=here)
    when = raw["when"] or {}
    if not isinstance(when, dict):
        raise RulesError("'when' is a mapping of alias -> pattern", source=here)
    for alias, pattern in when.items():
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(alias)):
            raise RulesError(f"alias {alias!r} must be lower-case", source=here)
        _check_pattern(pattern, set(when), here)
    unless = raw.get("unless") or []
    if isinstance(unless, dict):
        unless = [unless]
    for pattern in unless:
        _check_pattern(pattern, set(when), here)
    asserts = raw["assert"]
    if isinstance(asserts, dict):
        asserts = [asserts]
    if not asserts:
        raise RulesError("a rule must assert at least one fact", source=here)
    for template in asserts:
        if not isinstance(template, dict) or "t" not in template:
            raise RulesError("every asserted fact needs a type 't'", source=here)
        for key, value in template.items():
            if key in ("id", "sid"):
                raise RulesError(f"'{key}' is reserved", source=here)
            if isinstance(value, str) and value.startswith("$"):
                m = _REF.match(value)
                if not m or m.group(1) not in when:
                    raise RulesError(f"{key}: {value!r} does not name a field of a 'when' pattern", source=here)
    cites = raw["citation"]
    cites = tuple([cites] if isinstance(cites, str) else cites)
    if not cites:
        raise RulesError("a rule needs a citation", source=here)
    for cite in cites:
        if cite not in citations:
            raise RulesError(f"citation {cite!r} is not declared under 'citations'", source=here)
    implements = raw.get("implements") or []
    implements = tuple([implements] if isinstance(implements, str) else implements)
    note = raw.get("note")
    # Every gap resolution G1-G23 of docs/clinical-specification.md section 1.3 is a PROPOSAL: the rule says why.
    if any("PROPOSAL" in str(x) or re.fullmatch(r"G\d+", str(x)) for x in implements) and not note:
        raise RulesError("a rule that implements a PROPOSAL (a G gap resolution) needs a note", source=here)
    return Rule(
        id=rid,
        stage=stage,
        title=str(raw.get("title", rid)),
        when={str(k): dict(v) for k, v in when.items()},
        unless=tuple(dict(p) for p in unless),
        asserts=tuple(dict(a) for a in asserts),
        citation=cites,
        note=str(note) if note else None,
        implements=implements,
        detail=raw.get("detail"),
    )


def _check_pattern(pattern: Any, aliases: set[str], here: str) -> None:
    if not isinstance(pattern, dict) or "t" not in pattern:
        raise RulesError("every pattern needs a literal fact type 't'", source=here)
    if not isinstance(pattern["t"], str) or pattern["t"].startswith("$"):
        raise RulesError("a pattern's 't' must be a literal fact type", source=here)
    for fld, test in pattern.items():
        if fld in ("id", "sid"):
            raise RulesError(f"'{fld}' is reserved", source=here)
        refs: list = []
        if isinstance(test, dict):
            if not test:
                raise RulesError(f"{fld}: empty test", source=here)
            for op, arg in test.items():
                if op not in _OPS and op not in ("in", "not_in", "exists", "eq"):
                    raise RulesError(f"{fld}: unknown operator {op!r}", source=here)
                if op in ("in", "not_in") and (not isinstance(arg, list) or not arg):
                    raise RulesError(f"{fld}: '{op}' takes a non-empty list", source=here)
                if op == "exists" and not isinstance(arg, bool):
                    raise RulesError(f"{fld}: 'exists' takes true or false", source=here)
                refs.extend(arg if isinstance(arg, list) else [arg])
        else:
            refs = [test]
        for ref in refs:
            if isinstance(ref, str) and ref.startswith("$"):
                m = _REF.match(ref)
                if not m or m.group(1) not in aliases:
                    raise RulesError(f"{fld}: {ref!r} does not name a field of a 'when' pattern", source=here)
    _check_or_beside_join(pattern, here)


def _joins(test: Any) -> bool:
    values = list(test.values()) if isinstance(test, dict) else [test]
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return any(isinstance(v, str) and _REF.match(v) for v in flat)


def _check_or_beside_join(pattern: Mapping[str, Any], here: str) -> None:
    """Refuse a one-of test of several values in a pattern that also joins another pattern's field.

    durable_rules evaluates such a pattern (an `$or` beside a comparison with a field of another
    fact) as matching every fact of its type: measured with `{in: [report, procedure]}` beside
    `{lt: $d.age_months}`, which matched an Observation of any age. A rule written that way would
    fire where it must not, silently; write the one-of test another way (`ne`, `not_in`, or a
    rule per value).
    """
    ors = [f for f, test in pattern.items() if isinstance(test, dict) and len(test.get("in") or []) > 1]
    joined = [f for f, test in pattern.items() if f != "t" and _joins(test)]
    if ors and joined:
        raise RulesError(
            f"{ors[0]}: an 'in' test of several values beside a join ({joined[0]}) matches every fact in "
            "durable_rules; use 'ne' or 'not_in', or one rule per value",
            source=here,
        )


def _pattern_fields(rule: Rule) -> list[tuple[str, Mapping[str, Any], bool]]:
    out = [(p["t"], p, True) for p in rule.when.values()]
    out += [(p["t"], p, False) for p in rule.unless]
    return out


def _check_strata(rules: list[Rule], base_facts: Mapping[str, Mapping[str, str]], where: str) -> set[str]:
    """Every pattern names a fact type something produces, soon enough; fields exist. Returns all fact types."""
    produced_at: dict[str, int] = {t: 0 for t in base_facts}
    fields: dict[str, set[str]] = {t: set(f) | {"t"} for t, f in base_facts.items()}
    for rule in rules:
        for template in rule.asserts:
            t = template["t"]
            produced_at[t] = min(produced_at.get(t, rule.stage), rule.stage)
            fields.setdefault(t, {"t"}).update(template)
    latest: dict[str, int] = dict(produced_at)
    for rule in rules:
        for template in rule.asserts:
            latest[template["t"]] = max(latest.get(template["t"], 0), rule.stage)
    for rule in rules:
        here = f"{where}: rule {rule.id}"
        for fact_type, pattern, positive in _pattern_fields(rule):
            if fact_type not in produced_at:
                raise RulesError(f"pattern on fact type {fact_type!r} that no base fact or rule produces", source=here)
            unknown = set(pattern) - fields[fact_type]
            if unknown:
                raise RulesError(f"fact type {fact_type!r} has no field(s) {sorted(unknown)}", source=here)
            # Every producer, not only the first: then a stage's facts are complete once the
            # rules of that stage have run, whatever order the engine fires them in
            # (`_compile_rule` relies on it).
            if positive and latest[fact_type] > rule.stage:
                raise RulesError(
                    f"'when' on {fact_type!r}, which rules of stage {latest[fact_type]} assert, after this rule's stage {rule.stage}",
                    source=here,
                )
            if not positive and latest[fact_type] >= rule.stage:
                raise RulesError(
                    f"'unless' on {fact_type!r}, which rules of stage {latest[fact_type]} assert: "
                    f"negation must only look at facts complete before stage {rule.stage}",
                    source=here,
                )
        for template in rule.asserts:
            for key, value in template.items():
                if isinstance(value, str):
                    m = _REF.match(value)
                    if m:
                        src_type = rule.when[m.group(1)]["t"]
                        if m.group(2) not in fields[src_type]:
                            raise RulesError(f"{key}: fact type {src_type!r} has no field {m.group(2)!r}", source=here)
    return set(produced_at)


# -- compiling -----------------------------------------------------------------------------


def _alias(name: str) -> str:
    # durable_rules' action context uses `s` and `m` itself: prefix every user alias.
    return f"a_{name}"


def _operand(value: Any) -> Any:
    if isinstance(value, str):
        m = _REF.match(value)
        if m:
            return {_alias(m.group(1)): m.group(2)}
    return value


def _compile_test(fld: str, test: Any) -> dict:
    if isinstance(test, dict):
        if len(test) > 1:  # several operators on one field: all must hold
            return {"$and": [_compile_test(fld, {op: arg}) for op, arg in test.items()]}
        (op, arg), = test.items()
        if op == "eq":
            return {fld: _operand(arg)}
        if op in _OPS:
            return {_OPS[op]: {fld: _operand(arg)}}
        if op == "in":
            return {"$or": [{fld: _operand(v)} for v in arg]} if len(arg) > 1 else {fld: _operand(arg[0])}
        if op == "not_in":
            return {"$and": [{"$neq": {fld: _operand(v)}} for v in arg]}
        if op == "exists":
            return {"$ex" if arg else "$nex": {fld: 1}}
    return {fld: _operand(test)}


def compile_pattern(pattern: Mapping[str, Any]) -> dict:
    tests = [{"t": pattern["t"]}] + [_compile_test(f, v) for f, v in pattern.items() if f != "t"]
    return tests[0] if len(tests) == 1 else {"$and": tests}


def needs_stage_marker(rule: Rule) -> bool:
    """Whether the rule must wait for its stage's marker: only where timing could change its result.

    A rule with an `unless` must: it may only be evaluated once the facts it negates are
    complete. A rule with only `when` patterns is monotone: it fires once for every match
    whenever the match completes, and `_check_strata` guarantees that whatever it reads is
    produced at or before its own stage and that whatever it asserts is negated only by
    later stages. Firing it as soon as its facts exist therefore derives exactly the same
    facts, by the same rules from the same parents, as waiting for its marker; it only
    saves a join per rule, which every session pays for at creation (bench/ "engine").
    A rule with no pattern at all fires once, at its marker.
    """
    return bool(rule.unless) or not rule.when


def _compile_rule(rule: Rule) -> dict:
    terms: list[dict] = []
    if needs_stage_marker(rule):
        terms.append({"stage": {"$and": [{"t": STAGE_FACT}, {"n": rule.stage}]}})
    for alias, pattern in rule.when.items():
        terms.append({_alias(alias): compile_pattern(pattern)})
    for i, pattern in enumerate(rule.unless):
        terms.append({f"n{i}$not": compile_pattern(pattern)})
    return {"all": terms, "run": rule.id}


def matched_aliases(rule: Rule) -> list[tuple[str, str]]:
    """(rule alias, durable alias) of the positive patterns, in order."""
    return [(alias, _alias(alias)) for alias in rule.when]


def compile_assert(template: Mapping[str, Any]) -> tuple[tuple[str, str | None, Any], ...]:
    """An assert template as (field, alias, source field) for `$alias.field`, (field, None, value) for a literal.

    Done once per rule, so that firing a rule copies fields without parsing its template.
    """
    out = []
    for key, value in template.items():
        m = _REF.match(value) if isinstance(value, str) else None
        out.append((key, m.group(1), m.group(2)) if m else (key, None, value))
    return tuple(out)


def render_compiled(compiled: tuple[tuple[str, str | None, Any], ...], matched: Mapping[str, Mapping[str, Any]]) -> dict:
    """The fact a rule asserts, from its compiled template and the facts its `when` patterns matched (by alias)."""
    return {key: (value if alias is None else matched[alias].get(value)) for key, alias, value in compiled}
