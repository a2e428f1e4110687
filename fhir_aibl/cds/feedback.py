"""Cards issued and the feedback on them, in SQLite; and the suppression of overridden cards.

Two tables:
- `cards`: every card the service answered with: its uuid, service, kind, the patient (as a
  salted hash, never the id itself), the assessment key, the category, and the uuids of its
  suggestions and override reasons, so feedback can be validated against what was offered.
  Rows older than `feedback.retention_days` are pruned.
- `feedback`: every feedback item received, as validated, with the time it arrived. Kept.

Suppression (CDS Hooks "overridden" outcome): a card the clinician overrode is not shown
again for the same patient for `feedback.suppression_days`, when
- the new card is of the same service and kind (the assessment card, or the treatment card;
  safety cards are never suppressed), and
- `suppression_scope: assessment` (default): the assessment is the same, meaning the same
  AI status, category, risk factors, recommendations and flags (`assessment_key`): new data
  that changes nothing the clinician is told does not bring the card back, any change does;
  `suppression_scope: patient`: any assessment, and
- the category has not worsened since the override (`CATEGORY_RANK` in cards.py): a worse
  category always shows.

The suppression check runs on every hook call, so it reads `overrides`: one row per
overridden card, with what the check compares (patient hash, service, kind, category rank,
assessment key), indexed by patient. Joining feedback to cards instead read every card ever
issued for the patient, a cost that grew with each call (1.5 ms per check after 6,000 cards
for one patient). `overrides` is filled with the feedback, from an existing database's
feedback when first opened, and pruned with the cards (its card's `issued_at`), so it says
what the join said.

Writes go through one connection under a lock (SQLite serialises writers anyway); WAL mode
lets readers proceed. Every write is committed before the HTTP answer, so a 200 means stored.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..assessment import Assessment
from .cards import CATEGORY_RANK

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cards (
    uuid TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    kind TEXT NOT NULL,
    patient TEXT NOT NULL,
    assessment_key TEXT NOT NULL,
    category TEXT NOT NULL,
    category_rank INTEGER NOT NULL,
    suggestions TEXT NOT NULL,
    override_reasons TEXT NOT NULL,
    issued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS cards_by_patient ON cards (patient, service, kind);
CREATE INDEX IF NOT EXISTS cards_by_time ON cards (issued_at);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    card TEXT NOT NULL,
    service TEXT NOT NULL,
    outcome TEXT NOT NULL,
    outcome_timestamp TEXT NOT NULL,
    accepted_suggestions TEXT NOT NULL,
    override_system TEXT,
    override_code TEXT,
    user_comment TEXT,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_by_card ON feedback (card);
CREATE TABLE IF NOT EXISTS overrides (
    card TEXT NOT NULL,
    patient TEXT NOT NULL,
    service TEXT NOT NULL,
    kind TEXT NOT NULL,
    assessment_key TEXT NOT NULL,
    category_rank INTEGER NOT NULL,
    issued_at REAL NOT NULL,
    received_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS overrides_by_patient ON overrides (patient, service, kind, received_at);
"""

#: An overridden card's row of `overrides`, from its row of `cards` and the feedback's time.
_OVERRIDE_FROM_CARD = (
    "INSERT INTO overrides (card, patient, service, kind, assessment_key, category_rank, issued_at, received_at) "
    "SELECT c.uuid, c.patient, c.service, c.kind, c.assessment_key, c.category_rank, c.issued_at, {received} "
    "FROM {source}"
)


