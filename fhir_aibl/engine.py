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
- An exception in an action is swallowed into the session state: actions record
  their own errors, and the state is checked after every evaluation.
- JSON rulesets: the engine deletes `run` from the dict it is given, so it gets a
  deep copy; a registered ruleset cannot be replaced, so its name carries version
  and content hash. Actions take one parameter (two would make them asynchronous).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from durable.engine import Host, MessageNotHandledException

from .errors import EvaluationError
from .rulebook import STAGE_FACT, Rulebook, matched_aliases, render_assert

_LOCK = threading.RLock()
_HOST: "_Host | None" = None
_REGISTERED: dict[str, Rulebook] = {}
_CONTEXTS: dict[str, "_Context"] = {}
_SID = itertools.count(1)


def fact_key(fact: Mapping[str, Any]) -> str:
    """The identity of a fact: its type and content. Two derivations of the same fact are one fact."""
    parts = [str(fact["t"])]
    for key in sorted(k for k in fact if k not in ("t", "id", "sid")):
        parts.append(f"{key}={fact[key]!r}")
    return "|".join(parts)


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

    def of_type(self, fact_type: str) -> list[DerivedFact]:
        return [d for d in self.derived.values() if d.fact["t"] == fact_type]

    def evidence_for(self, key: str) -> list[str]:
        """Every FHIR reference behind a fact, following derivations back to base facts."""
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


class _Host(Host):
    def _run(self) -> None:  # no dispatcher threads: see the module docstring
        return None

    def get_action(self, action_name: str):
        if action_name == "$sink":
            return _sink
        return _make_action(action_name)


def _sink(c) -> None:  # never runs: the sink rules join a fact type that is never asserted
    return None


def _make_action(rule_id: str):
    def action(c) -> None:
        ctx = _CONTEXTS.get(c.s.sid)
        if ctx is None:  # cannot happen under the lock; never guess whose facts these are
            raise RuntimeError(f"no evaluation context for session {c.s.sid}")
        try:
            rule = ctx.rulebook.rule(rule_id)
            matched = {}
            parents = []
            for alias, durable_alias in matched_aliases(rule):
                content = getattr(c, durable_alias)
                data = dict(content._d)
                matched[alias] = data
                parents.append(data["id"])
            ctx.fired.append(rule_id)
            for template in rule.asserts:
                fact = render_assert(template, matched)
                key = fact_key(fact)
                known = ctx.derived.get(key)
                if known is None:
                    ctx.derived[key] = DerivedFact(key, fact, [(rule_id, tuple(parents))])
                    c.assert_fact({**fact, "id": key, "sid": ctx.sid})
                else:
                    known.derivations.append((rule_id, tuple(parents)))
        except MessageNotHandledException as exc:  # pragma: no cover - the sinks prevent it
            ctx.errors.append(f"{rule_id}: {exc.message}")
        except Exception as exc:  # recorded, and raised by evaluate(): never swallowed
            ctx.errors.append(f"{rule_id}: {type(exc).__name__}: {exc}")

    return action


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


class Engine:
    """Evaluates facts with one rulebook. Safe to share between threads; evaluations are serialised."""

    def __init__(self, rulebook: Rulebook):
        self.rulebook = rulebook
        with _LOCK:
            _register(rulebook)

    def evaluate(self, facts: Iterable[Mapping[str, Any]]) -> Derivation:
        """Run every stage to quiescence on one patient's base facts.

        Each base fact is a dict with `t`, its fields, and optionally `refs` (the FHIR
        references it came from); `refs` is kept out of the engine.
        """
        base: dict[str, dict] = {}
        to_assert: list[dict] = []
        for fact in facts:
            fields = {k: v for k, v in fact.items() if k != "refs"}
            key = fact_key(fields)
            if key in base:  # the same fact from two resources: one fact, both references
                base[key]["refs"] = sorted(set(base[key].get("refs") or ()) | set(fact.get("refs") or ()))
                continue
            if fields["t"] not in self.rulebook.fact_types:
                continue  # a fact type this rulebook does not read
            base[key] = {**fields, "refs": list(fact.get("refs") or ())}
            to_assert.append(fields | {"id": key})
        name = self.rulebook.name
        with _LOCK:
            sid = f"e{next(_SID)}"
            ctx = _Context(self.rulebook, sid, base)
            _CONTEXTS[sid] = ctx
            host = _host()
            try:
                if to_assert:
                    host.assert_facts(name, [dict(f, sid=sid) for f in to_assert])
                for stage in self.rulebook.stages:
                    host.assert_fact(name, {"t": STAGE_FACT, "n": stage, "id": f"{STAGE_FACT}|{stage}", "sid": sid})
                state = host.get_state(name, sid)
            except Exception as exc:
                raise EvaluationError(f"durable_rules failed: {type(exc).__name__}: {exc}") from exc
            finally:
                _CONTEXTS.pop(sid, None)
                try:
                    host.delete_state(name, sid)
                except Exception:  # pragma: no cover - nothing more can be done; state is per-sid
                    pass
        if ctx.errors:
            raise EvaluationError("; ".join(ctx.errors))
        if isinstance(state, dict) and state.get("exception"):
            raise EvaluationError(f"an action failed: {state['exception']}")
        return Derivation(base=base, derived=ctx.derived, fired=ctx.fired)
