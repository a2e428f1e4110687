"""Reading a Bulk export whose medications name their drug by reference: speed and memory.

    python bench/medication_refs.py SYNTH_DIR [--work DIR]

SYNTH_DIR is a population written by `fhir-aibl synth`. The script writes a second copy in
which every MedicationStatement/MedicationRequest names its drug with `medicationReference`
to a Medication of its own (one Medication per order, the worst case: no two orders share
one), in a separate `Medication.000.ndjson` with no patient reference, and reads both copies
with the file source (`iter_records`, validating what the rules read) in a fresh process
each, reporting the reader's CPU time, the wall time and peak RSS. A third run reads the referenced copy with a small
spool limit (index spilled to disk) to show the two-pass reader still streams by patient.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

MED_TYPES = ("MedicationStatement", "MedicationRequest")

_READ = """
import resource, sys, time
from fhir_aibl.sources import iter_records, PatientRecord
limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
t = time.process_time()  # CPU: the machine is shared, wall time is noise
records = contained = 0
for item in iter_records([sys.argv[1]], spool_limit=limit):
    if isinstance(item, PatientRecord):
        records += 1
        contained += sum(1 for r in item.resources if r.get("contained"))
print(records, contained, round(time.process_time() - t, 2), round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
"""


def referenced_copy(src: Path, dst: Path) -> int:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    moved = 0
    with (dst / "Medication.000.ndjson").open("w") as meds:
        for path in sorted(src.glob("*.ndjson")):
            rtype = path.name.split(".")[0]
            if rtype not in MED_TYPES:
                shutil.copyfile(path, dst / path.name)
                continue
            with path.open() as fh, (dst / path.name).open("w") as out:
                for line in fh:
                    res = json.loads(line)
                    code = res.pop("medicationCodeableConcept", None)
                    if code is not None:
                        mid = f"med-{res['id']}"
                        meds.write(json.dumps({"resourceType": "Medication", "id": mid, "code": code}) + "\n")
                        res["medicationReference"] = {"reference": f"Medication/{mid}"}
                        moved += 1
                    out.write(json.dumps(res) + "\n")
    return moved


def read(folder: Path, limit: int | None = None) -> tuple[str, float]:
    args = [sys.executable, "-c", _READ, str(folder)] + ([str(limit)] if limit else [])
    start = time.perf_counter()
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("synth", type=Path)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or args.synth.with_name(args.synth.name + "-referenced")
    moved = referenced_copy(args.synth, work)
    print(f"{moved} medications moved into Medication.000.ndjson ({work})")
    for label, folder, limit in (
        ("coded (as written)", args.synth, None),
        ("by reference", work, None),
        ("by reference, spool limit 20000", work, 20000),
    ):
        out, wall = read(folder, limit)
        records, contained, inner, peak = out.split()
        print(f"{label:34} records {records:>6}  contained {contained:>6}  reader CPU {inner:>6} s  process wall {wall:6.1f} s  peak RSS {peak:>7} MB")


if __name__ == "__main__":
    main()
