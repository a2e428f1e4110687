"""The shipped ruleset as package data: pyproject.toml maps this folder to `fhir_aibl.rules`.

Nothing to import here: fhir_aibl/resources.py finds the files with importlib.resources.
"""
