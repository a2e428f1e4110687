"""Apache Spark engine: `fhir-aibl assess PATHS --engine spark --out DIR` (docs/spark.md).

Needs the `spark` extra (`pip install 'fhir-aibl[spark]'`: PySpark, and Java 17). Only this
subpackage imports pyspark, and only when a run starts, so the rest of fhir-aibl works
without it. The Python workers call the project's public per-patient function
(`fhir_aibl.outcome.assess_patient`); `job.py` is the driver, `worker.py` what the workers run,
`command.py` the command line (also `spark-submit .../fhir_aibl/spark/__main__.py`).
"""

from .command import main, run_command

__all__ = ["main", "run_command"]
