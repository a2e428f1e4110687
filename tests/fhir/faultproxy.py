"""A fault-injecting HTTP proxy for the connector's tests, between `fhir-aibl run` and a real
FHIR server (SEKMET).

    plan = FaultPlan(rate=0.3, seed=7)
    with FaultProxy("http://127.0.0.1:8123/fhir", plan) as proxy:
        ... fhir-aibl run --fhir-base {proxy.base_url} ...
    proxy.injected        # Counter of (method, fault) injected

Each request, with probability `rate` (a `random.Random(seed)`, so a run is repeatable), gets
one fault, drawn from `faults`:

| fault         | forwarded? | what the client gets                                              |
|---------------|------------|-------------------------------------------------------------------|
| `429`         | no         | 429 with `Retry-After: 0` and an OperationOutcome                   |
| `500`, `503`  | no         | that status with an OperationOutcome                                |
| `refuse`      | no         | the connection reset (RST) before any answer                        |
| `truncate`    | yes        | the real status and Content-Length, half the body, then the close   |
| `reset`       | yes        | the real status line and headers, part of the body, then an RST     |
| `chunking`    | yes        | `Transfer-Encoding: chunked` with a chunk size that is not hex      |
| `delay`       | yes        | the answer `delay` seconds late (set it past the client's timeout)  |
| `not-json`    | yes        | 200 with an HTML error page                                          |
| `not-fhir`    | yes        | 200 with JSON that is no FHIR resource                               |

"Forwarded" faults reach the server first: a POST transaction is applied and only its answer
is lost, the case the write-back must get right. Everything else is passed through, with the
server's own origin in bodies and headers rewritten to the proxy's (paging links, Location).

Bounds: it listens on 127.0.0.1 on a free port, in a daemon thread; every upstream call has a
timeout; and it shuts itself down after `lifetime` seconds even if a test forgets to.
"""

from __future__ import annotations

import collections
import http.client
import json
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("429", "500", "503", "refuse", "truncate", "reset", "chunking", "delay", "not-json", "not-fhir")
_NOT_FORWARDED = {"429", "500", "503", "refuse"}
#: request headers not passed upstream: hop-by-hop ones, and compression (bodies are rewritten)
_DROPPED = {"host", "connection", "keep-alive", "accept-encoding", "content-length", "transfer-encoding"}
#: response headers passed back
_KEPT = ("content-type", "location", "content-location", "etag", "last-modified")


@dataclass(frozen=True)
class FaultPlan:
    #: probability that a request gets a fault
    rate: float
    seed: int = 0
    faults: tuple[str, ...] = FAULTS
    methods: frozenset[str] = frozenset({"GET", "POST", "PUT"})
    #: seconds an answer is held back by `delay` (past the client's read timeout)
    delay: float = 2.5


def _outcome(text: str, code: str) -> bytes:
    issue = {"severity": "error", "code": code, "diagnostics": text}
    return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()


class FaultProxy:
    def __init__(self, upstream: str, plan: FaultPlan, *, lifetime: float = 600.0, upstream_timeout: float = 60.0):
        parts = urlsplit(upstream.rstrip("/"))
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError("the fault proxy only fronts a server on this machine")
        self.upstream = upstream.rstrip("/")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.path = parts.path
        self.plan = plan
        self.lifetime = lifetime
        self.upstream_timeout = upstream_timeout
        self.injected: collections.Counter[tuple[str, str]] = collections.Counter()
        self.passed = 0
        self._rng = random.Random(plan.seed)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.handle_error = lambda request, address: None  # a client that went away is expected
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    @property
    def origin(self) -> str:
        assert self._server is not None, "the proxy is not running"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def base_url(self) -> str:
        return self.origin + self.path

    # -- decisions ---------------------------------------------------------------------------------
    def draw(self, method: str) -> str | None:
        with self._lock:
            hit = self._rng.random() < self.plan.rate
            fault = self._rng.choice(self.plan.faults) if hit else None
            if fault is None or method not in self.plan.methods:
                self.passed += 1
                return None
            self.injected[(method, fault)] += 1
            return fault

    def forward(self, method: str, path: str, headers: dict[str, str], body: bytes | None):
        """Send upstream; (status, reason, headers to keep, body) with origins rewritten."""
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=self.upstream_timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            kept = {k: v for k, v in resp.getheaders() if k.lower() in _KEPT}
            status, reason = resp.status, resp.reason
        finally:
            conn.close()
        upstream_origin = self.upstream[: len(self.upstream) - len(self.path)]
        data = data.replace(upstream_origin.encode(), self.origin.encode())
        kept = {k: v.replace(upstream_origin, self.origin) for k, v in kept.items()}
        return status, reason, kept, data


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.0"  # one request per connection: a fault never spills into the next

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    # -- one request ---------------------------------------------------------------------------------
    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        method = self.command
        fault = self.owner.draw(method)
        try:
            if fault in _NOT_FORWARDED:
                self._refuse(fault)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _DROPPED}
            try:
                status, reason, kept, data = self.owner.forward(method, self.path, headers, body)
            except OSError:
                problem = _outcome("the upstream server did not answer", "transient")
                self._send(502, "Bad Gateway", {"Content-Type": "application/fhir+json"}, problem)
                return
            if fault is None:
                self._send(status, reason, kept, data)
            elif fault == "truncate":
                head = self._head(status, reason, {**kept, "Content-Length": str(len(data))})
                self.wfile.write(head + data[: len(data) // 2])
            elif fault == "reset":
                head = self._head(status, reason, {**kept, "Content-Length": str(len(data))})
                self.wfile.write(head + data[: len(data) // 3])
                self._reset()
            elif fault == "chunking":
                head = self._head(status, reason, {**kept, "Transfer-Encoding": "chunked"})
                self.wfile.write(head + b"zz\r\n" + data[:10] + b"\r\n0\r\n\r\n")
            elif fault == "delay":
                time.sleep(self.owner.plan.delay)
                self._send(status, reason, kept, data)
            elif fault == "not-json":
                page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
                self._send(200, "OK", {"Content-Type": "text/html"}, page)
            elif fault == "not-fhir":
                self._send(200, "OK", {"Content-Type": "application/json"}, b'{"status": "ok"}')
        except OSError:
            pass  # the client gave up (a delay past its timeout): expected

    def _refuse(self, fault: str) -> None:
        if fault == "refuse":
            self._reset()
            return
        status = int(fault)
        reason = {429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}[status]
        headers = {"Content-Type": "application/fhir+json"}
        if status == 429:
            headers["Retry-After"] = "0"
        self._send(status, reason, headers, _outcome(f"injected {status}", "transient"))

    @staticmethod
    def _head(status: int, reason: str, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()] + ["Connection: close"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _send(self, status: int, reason: str, headers: dict[str, str], data: bytes) -> None:
        self.wfile.write(self._head(status, reason, {**headers, "Content-Length": str(len(data))}) + data)

    def _reset(self) -> None:
        """Close with an RST (SO_LINGER 0) instead of an orderly FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
