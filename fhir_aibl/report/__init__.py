"""Views of a population's assessments for the people who act on them (docs/worklist.md)."""
