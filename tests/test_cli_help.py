"""Every command's --help describes every argument, states its default and lists the exit codes."""

from __future__ import annotations

import argparse

import pytest

from fhir_aibl.cli import _parser


def _commands(parser: argparse.ArgumentParser, name: str = "fhir-aibl"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


COMMANDS = dict(_commands(_parser()))


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_argument_is_described(name):
    for action in COMMANDS[name]._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no description"
        has_default = action.default not in (None, False, argparse.SUPPRESS) and action.dest not in ("help", "version")
        if has_default:
            assert "default" in action.help, f"{name}: {action.option_strings}: default {action.default!r} not stated"


@pytest.mark.parametrize("name", sorted(n for n in COMMANDS if n != "fhir-aibl"))
def test_every_command_lists_its_exit_codes(name):
    epilog = COMMANDS[name].epilog or ""
    assert "exit status" in epilog
    if name not in ("fhir-aibl rules",):
        assert "  0  " in epilog and "  2  " in epilog


def test_help_is_printed(capsys):
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["assess", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "exit status:" in out and "DIR-or-FILE" in out and "(default: today)" in out
