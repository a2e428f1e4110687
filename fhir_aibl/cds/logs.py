"""Structured logs: `fhir-aibl serve --log-format json` writes one JSON object per line.

    {"time": "2026-06-01T10:00:00.123+00:00", "level": "INFO", "logger": "fhir_aibl.cds",
     "message": "aibl-patient-view: 1 card(s) in 4.2 ms", "pid": 1234}

The service's messages never carry patient data (ids, categories, values): they name
services, statuses, checks and prefetch keys. An exception is logged by its type only, never
its text or traceback, which may quote the data it failed on. The patient-data debug switch
(`log_patient_data`) is refused together with JSON logs (command.py).
"""

from __future__ import annotations

import datetime as dt
import json
import logging


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)
