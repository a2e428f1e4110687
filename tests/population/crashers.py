"""Assessors that fail on purpose, for the worker processes of tests/population (imported there by name)."""

from __future__ import annotations

import os

from fhir_aibl.assess import Assessor

#: Assessing this patient kills the process, as a crash in native code would.
CRASH = "Patient/crash-me"
#: Assessing this patient raises an exception that is not a project error (a bug).
RAISE = "Patient/raise-me"


class FaultyAssessor(Assessor):
    def assess(self, patient_ref, resources, as_of, unreadable=()):
        if patient_ref == CRASH:
            os._exit(3)
        if patient_ref == RAISE:
            raise RuntimeError("boom")
        return super().assess(patient_ref, resources, as_of, unreadable)
