"""The rules engine: evaluates one patient's facts against a compiled rulebook on durable_rules.

This is the only module that imports durable_rules. Behind `Engine.evaluate` the
rest of the package sees facts in and a `Derivation` out, so the engine can be
replaced without touching facts, rules or outputs.

What durable_rules needs, measured on our machines (DEVELOPERS.md), and how it is met here:
- It is not thread-safe (concurrent calls segfault): every call goes through
  `_LOCK`, one per process. The C code holds the GIL anyway, so the lock costs no
  throughput; scale out with processes.
- One Host per process (`_host()`), because every Host starts threads that never
  stop. Ours does not start them at all (`_Host._run`): those threads poll for
  queued actions and timers, which we never use, and a poller running an action of
  our session on its own thread would race the evaluation.
- At most 1,024 live sessions per ruleset: each evaluation has its own `sid` and
  `delete_state` runs in `finally`, so memory stays flat over millions of runs.
- Facts, not events (`assert_fact(s)`): an event is consumed by the first rule
  that matches it. Asserting an identical fact twice raises, so derived facts are
  de-duplicated here by their content before they are asserted.
- durable_rules swallows an exception in an action into the session state; here the
  actions record their own errors, and every error fails the evaluation.
- JSON rulesets: the engine deletes `run` from the dict it is given, so it gets a
  deep copy; a registered ruleset cannot be replaced, so its name carries version
  and content hash. Actions take one parameter (two would make them asynchronous).

The hot path (issue 6, bench/run.py "engine"): durable_rules' Python layer costs more than
its C engine. Per action it builds a Closure (two clock reads), serialises the session
state with `json` and sends it back (`update_state`) although our actions never change
it, and every message and fact goes through the pure-`json` module. So `evaluate` drives
the C engine (`durable_rules_engine`, the extension module `durable.engine` wraps; pinned
with durable_rules==2.0.28) itself, in the same order of calls as `Host.assert_fact(s)` ->
`Ruleset.do_actions` -> `_flush_actions`: assert, start the session's queued actions, run
each action, `complete_and_start_action`, `abandon_action` on failure. What it leaves out
changes nothing an evaluation can see:
- `update_state` and `get_state`: the session state is never written by our actions; an
  action's exception is recorded in the evaluation context instead of the state, and
  `evaluate` raises it as before;
- `orjson` instead of `json` for messages (both parse JSON to the same Python values; any
  value orjson would write differently, `null` for NaN, or cannot write, an integer beyond
  64 bits, goes through `json` as before);
- derived facts of a type no rule reads (`flag`, `audit`, ... : only the sink matches them)
  are kept in the derivation but not sent to durable_rules, where they could change nothing;
- the facts an action derives are collected and asserted together once the action queue is
  empty (`_assert`), one call per round instead of one per fact.

What an evaluation costs in durable_rules' C engine, measured (bench/ "engine", perf): creating
and deleting the session is proportional to the ruleset's join nodes (every join gets two
512-entry hash indexes, zeroed at creation: about 0.5 us each), and matching a fact walks every
alpha test on `t`. So the compiled ruleset has as few joins as the rules allow: one sink for
every fact type instead of one per type, and stage markers joined only by the rules that
negate (rulebook.needs_stage_marker), 284 joins instead of 477.
"""

from __future__ import annotations

import itertools
import json
import threading
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import durable_rules_engine as _durable_c
import orjson
from durable.engine import Host

from .errors import EvaluationError
from .rulebook import STAGE_FACT, Rulebook, compile_assert, matched_aliases, needs_stage_marker, render_compiled

_LOCK = threading.RLock()
_HOST: "_Host | None" = None
_REGISTERED: dict[str, Rulebook] = {}
_SID = itertools.count(1)


_NOT_CONTENT = frozenset(("t", "id", "sid"))
#: a base fact's `refs` say where it came from, not what it is
_NOT_BASE_CONTENT = _NOT_CONTENT | {"refs"}


def fact_key(fact: Mapping[str, Any], _skip: frozenset = _NOT_CONTENT) -> str:
    """The identity of a fact: its type and content. Two derivations of the same fact are one fact."""
    # items, not keys: the keys are unique, so sorting never compares two values
    return "|".join([str(fact["t"]), *[f"{key}={value!r}" for key, value in sorted(fact.items()) if key not in _skip]])


@dataclass
class DerivedFact:
    key: str
    fact: dict
    #: (rule id, keys of the facts that rule matched), one per derivation
    derivations: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)


