"""The JWT replay cache in the service's SQLite database, shared by every worker process.

With `fhir-aibl serve --workers N` a token may reach any worker; a replay cache in process
memory would let the same token through once per worker. Here the check and the insert are
one statement on the database every worker opens (`feedback.database`, in the state
directory):

    INSERT ... ON CONFLICT (iss, jti) DO UPDATE SET exp = excluded.exp WHERE jti.exp < now

changes a row unless the (iss, jti) pair is already there and not yet expired: no row
changed means a replay. SQLite serialises the writers, so two workers racing with the same
token cannot both win. Expired rows are deleted now and then; a token's exp is at most
`jwt.max_lifetime_seconds` ahead, which bounds the table by the request rate.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jti (
    iss TEXT NOT NULL,
    jti TEXT NOT NULL,
    exp REAL NOT NULL,
    PRIMARY KEY (iss, jti)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS jti_by_exp ON jti (exp);
"""
_PRUNE_EVERY = 1000


class SqliteReplayCache:
    """`check_and_add(iss, jti, exp)` as auth.ReplayCache, across processes."""

    def __init__(self, path: str | Path, clock: Callable[[], float] = time.time):
        self.clock = clock
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=5.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        self._writes = 0

    def check_and_add(self, iss: str, jti: str, exp: float) -> bool:
        """False if (iss, jti) was seen by any worker and has not expired; otherwise remember it."""
        now = self.clock()
        with self._lock:
            changed = self._db.execute(
                "INSERT INTO jti (iss, jti, exp) VALUES (?, ?, ?) "
                "ON CONFLICT (iss, jti) DO UPDATE SET exp = excluded.exp WHERE jti.exp < ?",
                (iss, jti, exp, now),
            ).rowcount
            self._writes += 1
            if self._writes % _PRUNE_EVERY == 0:
                self._db.execute("DELETE FROM jti WHERE exp < ?", (now,))
        return changed == 1

    def close(self) -> None:
        with self._lock:
            self._db.close()
