"""Write-back at population scale: `fhir-aibl write-back FROM...` (docs/write-back.md).

inputs.py reads any population output (assessments, CarePlans and RiskAssessments) and detects
its shape; batches.py writes them back several patients a transaction, with the connector's
decision (fhir/writeback.py); journal.py records each patient's outcome so that a rerun resumes;
command.py is the command.
"""
