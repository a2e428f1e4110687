"""Resumed downloads (HTTP Range) against a small local server that cuts a file part-way and then answers
the resumed request as told: 206 with the rest, 200 with the whole file, 416, a 206 of other bytes or of
another file. The file on disk is always the server's file, never two files spliced."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fhir_aibl.bulk.client import BulkClient, BulkError, PollSettings
from fhir_aibl.fhir.http import Http

LINE = b'{"resourceType":"Observation","id":"o%07d","status":"final","subject":{"reference":"Patient/p1"}}\n'
CONTENT = b"".join(LINE % i for i in range(30000))  # about 3 MB: more than one 1 MB chunk arrives before the cut
CUT = 2_300_000
ETAG = '"v1"'


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - the stdlib's name
        server = self.server
        server.seen.append({k: v for k, v in self.headers.items()})
        plan = server.plan.pop(0) if server.plan else "whole"
        etag = server.etag
        if plan == "cut":
            self.send_response(200)
            self.send_header("Content-Length", str(len(CONTENT)))
            if etag:
                self.send_header("ETag", etag)
            self.end_headers()
            self.wfile.write(CONTENT[:CUT])
            self.wfile.flush()
            self.close_connection = True
            return
        if plan == "416":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(CONTENT)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if plan in ("range", "wrong-start", "other-file"):
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            body = CONTENT[start:] if plan == "range" else CONTENT  # wrong-start: bytes from 0, labelled so
            first = start if plan != "wrong-start" else 0
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{len(CONTENT)}")
            self.send_header("Content-Length", str(len(body)))
            if etag:
                self.send_header("ETag", '"v2"' if plan == "other-file" else etag)
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)  # "whole": the file from byte 0, whatever was asked
        self.send_header("Content-Length", str(len(CONTENT)))
        if etag:
            self.send_header("ETag", etag)
        self.end_headers()
        self.wfile.write(CONTENT)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.plan, httpd.seen, httpd.etag = [], [], ETAG
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def download(server, dest, attempts: int = 3) -> int:
    base = f"http://127.0.0.1:{server.server_address[1]}/fhir"
    http = Http(base, sleep=lambda s: None, jitter=lambda: 1.0)
    client = BulkClient(http, poll=PollSettings(download_attempts=attempts), sleep=lambda s: None)
    return client.download(f"{base}/files/Observation.ndjson", dest, requires_token=False)


def test_a_cut_download_continues_from_the_bytes_on_disk(server, tmp_path):
    server.plan = ["cut", "range"]
    dest = tmp_path / "Observation.000.ndjson"
    assert download(server, dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    first, resumed = server.seen
    assert "Range" not in first
    start = int(resumed["Range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= CUT and resumed["If-Range"] == ETAG  # only what was missing is asked for
    assert not list(tmp_path.glob("*.part*"))


def test_a_200_instead_of_206_restarts_from_zero(server, tmp_path):
    server.plan = ["cut", "whole"]
    dest = tmp_path / "Observation.000.ndjson"
    assert download(server, dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT and "Range" in server.seen[1]


def test_a_416_drops_the_part_and_fetches_the_file_again(server, tmp_path):
    server.plan = ["cut", "416", "whole"]
    dest = tmp_path / "Observation.000.ndjson"
    assert download(server, dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT
    assert "Range" in server.seen[1] and "Range" not in server.seen[2]


@pytest.mark.parametrize("answer", ["wrong-start", "other-file"])
def test_a_206_that_does_not_continue_the_part_is_never_spliced(server, tmp_path, answer):
    # bytes from another offset than asked, or another version of the file (its ETag changed)
    server.plan = ["cut", answer, "whole"]
    dest = tmp_path / "Observation.000.ndjson"
    assert download(server, dest) == len(CONTENT)
    assert dest.read_bytes() == CONTENT and len(server.seen) == 3 and "Range" not in server.seen[2]


def test_a_later_run_resumes_the_part_an_earlier_one_left(server, tmp_path):
    server.plan = ["cut"]
    dest = tmp_path / "Observation.000.ndjson"
    with pytest.raises(BulkError, match="download failed after 1 attempts"):
        download(server, dest, attempts=1)
    kept = (tmp_path / "Observation.000.ndjson.part").stat().st_size
    assert 0 < kept <= CUT and not dest.exists()
    server.plan = ["range"]
    assert download(server, dest) == len(CONTENT) and dest.read_bytes() == CONTENT
    assert server.seen[1]["Range"] == f"bytes={kept}-"


def test_without_validators_the_range_is_asked_without_if_range(server, tmp_path):
    server.etag = None
    server.plan = ["cut", "range"]
    dest = tmp_path / "Observation.000.ndjson"
    assert download(server, dest) == len(CONTENT) and dest.read_bytes() == CONTENT
    assert "Range" in server.seen[1] and "If-Range" not in server.seen[1]
