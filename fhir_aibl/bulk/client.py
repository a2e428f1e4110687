"""A FHIR Bulk Data Access (v2) client: kick-off, status polling, manifest, downloads, delete.

Every request goes through the connector's HTTP seam (`fhir_aibl.fhir.http.Http`): its
authentication (a bearer token, SMART Backend Services), its retries of 429/502/503/504
and transport errors with backoff and `Retry-After`, its same-origin rule for the token and
its typed errors. What is particular to Bulk Data is here:

- kick-off (`kick_off`) at system (`$export`), Patient (`Patient/$export`) or Group
  (`Group/<id>/$export`) level with `Prefer: respond-async`; `_type` comma-joined, `_since`,
  `_typeFilter`; the answer is 202 with `Content-Location`, the status URL;
- polling (`wait`): 202 means in progress; `X-Progress` is reported, `Retry-After` (seconds
  or an HTTP date) honoured up to a ceiling, else an exponential backoff; the wait stops at a
  deadline with an error naming the last progress; 200 is the manifest;
- the manifest's `error` files (OperationOutcomes, NDJSON) read and returned as messages;
- downloads (`download`) streamed to disk, to a temporary name renamed when complete, with
  the token when the manifest says `requiresAccessToken` (the seam only ever sends it to the
  server's own origin; a file on another origin is fetched without it, and refused when the
  manifest says a token is required); a download cut part-way keeps its bytes and is resumed
  with `Range` (and `If-Range`), a 206 appended only when it continues those bytes of the same
  file, a 200 or 416 restarting it from byte 0 (`_download_once`);
- `delete` of the job when done (202 or 404 both mean it is gone).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from ..fhir.errors import FhirError, NotFound, ServerError, TransportError
from ..fhir.http import Http, origin, parse_retry_after

NDJSON = "application/fhir+ndjson"
LEVELS = ("system", "patient", "group")


class BulkError(FhirError):
    code = "fhir-bulk"
    issue_type = "processing"


class DownloadFailed(BulkError):
    """A file could not be downloaded after every attempt (transport errors): worth resuming later."""


@dataclass
class Manifest:
    transaction_time: str
    request: str
    requires_token: bool
    output: list[dict]  #: {"type", "url", "count"?}
    error: list[dict]

    @classmethod
    def parse(cls, data: Any) -> Manifest:
        if not isinstance(data, dict) or not isinstance(data.get("output"), list):
            raise BulkError("the export's manifest is not a Bulk Data manifest (no output list)")
        output = [o for o in data["output"] if isinstance(o, dict) and isinstance(o.get("url"), str)]
        errors = [o for o in data.get("error") or [] if isinstance(o, dict) and isinstance(o.get("url"), str)]
        return cls(
            transaction_time=str(data.get("transactionTime") or ""),
            request=str(data.get("request") or ""),
            requires_token=bool(data.get("requiresAccessToken")),
            output=output,
            error=errors,
        )

    def types(self) -> set[str]:
        return {str(o.get("type")) for o in self.output}


@dataclass
class PollSettings:
    #: Give up waiting for the export after this many seconds.
    deadline: float = 3600.0
    #: First wait when the server gives no Retry-After; doubled each time up to `max_interval`.
    interval: float = 1.0
    max_interval: float = 60.0
    #: Attempts per file download (a transport error mid-body resumes the file from the bytes received).
    download_attempts: int = 3


@dataclass
class Progress:
    polls: int = 0
    last: str = ""
    notes: list[str] = field(default_factory=list)


class BulkClient:
    def __init__(
        self,
        http: Http,
        *,
        poll: PollSettings | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        on_progress: Callable[[str], None] | None = None,
    ):
        self.http = http
        self.poll = poll or PollSettings()
        self.sleep = sleep
        self.clock = clock
        self.on_progress = on_progress

    # -- kick-off --------------------------------------------------------------------------
    def kick_off(
        self,
        level: str,
        *,
        group: str | None = None,
        types: Iterable[str] = (),
        since: str | None = None,
        type_filters: Iterable[str] = (),
    ) -> str:
        """Start an export; return its status URL."""
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}")
        if level == "group" and not group:
            raise ValueError("a Group export needs the Group id")
        path = {"system": "$export", "patient": "Patient/$export", "group": f"Group/{group}/$export"}[level]
        params: list[tuple[str, str]] = []
        types = list(types)
        if types:
            params.append(("_type", ",".join(types)))
        if since:
            params.append(("_since", since))
        for spec in type_filters:
            params.append(("_typeFilter", spec))
        resp = self.http.send(
            "GET", path, params=params, headers={"Prefer": "respond-async"}, what=f"GET {path.split('/')[0]} export"
        )
        location = resp.headers.get("Content-Location")
        if resp.status_code != 202 or not location:
            raise BulkError(
                f"the server did not start an asynchronous export (HTTP {resp.status_code}"
                f"{', no Content-Location' if not location else ''})"
            )
        return location

    # -- status ----------------------------------------------------------------------------
    def wait(self, status_url: str) -> Manifest:
        """Poll until the manifest (or an error, or the deadline)."""
        started = self.clock()
        interval = self.poll.interval
        progress = ""
        while True:
            resp = self.http.send("GET", status_url, what="GET export status")
            if resp.status_code == 200:
                return Manifest.parse(_json(resp))
            if resp.status_code != 202:
                raise BulkError(f"export status: unexpected HTTP {resp.status_code}")
            progress = resp.headers.get("X-Progress", "") or progress
            if progress and self.on_progress:
                self.on_progress(progress)
            wait = parse_retry_after(resp.headers.get("Retry-After"))
            if wait is None:
                wait, interval = interval, min(self.poll.max_interval, interval * 2)
            wait = min(wait, self.poll.max_interval)
            elapsed = self.clock() - started
            if elapsed + wait > self.poll.deadline:
                raise BulkError(
                    f"the export did not finish within {self.poll.deadline:g} s"
                    + (f" (last progress: {progress})" if progress else "")
                )
            self.sleep(wait)

    # -- files -----------------------------------------------------------------------------
    def download(self, url: str, dest: Path, *, requires_token: bool) -> int:
        """Stream one file to `dest`; return its size. A transport error mid-body keeps the bytes
        received (`<name>.part`), and the next attempt (or the next run) asks for the rest with
        `Range` (`_resume`)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        same_origin = origin(url) == self.http.origin
        if not same_origin and requires_token:
            raise BulkError(
                "an export file is on another origin and needs the access token; "
                "refused: the token is only ever sent to the FHIR server itself"
            )
        last: Exception | None = None
        for attempt in range(1, max(1, self.poll.download_attempts) + 1):
            try:
                return self._download_once(url, dest, same_origin)
            except (requests.RequestException, TransportError) as exc:
                last = exc  # the part stays: the next attempt resumes it
                if attempt < self.poll.download_attempts:
                    self.sleep(self.http.backoff(attempt))
        raise DownloadFailed(f"export file: download failed after {self.poll.download_attempts} attempts ({last})")

    def _get(self, url: str, headers: dict[str, str], same_origin: bool) -> requests.Response:
        if same_origin:
            return self.http.send("GET", url, headers=headers, stream=True, what="GET export file")
        resp = self.http.session.get(
            url, headers=headers, stream=True,
            timeout=(self.http.settings.connect_timeout, self.http.settings.read_timeout),
        )
        if resp.status_code == 416:
            resp.close()
            raise ServerError("GET export file: HTTP 416", status=416)
        resp.raise_for_status()
        return resp

    def _download_once(self, url: str, dest: Path, same_origin: bool) -> int:
        part = dest.with_name(dest.name + ".part")
        sidecar = dest.with_name(dest.name + ".part.json")
        for _fresh in range(2):  # a part that cannot be resumed is dropped, and the file fetched from byte 0
            known = _resume_state(sidecar, url) if part.exists() else None
            have = part.stat().st_size if known is not None else 0
            if known is None or not have:
                part.unlink(missing_ok=True)
                sidecar.unlink(missing_ok=True)
                known, have = None, 0
            if known is not None and known.get("length") == have:
                return _finish(part, sidecar, dest, have)  # every byte already here
            headers = {"Accept": NDJSON}
            if have:
                headers["Range"] = f"bytes={have}-"
                validator = known.get("etag") or known.get("last_modified")
                if validator:
                    headers["If-Range"] = validator
            try:
                resp = self._get(url, headers, same_origin)
            except FhirError as exc:
                if have and getattr(exc, "status", None) == 416:
                    part.unlink(missing_ok=True)  # no bytes after the part's: it is not this file's beginning
                    sidecar.unlink(missing_ok=True)
                    continue
                raise
            if resp.status_code == 206:
                if not have or not _continues(resp, known, have):
                    resp.close()  # not the rest of the bytes on disk: never splice two files
                    part.unlink(missing_ok=True)
                    sidecar.unlink(missing_ok=True)
                    continue
                mode = "ab"
            else:  # 200: the whole file, from byte 0
                have, mode = 0, "wb"
                _remember(sidecar, url, resp)
            size = have
            with resp, part.open(mode) as fh:
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    fh.write(chunk)
                    size += len(chunk)
            return _finish(part, sidecar, dest, size)
        raise BulkError("export file: the server answered a resumed download with another file twice")

    def error_messages(self, manifest: Manifest, folder: Path) -> list[str]:
        """The messages of the manifest's `error` files (OperationOutcomes, one per line)."""
        messages: list[str] = []
        for i, item in enumerate(manifest.error):
            dest = folder / f"error.{i:03d}.ndjson"
            try:
                self.download(item["url"], dest, requires_token=manifest.requires_token)
            except FhirError as exc:
                messages.append(f"an error file could not be read: {exc}")
                continue
            for line in dest.read_text(encoding="utf-8", errors="replace").splitlines():
                messages.extend(_outcome_messages(line))
        return messages

    def delete(self, status_url: str) -> str | None:
        """Delete the job on the server (its files too); None when done (a job already gone is fine),
        else why not. Never raises a FhirError: the export itself is complete, this is housekeeping."""
        try:
            self.http.send("DELETE", status_url, what="DELETE export")
        except NotFound:
            pass
        except FhirError as exc:
            return f"the server did not delete the export job ({exc}); it keeps the files until it expires them"
        return None