@dataclass
class Derivation:
    """What one evaluation produced: every fact, how it was derived, which rules fired."""

    base: dict[str, dict]
    derived: dict[str, DerivedFact]
    fired: list[str]
    #: evidence_for's answers: a derivation never changes once made, and the outputs ask for
    #: the same facts' evidence several times
    _evidence: dict[str, list[str]] = field(default_factory=dict, repr=False, compare=False)

    def of_type(self, fact_type: str) -> list[DerivedFact]:
        return [d for d in self.derived.values() if d.fact["t"] == fact_type]

    def all_evidence(self) -> list[str]:
        """Every FHIR reference behind any derived fact: what every fired rule used.

        A base fact is behind some derived fact exactly when it is the direct parent of one
        (a path from a derived fact down to a base fact ends in such a step), so this is
        the references of every base fact that some derivation names as a parent.
        """
        refs: set[str] = set()
        base = self.base
        for key, derived in self.derived.items():
            if key in base:  # derived again by a rule: still a base fact, as evidence_for reads it
                refs.update(base[key].get("refs") or ())
            for _rule, parents in derived.derivations:
                for parent in parents:
                    if parent in base:
                        refs.update(base[parent].get("refs") or ())
        return sorted(refs)

    def evidence_for(self, key: str) -> list[str]:
        """Every FHIR reference behind a fact, following derivations back to base facts."""
        known = self._evidence.get(key)
        if known is None:
            known = self._evidence[key] = self._trace_evidence(key)
        return list(known)

    def _trace_evidence(self, key: str) -> list[str]:
        refs: set[str] = set()
        stack, seen = [key], set()
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            if k in self.base:
                refs.update(self.base[k].get("refs") or ())
            elif k in self.derived:
                for _rule, parents in self.derived[k].derivations:
                    stack.extend(parents)
        return sorted(refs)

    def rules_behind(self, key: str) -> list[str]:
        """Every rule in the derivation tree of a fact."""
        rules: set[str] = set()
        stack, seen = [key], set()
        while stack:
            k = stack.pop()
            if k in seen or k not in self.derived:
                continue
            seen.add(k)
            for rule, parents in self.derived[k].derivations:
                rules.add(rule)
                stack.extend(parents)
        return sorted(rules)


@dataclass
class _Context:
    rulebook: Rulebook
    sid: str
    base: dict[str, dict]
    derived: dict[str, DerivedFact] = field(default_factory=dict)
    fired: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: what durable_rules' Promise would have written into the session state as `exception`
    action_failure: str | None = None
    #: derived facts a rule reads, waiting to be asserted (Engine._assert)
    pending: list[dict] = field(default_factory=list)


class _Host(Host):
    def _run(self) -> None:  # no dispatcher threads: see the module docstring
        return None

    def get_action(self, action_name: str):
        # durable's Ruleset wraps one callable per rule at registration; evaluations never
        # run them (Engine._assert runs the actions), so reaching one is a bug, said loudly.
        return _not_dispatched


def _not_dispatched(c) -> None:
    raise RuntimeError("durable_rules dispatched an action outside Engine.evaluate")


def _host() -> _Host:
    global _HOST
    if _HOST is None:
        _HOST = _Host()
    return _HOST


def _register(rulebook: Rulebook) -> None:
    known = _REGISTERED.get(rulebook.name)
    if known is not None:
        if known.durable_definition != rulebook.durable_definition:  # same name, other content: refuse
            raise EvaluationError(f"ruleset {rulebook.name} is already registered with other content")
        return
    _host().set_rulesets(rulebook.ruleset_definition())
    _REGISTERED[rulebook.name] = rulebook


def _dumps(value: Any) -> str:
    """JSON for the C engine; what `json.dumps(value, ensure_ascii=False)` means, faster.

    orjson writes NaN and infinities as `null` and refuses integers beyond 64 bits; `json`
    writes the former as `NaN`/`Infinity`. Anything with a `null` in it (None, or such a
    float) and anything orjson refuses is written by `json`, so the engine sees the same text
    it always did where the two could differ.
    """
    try:
        out = orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False)
    if b"null" in out:
        return json.dumps(value, ensure_ascii=False)
    return out.decode()


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:  # NaN, big integers: the json module reads them as before
        return json.loads(text)


@dataclass(frozen=True)
class _RulePlan:
    """What an action needs of its rule, looked up once per engine instead of once per firing."""

    rule_id: str
    aliases: tuple[tuple[str, str], ...]
    #: each assert template, compiled (rulebook.compile_assert)
    asserts: tuple[tuple[tuple[str, str | None, Any], ...], ...]


