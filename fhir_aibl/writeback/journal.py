"""The write-back journal: what each patient's write gave, so that a rerun resumes.

`journal.ndjson` in the state folder, one JSON object a line, appended and flushed to disk
after each batch the server answered:

    {"server": BASE, "patient": "Patient/x", "identifier": ID, "outcome": "written"|"unchanged"|"failed",
     "action": "create"|..., "careplan": ID, "content": SHA256, "reason": TEXT, "at": INSTANT}

`content` is the SHA-256 of the resources sent for the patient (none when unchanged). A
patient is confirmed when its last line for this server says written or unchanged with the
identifier the input now gives: a rerun skips it without asking the server. Anything else
(failed, never reached, a different identifier: the input changed) is written again, and
the decision, idempotent by the business identifier, makes a write the server already holds
a no-op. A line cut short by a crash is ignored (that patient is simply not confirmed).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = "journal.ndjson"
CONFIRMED = ("written", "unchanged")


def content_hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Journal:
    folder: Path
    server: str

    def __post_init__(self) -> None:
        self.path = self.folder / NAME
        self._last: dict[str, dict] = {}
        self._fh = None

    def load(self) -> int:
        """Read what earlier runs recorded for this server; the number of lines that are not."""
        unreadable = 0
        if not self.path.is_file():
            return 0
        with self.path.open("rb") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    unreadable += 1
                    continue
                if isinstance(record, dict) and record.get("server") == self.server and record.get("patient"):
                    self._last[str(record["patient"])] = record
        return unreadable

    def confirmed(self, patient: str, identifier: str) -> dict | None:
        """The record that shows this patient's write of this identifier done, if there is one."""
        record = self._last.get(patient)
        if record and record.get("outcome") in CONFIRMED and record.get("identifier") == identifier:
            return record
        return None

    def record(self, patient: str, identifier: str, outcome: str, *, action: str = "", careplan: str | None = None,
               content: str = "", reason: str = "") -> None:
        entry = {
            "server": self.server,
            "patient": patient,
            "identifier": identifier,
            "outcome": outcome,
            "action": action,
            "careplan": careplan,
            "content": content,
            "reason": reason,
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if self._fh is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("a", encoding="utf-8")
        self._fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._last[patient] = entry

    def sync(self) -> None:
        """On disk before the next batch is sent: a crash loses at most the batch in flight."""
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()
            self._fh = None
