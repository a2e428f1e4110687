"""The population runner: a whole population on every core of one machine (worker processes).

`pool.assess_population` is what `fhir-aibl assess --workers N` runs; `plan` cuts the input
into pieces, `shards` is what each worker process runs. The pure pipeline (facts, engine,
assessment) knows nothing of it. docs/workers.md explains the design and the measurements.
"""

from .pool import assess_population, choose_workers, default_workers, one_process_items

__all__ = ["assess_population", "choose_workers", "default_workers", "one_process_items"]
