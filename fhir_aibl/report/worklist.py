"""The bone-health worklist: every patient on an aromatase inhibitor with a care gap, most urgent first, as CSV or Parquet.

    worklist = Worklist()
    for contract in outputs: worklist.add(contract)      # or `worklist.tee(outputs)` while they are written
    worklist.write(path)                                  # Parquet when path ends in .parquet, else CSV

The Parquet file has the CSV's rows in the CSV's order, with `priority` an int32 and every
other column a string (`care_gaps` and `safety_concerns` joined with "; " as in the CSV): the
Spark engine writes the same schema, so the two are interchangeable. Parquet needs pyarrow
(the `parquet` extra); `parquet_problem` says so before any work is done.

Built from the output contract alone (`ai_status`, `category`, `recommendations`, `flags`),
so it reads the same from `assess`, `run --bulk` and any number of workers. Patients whose
aromatase inhibitor is `active` or `planned` are listed, and also, whatever its state, those with
a medication that could not be read (they may be on one) and those whose denosumab is overdue or
needs its follow-on; every one of them with at least one gap is listed: a gap is never dropped
for lack of another.

What a nurse navigator reads is plain language (`GAPS`); no rule id, code or reference
except the patient's id, which is how the row is found in the record. The order of urgency
(`priority`) is a proposal for clinical review, explained in docs/worklist.md.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (priority, text) of each gap; 1 is the most urgent.
GAPS = {
    "dmab-overdue": (1, "Denosumab injection overdue: risk of rapid bone loss and vertebral fractures"),
    "dmab-stopped": (1, "Denosumab stopped without a follow-on therapy"),
    "high-untreated": (2, "High risk of fracture and not on a bone-protecting therapy"),
    "held": (3, "Bone-protecting therapy held for a safety reason"),
    "moderate-untreated": (4, "Moderate risk of fracture and not on a bone-protecting therapy"),
    "indeterminate": (5, "Fracture risk not decided: the information needed is missing"),
    "dxa-now": (6, "Bone density scan (DXA) needed now: no recent usable result"),
    "dxa-overdue": (6, "Follow-up bone density scan (DXA) overdue: last scan more than 24 months ago"),
    "dxa-report": (6, "Bone density scan (DXA) done or ordered, result not in the record: obtain the report"),
    "medication-unresolved": (2, "A medication could not be read: check whether it is an aromatase inhibitor"),
    "medication-by-text": (7, "Aromatase inhibitor recognised by name only: confirm it in the medication list"),
    "record-incomplete": (7, "Birth date missing from the record: risk graded as if over 65"),
    "record-unreadable": (5, "Entries of the record could not be read: check the chart, risk may be higher than graded"),
}

#: Safety concerns behind a held therapy, in plain language.
SAFETY = {
    "hypocalcaemia": "low calcium: every bone-protecting therapy held until corrected",
    "vitamin-d-repletion": "vitamin D to be replaced before a bone-protecting therapy starts",
    "crcl-below-35": "kidney function too low for zoledronic acid or oral bisphosphonates",
    "crcl-below-30": "kidney function too low for some bone-protecting therapies",
    "za-dose-reduction": "zoledronic acid dose to be reduced for kidney function",
    "denosumab-ckd-mbd": "advanced kidney disease: bone and mineral review before denosumab",
}

COLUMNS = ("priority", "patient", "category", "aromatase_inhibitor", "care_gaps", "safety_concerns")
PARQUET_MISSING = "a .parquet worklist needs pyarrow: install fhir-aibl[parquet]"


def is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def parquet_problem(path: Path | None) -> str | None:
    """Why the worklist at `path` cannot be written (pyarrow missing for a .parquet path), else None:
    asked before any work, so that a long run does not end without its worklist."""
    if path is None or not is_parquet(path):
        return None
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return PARQUET_MISSING
    return None


def parquet_schema():
    """The worklist's Parquet schema (the Spark engine writes the same)."""
    import pyarrow as pa

    return pa.schema([("priority", pa.int32())] + [(name, pa.string()) for name in COLUMNS[1:]])