def _json(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError as exc:
        raise BulkError("the export's manifest is not JSON") from exc


def _outcome_messages(line: str) -> list[str]:
    import json

    line = line.strip()
    if not line:
        return []
    try:
        outcome = json.loads(line)
    except ValueError:
        return [f"(not JSON) {line[:200]}"]
    out = []
    for issue in outcome.get("issue") or [] if isinstance(outcome, dict) else []:
        if isinstance(issue, dict):
            text = issue.get("diagnostics") or (issue.get("details") or {}).get("text") or issue.get("code") or ""
            out.append(f"{issue.get('severity', 'error')}: {text}")
    return out or [line[:200]]


def _resume_state(sidecar: Path, url: str) -> dict | None:
    """What was remembered about a part-downloaded file, if it is this URL's and can be resumed."""
    import json

    try:
        known = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return known if isinstance(known, dict) and known.get("url") == url and known.get("resumable") else None


def _remember(sidecar: Path, url: str, resp: requests.Response) -> None:
    """The validators of a file as it begins, to resume it later with `If-Range` and check the 206."""
    import json

    encoded = resp.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    etag = resp.headers.get("ETag")
    length = resp.headers.get("Content-Length")
    sidecar.write_text(json.dumps({
        "url": url,
        # bytes on disk are decoded: a compressed answer's ranges would not line up with them
        "resumable": not encoded and resp.headers.get("Accept-Ranges", "bytes").lower() != "none",
        "etag": etag if etag and not etag.startswith("W/") else None,  # If-Range takes a strong ETag only
        "last_modified": resp.headers.get("Last-Modified"),
        "length": int(length) if length and length.isdigit() and not encoded else None,
    }))


def _continues(resp: requests.Response, known: dict, have: int) -> bool:
    """A 206 is the rest of the bytes on disk: its Content-Range starts there, and it is the same file."""
    import re

    match = re.fullmatch(r"\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*", resp.headers.get("Content-Range", ""))
    if match is None or int(match[1]) != have:
        return False
    if match[3] != "*" and known.get("length") is not None and int(match[3]) != known["length"]:
        return False
    for header, key in (("ETag", "etag"), ("Last-Modified", "last_modified")):
        if known.get(key) and resp.headers.get(header) and resp.headers[header] != known[key]:
            return False
    return True


def _finish(part: Path, sidecar: Path, dest: Path, size: int) -> int:
    os.replace(part, dest)
    sidecar.unlink(missing_ok=True)
    return size
