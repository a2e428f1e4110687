"""fhir-aibl: clinical decision support for aromatase-inhibitor-associated bone loss on FHIR R4."""

__version__ = "0.1.0"
