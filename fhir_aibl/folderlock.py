"""One run at a time in a working folder: `export`, `run --bulk` (its output folder) and
`write-back` (its journal folder).

Two runs in one folder (a nightly job started again while the last one still runs) would share
the kept export job, the download files, the incremental store or the journal: one could resume
the other's half-downloaded export, and two write-backs deciding at once for the same patient
could both create its CarePlan. The second run is refused at once, before any request, with the
process that holds the folder and since when.

The lock is an advisory `flock` on `.fhir-aibl.lock` in the folder: the operating system
releases it when the holder exits, however it ends (a killed run leaves no stale lock to
remove). The file stays, naming the last holder. Where `flock` does not exist (not POSIX),
there is no lock.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import AiblError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

NAME = ".fhir-aibl.lock"


class FolderError(AiblError):
    """The working folder cannot be created or locked (a file of that name, no permission)."""

    code = "folder-unusable"


class FolderInUseError(FolderError):
    code = "folder-in-use"


@contextmanager
def folder_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder` for this process while the block runs; FolderInUseError if another holds it,
    FolderError if it cannot be created or its lock file opened."""
    path = folder / NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+", encoding="utf-8") if fcntl is not None else None
    except OSError as exc:
        raise FolderError(f"{folder} cannot be used as the working folder: {exc.strerror or exc}") from None
    if handle is None:  # pragma: no cover - not POSIX
        yield
        return
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise FolderInUseError(
                f"{folder} is in use by another run ({holder}); wait for it to end, or give another folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        since = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        handle.write(f"{what}, process {os.getpid()}, since {since}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()
