"""Views of a population's assessments for the people who act on them: the worklist (docs/worklist.md) and the population report (docs/report.md)."""