def assessment_key(assessment: Assessment) -> str:
    """What the clinician is told, for "the same assessment": not evidence versions, not dates."""
    content = {
        "ai_status": assessment.ai_status,
        "category": assessment.category,
        "risk_factors": sorted(assessment.risk_factors),
        "recommendations": sorted(assessment.recommendations),
        "flags": sorted(assessment.flags),
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class CardRecord:
    uuid: str
    service: str
    kind: str
    suggestions: list[str]
    override_reasons: list[tuple[str, str]]


@dataclass
class FeedbackItem:
    card: str
    outcome: str
    outcome_timestamp: str
    accepted_suggestions: list[str]
    override_system: str | None = None
    override_code: str | None = None
    user_comment: str | None = None


class FeedbackStore:
    def __init__(
        self,
        path: str | Path,
        *,
        suppression_days: float = 30,
        scope: str = "assessment",
        retention_days: float = 90,
        clock: Callable[[], float] = time.time,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.suppression_seconds = suppression_days * 86400
        self.retention_seconds = max(retention_days, suppression_days) * 86400
        self.scope = scope
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; only power loss can lose the last commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        with self._lock:
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE name='salt'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta (name, value) VALUES ('salt', ?)", (secrets.token_hex(16),))
                row = self._db.execute("SELECT value FROM meta WHERE name='salt'").fetchone()
            self._salt = row[0]
            if self._db.execute("SELECT 1 FROM meta WHERE name='overrides'").fetchone() is None:
                # A database from before `overrides`: fill it from the feedback it holds, once
                # (IMMEDIATE, and checked again inside: another process may be doing the same).
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    if self._db.execute("SELECT 1 FROM meta WHERE name='overrides'").fetchone() is None:
                        self._db.execute(
                            _OVERRIDE_FROM_CARD.format(
                                received="f.received_at",
                                source="feedback f JOIN cards c ON c.uuid = f.card WHERE f.outcome = 'overridden'",
                            )
                        )
                        self._db.execute("INSERT INTO meta (name, value) VALUES ('overrides', '1')")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        self._writes = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def check_writable(self) -> None:
        """Write (and commit) one row, for readiness; raises sqlite3.Error when the database cannot be written."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('ready-probe', ?)", (str(self.clock()),))

    def _patient(self, patient_ref: str) -> str:
        # Salted per database: the file never holds a patient id, and a hash from one
        # installation cannot be looked up against another's.
        return hashlib.sha256(f"{self._salt}|{patient_ref}".encode()).hexdigest()

    # -- cards ---------------------------------------------------------------------------
    def record_cards(self, service: str, patient_ref: str, assessment: Assessment, cards: Iterable) -> None:
        """Remember the cards of one answer (IssuedCard objects from cards.py)."""
        now = self.clock()
        patient = self._patient(patient_ref)
        key = assessment_key(assessment)
        rank = CATEGORY_RANK[assessment.category]
        rows = [
            (
                issued.card["uuid"],
                service,
                issued.kind,
                patient,
                key,
                assessment.category,
                rank,
                json.dumps(issued.suggestion_ids),
                json.dumps([[r["system"], r["code"]] for r in issued.card.get("overrideReasons", [])]),
                now,
            )
            for issued in cards
        ]
        if not rows:
            return
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO cards VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
                self._writes += 1
                if self._writes % 500 == 1:
                    self._db.execute("DELETE FROM cards WHERE issued_at < ?", (now - self.retention_seconds,))
                    self._db.execute("DELETE FROM overrides WHERE issued_at < ?", (now - self.retention_seconds,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def card(self, card_uuid: str) -> CardRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT uuid, service, kind, suggestions, override_reasons FROM cards WHERE uuid = ?", (card_uuid,)
            ).fetchone()
        if row is None:
            return None
        return CardRecord(row[0], row[1], row[2], json.loads(row[3]), [tuple(r) for r in json.loads(row[4])])

    def is_suppressed(self, service: str, kind: str, patient_ref: str, assessment: Assessment) -> bool:
        if self.suppression_seconds <= 0:
            return False
        since = self.clock() - self.suppression_seconds
        sql = (
            "SELECT 1 FROM overrides WHERE patient = ? AND service = ? AND kind = ? AND received_at >= ? "
            "AND category_rank >= ?"
        )
        params: list = [self._patient(patient_ref), service, kind, since, CATEGORY_RANK[assessment.category]]
        if self.scope == "assessment":
            sql += " AND assessment_key = ?"
            params.append(assessment_key(assessment))
        with self._lock:
            return self._db.execute(sql + " LIMIT 1", params).fetchone() is not None

    # -- feedback -------------------------------------------------------------------------
    def add_feedback(self, service: str, items: list[FeedbackItem]) -> None:
        """Store every item in one transaction: all of them, or none."""
        now = self.clock()
        rows = [
            (
                item.card,
                service,
                item.outcome,
                item.outcome_timestamp,
                json.dumps(item.accepted_suggestions),
                item.override_system,
                item.override_code,
                item.user_comment,
                now,
            )
            for item in items
        ]
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany(
                    "INSERT INTO feedback (card, service, outcome, outcome_timestamp, accepted_suggestions, "
                    "override_system, override_code, user_comment, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                    rows,
                )
                self._db.executemany(
                    _OVERRIDE_FROM_CARD.format(received="?", source="cards c WHERE c.uuid = ?"),
                    [(now, item.card) for item in items if item.outcome == "overridden"],
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def feedback_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