class Engine:
    """Evaluates facts with one rulebook. Safe to share between threads; evaluations are serialised."""

    def __init__(self, rulebook: Rulebook):
        self.rulebook = rulebook
        with _LOCK:
            _register(rulebook)
            self._ruleset = _host().get_ruleset(rulebook.name)
        self._plans = {
            rule.id: _RulePlan(rule.id, tuple(matched_aliases(rule)), tuple(compile_assert(a) for a in rule.asserts))
            for rule in rulebook.rules
        }
        # A stage's marker is asserted only where some rule joins it (rulebook.needs_stage_marker).
        self._marker_stages = tuple(sorted({rule.stage for rule in rulebook.rules if needs_stage_marker(rule)}))
        # Fact types some rule matches (in `when` or `unless`): only these can change what fires.
        read: set[str] = set()
        for rule in rulebook.rules:
            read.update(str(p["t"]) for p in rule.when.values())
            read.update(str(p["t"]) for p in rule.unless)
        self._read_types = frozenset(read)

    def evaluate(self, facts: Iterable[Mapping[str, Any]]) -> Derivation:
        """Run every stage to quiescence on one patient's base facts.

        Each base fact is a dict with `t`, its fields, and optionally `refs` (the FHIR
        references it came from); `refs` is kept out of the engine.
        """
        base: dict[str, dict] = {}
        to_assert: list[dict] = []
        fact_types = self.rulebook.fact_types
        read_types = self._read_types
        for fact in facts:
            key = fact_key(fact, _NOT_BASE_CONTENT)
            known = base.get(key)
            if known is not None:  # the same fact from two resources: one fact, both references
                known["refs"] = sorted(set(known["refs"]) | set(fact.get("refs") or ()))
                continue
            fact_type = fact["t"]
            if fact_type not in fact_types:
                continue  # a fact type this rulebook does not read
            fields = {k: v for k, v in fact.items() if k != "refs"}
            base[key] = {**fields, "refs": list(fact.get("refs") or ())}
            if fact_type in read_types:
                fields["id"] = key
                to_assert.append(fields)
        ruleset = self._ruleset
        with _LOCK:
            sid = f"e{next(_SID)}"
            ctx = _Context(self.rulebook, sid, base)
            try:
                if to_assert:
                    for fields in to_assert:
                        fields["sid"] = sid
                    self._assert(ruleset, _durable_c.assert_facts, to_assert, ctx)
                for stage in self._marker_stages:
                    marker = {"t": STAGE_FACT, "n": stage, "id": f"{STAGE_FACT}|{stage}", "sid": sid}
                    self._assert(ruleset, _durable_c.assert_fact, marker, ctx)
            except Exception as exc:
                raise EvaluationError(f"durable_rules failed: {type(exc).__name__}: {exc}") from exc
            finally:
                try:
                    _durable_c.delete_state(ruleset._handle, sid)
                except Exception:  # pragma: no cover - nothing more can be done; state is per-sid
                    pass
        if ctx.errors:
            raise EvaluationError("; ".join(ctx.errors))
        if ctx.action_failure:
            raise EvaluationError(f"an action failed: {ctx.action_failure}")
        return Derivation(base=base, derived=ctx.derived, fired=ctx.fired)

    # -- the C engine, driven the way durable.engine.Host drives it ---------------------------
    def _assert(self, ruleset, c_call, message, ctx: _Context) -> None:
        """`Host.assert_fact(s)` for one evaluation: assert, then run every action it queues.

        The facts the actions derive are collected and asserted together once the queue is
        empty, then the actions those queue run, and so on until nothing is left: one call
        into the engine per round instead of one per fact. Within a stage the order in which
        rules fire cannot change what they derive (rulebook.needs_stage_marker), and a marker
        is only asserted after this returns, so every round still finishes before the next stage.
        """
        handle = ruleset._handle
        while True:
            state_handle = ruleset._handle_result(c_call(handle, _dumps(message)), message)
            result = _durable_c.start_action_for_state(handle, state_handle)
            if result:
                state = _loads(result[0])
                container = _loads(result[1])
                while True:
                    for action_name, matched in container.items():
                        break
                    self._run_action(action_name, matched, state, ctx)
                    try:
                        following = _durable_c.complete_and_start_action(handle, state_handle)
                    except BaseException:
                        _durable_c.abandon_action(handle, state_handle)
                        raise
                    if not following:
                        break
                    container = _loads(following)
            if not ctx.pending:
                return
            message, ctx.pending = ctx.pending, []
            c_call = _durable_c.assert_facts

    def _run_action(self, action_name: str, matched: Mapping[str, Any], state: Mapping[str, Any], ctx: _Context) -> None:
        plan = self._plans.get(action_name)
        if plan is None:
            return  # the sink: joins a fact type that is never asserted, so it never runs
        try:
            if state.get("sid") != ctx.sid:  # cannot happen under the lock; never guess whose facts these are
                raise RuntimeError(f"no evaluation context for session {state.get('sid')}")
            self._action(plan, matched, ctx)
        except BaseException as error:  # what durable's Promise.run records in the state
            ctx.action_failure = "exception caught {0}, traceback {1}".format(
                str(error), traceback.format_tb(error.__traceback__)
            )

    def _action(self, plan: _RulePlan, message: Mapping[str, Any], ctx: _Context) -> None:
        rule_id = plan.rule_id
        try:
            # the matched facts are fresh objects parsed from the engine's message: no copies needed
            matched = {alias: message[durable_alias] for alias, durable_alias in plan.aliases}
            parents = tuple(data["id"] for data in matched.values())
            ctx.fired.append(rule_id)
            for template in plan.asserts:
                fact = render_compiled(template, matched)
                key = fact_key(fact)
                known = ctx.derived.get(key)
                if known is None:
                    ctx.derived[key] = DerivedFact(key, fact, [(rule_id, parents)])
                    if fact["t"] in self._read_types:
                        ctx.pending.append({**fact, "id": key, "sid": ctx.sid})
                else:
                    known.derivations.append((rule_id, parents))
        except Exception as exc:  # recorded, and raised by evaluate(): never swallowed
            ctx.errors.append(f"{rule_id}: {type(exc).__name__}: {exc}")