ON_AI = ("active", "planned")


@dataclass(frozen=True)
class Row:
    priority: int
    patient: str
    category: str
    ai_status: str
    gaps: tuple[str, ...]
    safety: tuple[str, ...]

    def csv(self) -> list[str]:
        return [str(self.priority), self.patient, self.category, self.ai_status, "; ".join(self.gaps),
                "; ".join(self.safety)]


def gaps_of(contract: dict) -> list[str]:
    """The gap keys (`GAPS`) of one patient's output contract. Patients on an aromatase inhibitor;
    and, whatever the aromatase inhibitor's state, a medication that could not be read (she may be
    on one) and denosumab overdue or needing its follow-on (the risk outlasts the aromatase inhibitor)."""
    recs, flags, category = set(contract.get("recommendations", ())), set(contract.get("flags", ())), contract.get("category")
    found = []
    if "medication-unresolved" in flags:
        found.append("medication-unresolved")
    if "alert-dmab-overdue" in flags:
        found.append("dmab-overdue")
    elif "dmab-transition" in recs:
        found.append("dmab-stopped")
    if contract.get("ai_status") not in ON_AI:
        return found
    on_therapy = "adherence" in recs  # the rules recommend adherence, not initiation, to a patient already on one
    if category == "high" and not on_therapy:
        found.append("high-untreated")
    if flags & set(SAFETY):
        found.append("held")
    if category == "moderate" and not on_therapy:
        found.append("moderate-untreated")
    if category == "indeterminate":
        found.append("indeterminate")
    if "dxa-stale" in flags:
        found.append("dxa-overdue")
    elif "dxa-now" in recs:
        found.append("dxa-now")
    elif "dxa-obtain-result" in recs:
        found.append("dxa-report")
    if "medication-by-text" in flags:
        found.append("medication-by-text")
    if "age-unknown" in flags:
        found.append("record-incomplete")
    if "record-unreadable" in flags:
        found.append("record-unreadable")
    return found


def row_of(contract: dict) -> Row | None:
    keys = gaps_of(contract)
    if not keys:
        return None
    patient = str(contract.get("patient", ""))
    return Row(
        priority=min(GAPS[k][0] for k in keys),
        patient=patient.split("/", 1)[1] if patient.startswith("Patient/") else patient,
        category=str(contract.get("category", "")),
        ai_status=str(contract.get("ai_status", "")),
        gaps=tuple(GAPS[k][1] for k in sorted(keys, key=lambda k: (GAPS[k][0], k))),
        safety=tuple(SAFETY[f] for f in sorted(set(contract.get("flags", ())) & set(SAFETY))),
    )


class Worklist:
    def __init__(self) -> None:
        self.rows: list[Row] = []  # only patients with a gap: a fraction of the population, a few fields each

    def add(self, output: Any) -> None:
        """One patient's output: its contract dict (`--format json`, with or without --explain) or its Assessment."""
        contract = output if isinstance(output, dict) else output.contract()
        row = row_of(contract)
        if row is not None:
            self.rows.append(row)

    def tee(self, outputs: Iterable[Any]) -> Iterator[Any]:
        for output in outputs:
            self.add(output)
            yield output

    def ordered(self) -> list[Row]:
        return sorted(self.rows, key=lambda r: (r.priority, r.patient))

    def write(self, path: Path) -> int:
        """Parquet when `path` ends in .parquet, else CSV; the number of rows written."""
        return self.write_parquet(path) if is_parquet(path) else self.write_csv(path)

    def write_parquet(self, path: Path) -> int:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.ordered()
        columns = list(zip(*(row.csv() for row in rows))) if rows else [()] * len(COLUMNS)
        arrays = [pa.array([int(v) for v in columns[0]], type=pa.int32())]
        arrays += [pa.array(list(values), type=pa.string()) for values in columns[1:]]
        pq.write_table(pa.Table.from_arrays(arrays, schema=parquet_schema()), path)
        return len(rows)

    def write_csv(self, path: Path) -> int:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.ordered()
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            for row in rows:
                writer.writerow(row.csv())
        return len(rows)
