"""`run --bulk --write-back`: write each assessment of an export back, as `run --write-back` does.

The decision is the connector's (fhir_aibl/fhir/writeback.py: `plan_write`, `apply_plan`,
idempotent by the CarePlan's business identifier); only where the patient's existing
fhir-aibl CarePlans come from differs: the export asks for CarePlan too, and they are read
from its files instead of one search per patient. So a second run writes nothing new
(every patient `unchanged`), and a run that stopped part-way is resumed by running it again.

Only patients on an aromatase inhibitor (`active`, `planned`) are written back, the patients
`run --all` selects: an export holds everyone, and a CarePlan for a patient who is on none
would be noise in the record. One attempt per patient: a failed write is reported for that patient (`failed: ...`) and
the others go on; running again retries it, deciding on what the server then holds.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..assessment import Assessment
from ..careplan import IDENTIFIER_SYSTEM, Catalogue
from ..errors import AiblError
from ..fhir.client import FhirClient
from ..fhir.errors import AuthError
from ..fhir.pull import patient_of
from ..fhir.writeback import WriteModes, apply_plan, plan_write


def careplans_by_patient(files: Iterable[Path], base_url: str) -> dict[str, list[dict]]:
    """fhir-aibl's CarePlans in an export's CarePlan files, by patient id, sorted by id (as a pull gives them)."""
    found: dict[str, dict[str, dict]] = {}
    for path in files:
        if not path.name.startswith("CarePlan."):
            continue
        with path.open("rb") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    plan = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(plan, dict) or plan.get("resourceType") != "CarePlan" or not plan.get("id"):
                    continue
                if not any((i or {}).get("system") == IDENTIFIER_SYSTEM for i in plan.get("identifier") or []):
                    continue
                pid = patient_of(plan, base_url)
                if pid is not None:
                    found.setdefault(pid, {})[plan["id"]] = plan
    return {pid: [plans[k] for k in sorted(plans)] for pid, plans in found.items()}


#: Whose assessments are written back: the patients `run --all` selects (aromatase inhibitor active or planned).
WRITTEN_FOR = ("active", "planned")


@dataclass
class WriteReport:
    written: int = 0
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  #: (patient reference, reason)
    requests: int = 0


class BulkWriter:
    def __init__(self, client: FhirClient, catalogue: Catalogue, existing: dict[str, list[dict]],
                 now: dt.datetime | None = None):
        self.client = client
        self.catalogue = catalogue
        self.existing = existing
        self.now = now or dt.datetime.now(dt.timezone.utc)
        self.modes = WriteModes.discover(client.profile, client.capabilities())
        self.report = WriteReport()
        self.stopped = ""  #: why no more writes are attempted (the server refused the credentials)

    def write(self, assessment: Assessment) -> None:
        """Write one assessment back; a failure is recorded for the patient, never raised."""
        if assessment.ai_status not in WRITTEN_FOR:
            return  # as `run --all`, whose population is the patients with an active or intended aromatase inhibitor
        if self.stopped:
            self.report.failed.append((assessment.patient, f"not attempted: {self.stopped}"))
            return
        before = self.client.stats.requests
        pid = assessment.patient.split("/", 1)[1]
        try:
            plan = plan_write(
                assessment,
                self.existing.get(pid, []),
                self.catalogue,
                modes=self.modes,
                base_url=self.client.base_url,
                now=self.now,
            )
            apply_plan(self.client, plan, self.modes)
        except AuthError as exc:
            # every later write would be refused the same way: they are not attempted
            self.report.failed.append((assessment.patient, f"credentials refused: {exc}"))
            self.stopped = "the server refused the credentials"
        except AiblError as exc:
            self.report.failed.append((assessment.patient, f"write-back: {exc}"))
        except Exception as exc:  # a server answer nobody foresaw: this patient fails, not the run
            self.report.failed.append((assessment.patient, f"write-back: {type(exc).__name__}: {exc}"))
        else:
            if plan.action == "unchanged":
                self.report.unchanged += 1
            else:
                self.report.written += 1
        finally:
            self.report.requests += self.client.stats.requests - before
