"""Saved assessments read back: the JSON array `assess --format json` prints, or JSON lines (one
contract per line, what the Spark engine writes), from files, folders of them or stdin ("-").

    for item in read_saved(paths):     # a contract dict, or an InputError naming the file and line
        ...

A file whose first character is `[` is one JSON array (a syntax error in it is fatal: its end
cannot be found, and a part of a population would hide the patients after it: `SavedFileError`);
any other file is JSON lines, each line on its own: a bad line is an error naming the line, and
the lines after it are still read. A folder is read file by file, in name order: its `*.json`,
`*.jsonl` and `*.ndjson` files (Spark's part files among them; `_SUCCESS` and hidden files are not).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

from ..errors import AiblError, InputError
from .population import AI_STATUS_WORDS, CATEGORIES

SUFFIXES = (".json", ".jsonl", ".ndjson")
#: categories of a patient not on an aromatase inhibitor (the worklist and the report know them)
OTHER_CATEGORIES = ("not-applicable",)


class SavedFileError(AiblError):
    """A file that cannot be read at all (missing, unreadable, a JSON array that does not parse)."""

    code = "input-invalid"


def files_of(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if str(path) != "-" and path.is_dir():
            yield from sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in SUFFIXES and not p.name.startswith(("_", "."))
            )
        else:
            yield path


def contract_problem(item: Any) -> str | None:
    """What makes `item` unusable as an assessment contract, else None."""
    if not isinstance(item, dict):
        return f"not an assessment (a JSON object): {type(item).__name__}"
    patient = item.get("patient")
    if not isinstance(patient, str) or not patient:
        return "no patient"
    for name in ("ai_status", "category"):
        if not isinstance(item.get(name), str):
            return f"{patient}: {name} missing or not text"
    for name in ("recommendations", "flags"):
        value = item.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return f"{patient}: {name} is not a list of text"
    if "dxa_dates" in item:
        dates = item["dxa_dates"]
        if not isinstance(dates, list):
            return f"{patient}: dxa_dates is not a list"
        for value in dates:
            try:
                dt.date.fromisoformat(str(value))
            except ValueError:
                return f"{patient}: dxa_dates holds {value!r}, not a date (YYYY-MM-DD)"
    return None


def unrecognised(item: dict) -> str | None:
    """An AI status or category this version does not know: the patient is counted and shown as
    not recognised, and the run says so (a patient who may be on an aromatase inhibitor is never
    passed over in silence)."""
    if item["ai_status"] not in AI_STATUS_WORDS:
        return f"{item['patient']}: aromatase inhibitor status {item['ai_status']!r} not recognised"
    if item["category"] not in CATEGORIES + OTHER_CATEGORIES:
        return f"{item['patient']}: category {item['category']!r} not recognised"
    return None


def read_saved(paths: Iterable[Path]) -> Iterator[dict | InputError]:
    """Every contract of the files, or an error for each one that cannot be used (naming its line).
    A file that cannot be read at all raises `SavedFileError`."""
    for path in files_of(paths):
        name = "stdin" if str(path) == "-" else str(path)
        try:
            with contextlib.ExitStack() as stack:
                fh = sys.stdin if str(path) == "-" else stack.enter_context(path.open(encoding="utf-8"))
                yield from _contracts(fh, name)
        except (OSError, UnicodeDecodeError) as exc:
            raise SavedFileError(f"cannot read: {getattr(exc, 'strerror', None) or exc}", source=name) from None


def _contracts(fh: TextIO, name: str) -> Iterator[dict | InputError]:
    # JSON lines are read a line at a time (a Spark output may be large); an array is parsed whole
    head, skipped = "", 0
    for head in fh:
        if head.strip():
            break
        skipped += 1
    if head.lstrip().startswith("["):
        items: Iterable[tuple[int, Any]] = _array("\n" * skipped + head + fh.read(), name)
    else:
        items = _lines(itertools.chain([head], fh), first=skipped + 1)
    for line, item in items:
        where = f"{name}, line {line}"
        if isinstance(item, InputError):
            item.source = where
            yield item
            continue
        problem = contract_problem(item)
        if problem is not None:
            yield InputError(problem, source=where)
            continue
        yield item
        problem = unrecognised(item)
        if problem is not None:
            yield InputError(f"{problem}; counted as not recognised", source=where)


def _lines(lines: Iterable[str], first: int = 1) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(lines, first):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            yield number, InputError(f"not JSON: {exc.msg} (column {exc.colno})")


def _array(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """The items of one JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    pos = len(text) - len(text.lstrip()) + 1  # after "["

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    def fail(at: int, why: str) -> SavedFileError:
        return SavedFileError(f"line {text.count(chr(10), 0, at) + 1}: not a JSON array of assessments: {why}", source=name)

    line, counted = 1, 0  # the line at `counted`, counted forward only (once over the text)

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        pos = skip(pos + 1)
        if pos != len(text):
            raise fail(pos, "text after the array")
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise fail(exc.pos, exc.msg) from None
        line, counted = line + text.count("\n", counted, pos), pos
        yield line, item
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < len(text) and text[pos] == "]":
            pos = skip(pos + 1)
            if pos != len(text):
                raise fail(pos, "text after the array")
            return
        raise fail(pos, "expected ',' or ']'" if pos < len(text) else "the array does not end (a file cut short?)")
