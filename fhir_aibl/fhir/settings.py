"""Typed settings of the FHIR connector, every default stated and explained.

`ClientSettings` is how the connector talks HTTP (timeouts, retries, paging caps);
`profiles.VendorProfile` is what a server vendor needs (page size, category on
Observation searches, `_revinclude`, ...). The command line overrides a few of each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import __version__


@dataclass(frozen=True)
class RetrySettings:
    #: Attempts in all for an idempotent request (GET, PUT, DELETE, a batch of reads), the first included.
    #: Five attempts with the backoff below span about 30 s before the caps: long enough to ride out
    #: a rolling restart or a burst of 503s, short enough that a dead server fails a run in minutes.
    max_attempts: int = 5
    #: Exponential backoff with "full jitter": before attempt n+1 wait uniform(0, min(backoff_max,
    #: backoff_base * 2**(n-1))) seconds. Jitter spreads the retries of many clients so they do not hit
    #: a recovering server in lock-step (AWS architecture blog, "Exponential Backoff And Jitter").
    backoff_base: float = 0.5
    #: The longest wait between two attempts, seconds (the cap of the backoff above).
    backoff_max: float = 30.0
    #: The longest `Retry-After` (seconds or HTTP-date) honoured. A server asking for longer is not
    #: waited for: the request fails with RateLimited/Unavailable naming the time asked, since
    #: sleeping for minutes per request would stall a population run (Cerner is known to answer 429
    #: with long Retry-After values).
    retry_after_ceiling: float = 120.0
    #: Statuses that mean "not now" rather than "no": too many requests, bad gateway, unavailable,
    #: gateway timeout. 500 is not among them: it usually means the request itself breaks the server
    #: (`GET metadata`, which has no parameters, retries it too: client.FhirClient.capabilities).
    #: Transport failures (no connection, timeouts, answers cut off or unusable) are always retried.
    statuses: frozenset[int] = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class ClientSettings:
    #: Seconds to establish a connection. Short: a server that cannot accept a connection in 10 s
    #: is down or unreachable, and retries (for idempotent requests) cover a blip.
    connect_timeout: float = 10.0
    #: Seconds to wait for the answer once connected. Generous: a batch of six searches over a
    #: patient with hundreds of Observations can take tens of seconds on a loaded server.
    read_timeout: float = 60.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    #: Pages followed per search of one patient's data. A page cap stops a server whose `next`
    #: links never end; 50 pages of the default page size is thousands of resources per type.
    max_pages: int = 50
    #: Pages followed by the population search (and by a type scan, see profiles.VendorProfile.unsearchable).
    population_max_pages: int = 2000
    #: Write-back attempts per patient. A failed transaction (a version conflict, a 503, a lost
    #: answer) is retried for that patient only, after pulling and assessing it again, so the retry
    #: writes what is true now; the transaction is atomic, so a failure leaves nothing half-written.
    write_attempts: int = 2
    #: Stop a run after this many patients in a row failed because the server was unreachable or
    #: unavailable (each after its own retries): the rest are reported failed, "not attempted",
    #: instead of hammering a server that is down, for hours, one patient at a time. 0: never stop.
    max_consecutive_outages: int = 3
    #: The User-Agent header of every request.
    user_agent: str = f"fhir-aibl/{__version__}"
    #: Log request URLs (which carry patient ids) and per-patient lines. Off: logs carry no patient
    #: identifiers or clinical values unless this says so.
    debug_phi: bool = False
