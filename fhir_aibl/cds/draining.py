"""The HTTP/1.1 protocol of `fhir-aibl serve`: uvicorn's h11 protocol, with a stop that drains.

When a worker stops (SIGTERM, or the old worker of a SIGHUP upgrade), uvicorn closes at once
every connection without a request in progress. Its workers share one listening socket, so a
connection the stopping worker accepted a moment before, whose request had not been read yet,
was closed under the client: the EHR saw a reset instead of its cards (measured: about one call
in 18,000 during repeated upgrades under load). Here such a connection, and a kept-alive
connection between requests, gets `DRAIN_SECONDS` to deliver its request, which is then answered
and the connection closed (`Connection: close`); a connection that sends nothing in that time is
closed as before. A request in progress is unchanged: it is answered within
`--graceful-timeout`, then its connection closed.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

#: How long a stopping worker waits for the request of a connection that has not sent one yet.
DRAIN_SECONDS = 1.0


class DrainingH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose graceful shutdown waits `DRAIN_SECONDS` for a request not yet read."""

    _draining = False
    _drain_timer: asyncio.TimerHandle | None = None

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def shutdown(self) -> None:
        if self._draining:
            return
        self._draining = True
        if not self._idle():
            super().shutdown()  # answered, then closed
            return
        self._drain_timer = self.loop.call_later(DRAIN_SECONDS, self._end_drain)

    def _end_drain(self) -> None:
        self._drain_timer = None
        if self.transport.is_closing():
            return
        if self._idle():
            super().shutdown()  # nothing came: closed, as uvicorn does at once
        else:
            self.cycle.keep_alive = False

    def handle_events(self) -> None:
        super().handle_events()
        if self._draining and not self._idle():
            self.cycle.keep_alive = False  # the request that came during the drain is the last

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        super().connection_lost(exc)
