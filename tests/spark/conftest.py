"""Spark tests: one local[2] SparkSession per test module; skipped, with the reason, only when Java is absent
(and failed instead under CI, where .ci/run installs it)."""

from __future__ import annotations

import logging
import os
import shutil
import sys

import pytest


def java_missing() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") is None and not (java_home and os.path.exists(os.path.join(java_home, "bin", "java"))):
        return "Java (17) is not installed: the Spark engine needs a JVM"
    return None


@pytest.fixture(scope="module")
def spark():
    reason = java_missing()
    if reason:
        if os.environ.get("CI"):  # CI must show Spark equal to the local engine (.ci/run installs Java)
            pytest.fail(reason)
        pytest.skip(reason)
    from fhir_aibl.spark.command import session

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # py4j logs its connections' closing at INFO when they are collected, after pytest has closed
    # its log streams ("--- Logging error ---" at the end of the run)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    session_, _owned = session("local[2]")
    yield session_
    session_.stop()
