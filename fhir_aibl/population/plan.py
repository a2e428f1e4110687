"""Cut a reading into pieces of work: the files `iter_records` would read, in its order, in ranges.

A large NDJSON file (a Bulk export puts every Observation in one) is cut into byte ranges
that begin at the start of a line, so that several processes can index it at once; any
other path (a Bundle, a JSON file, a small NDJSON file, a path that does not exist) is one
piece, read whole exactly as `iter_records` reads it. Pieces are numbered in read order,
and a piece's number orders everything it reads before the next piece's: concatenated in
that order, the pieces read what one process reads, in the same order.

A range does not know the number of its first line until the lines before it are counted;
`count_lines` does that (in the workers, one range each) and `number_lines` adds them up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from ..sources import expand_paths

#: A range is at least this long: smaller files are one piece.
MIN_RANGE = 4 << 20
#: ... and at most this long, so that a few slow pieces do not hold up the rest.
MAX_RANGE = 64 << 20
#: Pieces per worker to aim for: enough for a worker that finishes early to take another.
PIECES_PER_WORKER = 8


@dataclass(frozen=True)
class Piece:
    index: int  #: read order; also the high bits of the read-order numbers of what it reads
    path: Path
    start: int | None = None  #: byte range [start, end) of an NDJSON file; None: the whole path
    end: int | None = None
    first_line: int = 1  #: the number of the line at `start`

    @property
    def ranged(self) -> bool:
        return self.start is not None


def plan(paths: Iterable[str | os.PathLike[str]], workers: int) -> tuple[list[Path], list[Piece]]:
    """The files read (in `iter_records` order) and the pieces to read them in; line numbers still to count."""
    files = list(expand_paths(paths))
    sizes = {}
    for path in files:
        try:
            if path.suffix == ".ndjson" and path.is_file():
                sizes[path] = path.stat().st_size
        except OSError:
            pass  # read whole: the reader reports why it cannot read it
    total = sum(sizes.values())
    step = min(MAX_RANGE, max(MIN_RANGE, total // max(1, workers * PIECES_PER_WORKER)))
    pieces: list[Piece] = []
    for path in files:
        size = sizes.get(path, 0)
        if size <= step:
            pieces.append(Piece(len(pieces), path))
            continue
        for start, end in _line_ranges(path, size, step):
            pieces.append(Piece(len(pieces), path, start, end))
    return files, pieces


def _line_ranges(path: Path, size: int, step: int) -> list[tuple[int, int]]:
    """[start, end) ranges of about `step` bytes, each beginning at the start of a line."""
    bounds = [0]
    with path.open("rb") as fh:
        at = step
        while at < size:
            fh.seek(at - 1)
            fh.readline()  # to the end of the line that holds byte at-1: the next line starts after it
            at = fh.tell()
            if at >= size:
                break
            bounds.append(at)
            at += step
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def count_lines(piece: Piece) -> int:
    """Newlines in a ranged piece (run in a worker: a few hundred MB a second)."""
    assert piece.start is not None and piece.end is not None
    count = 0
    with piece.path.open("rb") as fh:
        fh.seek(piece.start)
        left = piece.end - piece.start
        while left > 0:
            block = fh.read(min(left, 8 << 20))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def number_lines(pieces: list[Piece], counts: dict[int, int]) -> list[Piece]:
    """The pieces with `first_line` set from the newline counts of the ranges before them."""
    out = []
    line: dict[Path, int] = {}
    for piece in pieces:
        if piece.ranged:
            first = 1 if piece.start == 0 else line[piece.path]  # a path given twice starts again
            out.append(replace(piece, first_line=first))
            line[piece.path] = first + counts[piece.index]
        else:
            out.append(piece)
    return out
