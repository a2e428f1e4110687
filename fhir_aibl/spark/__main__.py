"""`python -m fhir_aibl.spark PATH... --out DIR` or `spark-submit <this file> PATH... --out DIR` (docs/spark.md)."""

import sys

from fhir_aibl.spark.command import main

if __name__ == "__main__":
    sys.exit(main())
