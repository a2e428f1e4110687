"""A FHIR R4 REST client on requests: read, search with paging, batch, transaction,
conditional create, conditional and versioned update, CapabilityStatement discovery.

Query building is kept apart from I/O: `SearchSpec` is a value (type + parameters) that
renders to a relative URL; `FhirClient` sends it through the one HTTP seam (`http.Http`).

Paging follows `Bundle.link[relation=next]` only to the origin of the base URL (a link
elsewhere raises ForeignLink: the next request would carry the token there) and at most
`max_pages` pages (PageLimit beyond: a server whose links never end must not loop us).
A searchset that reports, in an OperationOutcome entry, that it ignored or did not
support a parameter raises IgnoredParameter: an ignored `patient=` returns everybody.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import requests

from ..jsoninput import loads as json_loads
from .auth import Auth
from .errors import AuthError, FhirError, IgnoredParameter, NotFound, PageLimit, ServerError, outcome_diagnostics
from .http import Http, resource_of
from .profiles import VendorProfile, get_profile
from .settings import ClientSettings

log = logging.getLogger("fhir_aibl.fhir")


# -- queries -------------------------------------------------------------------------------------


def escape_token(value: str) -> str:
    """Escape a search value's `\\`, `,`, `|` and `$` (FHIR search, "escaping search parameters")."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("|", "\\|").replace("$", "\\$")


@dataclass(frozen=True)
class SearchSpec:
    """A type-level search: `Type?name=value&...`, in a stable parameter order."""

    resource_type: str
    params: tuple[tuple[str, str], ...] = ()

    def url(self) -> str:
        if not self.params:
            return self.resource_type
        # `|`, `,` and `:` stay readable (and are what servers expect); everything else is encoded.
        return f"{self.resource_type}?{urlencode(self.params, quote_via=quote, safe='|,:')}"

    def with_params(self, *extra: tuple[str, str]) -> SearchSpec:
        return SearchSpec(self.resource_type, self.params + tuple(extra))

    def describe(self) -> str:
        """For logs: the type and parameter names, never values (they carry patient ids)."""
        names = ",".join(dict.fromkeys(name for name, _ in self.params))
        return f"{self.resource_type} search ({names})" if names else f"{self.resource_type} search"


# -- capabilities ---------------------------------------------------------------------------------


@dataclass
class ResourceCapabilities:
    search_params: set[str] = field(default_factory=set)
    rev_includes: set[str] = field(default_factory=set)
    includes: set[str] = field(default_factory=set)
    interactions: set[str] = field(default_factory=set)
    conditional_create: bool | None = None
    update_create: bool | None = None
    versioning: str | None = None


@dataclass
class Capabilities:
    """What a CapabilityStatement says. `None` answers mean "not said": the profile decides."""

    known: bool = False
    software: str = ""
    fhir_version: str = ""
    interactions: set[str] = field(default_factory=set)
    resources: dict[str, ResourceCapabilities] = field(default_factory=dict)
    #: why the statement is unknown (for a warning), if it is
    problem: str = ""

    @classmethod
    def unknown(cls, problem: str = "") -> Capabilities:
        return cls(known=False, problem=problem)

    @classmethod
    def parse(cls, statement: Mapping[str, Any]) -> Capabilities:
        caps = cls(known=True)
        software = statement.get("software") or {}
        caps.software = " ".join(str(software.get(k, "")) for k in ("name", "version")).strip()
        caps.fhir_version = str(statement.get("fhirVersion", ""))
        for rest in statement.get("rest") or []:
            if not isinstance(rest, dict) or rest.get("mode", "server") != "server":
                continue
            caps.interactions |= {i.get("code") for i in rest.get("interaction") or [] if isinstance(i, dict)}
            for res in rest.get("resource") or []:
                if not isinstance(res, dict) or not res.get("type"):
                    continue
                rc = caps.resources.setdefault(res["type"], ResourceCapabilities())
                rc.search_params |= {p.get("name") for p in res.get("searchParam") or [] if isinstance(p, dict)}
                rc.rev_includes |= {str(r) for r in res.get("searchRevInclude") or []}
                rc.includes |= {str(r) for r in res.get("searchInclude") or []}
                rc.interactions |= {i.get("code") for i in res.get("interaction") or [] if isinstance(i, dict)}
                if "conditionalCreate" in res:
                    rc.conditional_create = bool(res["conditionalCreate"])
                if "updateCreate" in res:
                    rc.update_create = bool(res["updateCreate"])
                rc.versioning = res.get("versioning")
        return caps

    # The answers below are True/False when the statement says, None when it does not.

    def supports_batch(self) -> bool | None:
        if not self.known or not self.interactions:
            return None
        # Servers that list only `transaction` often batch too; a refusal at run time is handled.
        return bool(self.interactions & {"batch", "transaction"})

    def supports_transaction(self) -> bool | None:
        if not self.known or not self.interactions:
            return None
        return "transaction" in self.interactions

    def _resource(self, resource_type: str) -> ResourceCapabilities | None:
        if not self.known or not self.resources:
            return None
        return self.resources.get(resource_type)

    def lists(self, resource_type: str) -> bool | None:
        if not self.known or not self.resources:
            return None
        return resource_type in self.resources

    def search_param(self, resource_type: str, name: str) -> bool | None:
        if not self.known or not self.resources:
            return None
        rc = self.resources.get(resource_type)
        if rc is None:
            return False  # the server lists resources, not this one: it does not search it
        if not rc.search_params:
            return None  # listed without parameters: not said
        return name in rc.search_params

    def rev_include(self, resource_type: str, spec: str) -> bool | None:
        return self._declared(resource_type, "rev_includes", spec)

    def include(self, resource_type: str, spec: str) -> bool | None:
        """`_include=<spec>` on a search of `resource_type` (its `searchInclude`; `*` allows any)."""
        return self._declared(resource_type, "includes", spec, wildcard=True)

    def _declared(self, resource_type: str, field_name: str, spec: str, *, wildcard: bool = False) -> bool | None:
        rc = self._resource(resource_type)
        if rc is None:
            return None if not self.known or not self.resources else False
        declared: set[str] = getattr(rc, field_name)
        if not declared:
            return None
        return spec in declared or (wildcard and "*" in declared)

    def conditional_create(self, resource_type: str) -> bool | None:
        rc = self._resource(resource_type)
        return rc.conditional_create if rc is not None else None

    def update_create(self, resource_type: str) -> bool | None:
        rc = self._resource(resource_type)
        return rc.update_create if rc is not None else None


# -- responses ----------------------------------------------------------------------------------


@dataclass
class WriteResult:
    status: int
    resource: dict | None
    location: str | None
    etag: str | None

    @property
    def created(self) -> bool:
        return self.status == 201


def entry_status(entry: Mapping[str, Any]) -> int:
    """The HTTP status of a batch/transaction response entry ("201 Created" -> 201); 0 if unreadable."""
    text = str(((entry or {}).get("response") or {}).get("status", "")).strip()
    head = text.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def search_problems(bundle: Mapping[str, Any]) -> list[str]:
    """What a searchset's OperationOutcome entries say was ignored or not supported."""
    problems = []
    for entry in bundle.get("entry") or []:
        resource = (entry or {}).get("resource") or {}
        mode = ((entry or {}).get("search") or {}).get("mode")
        if resource.get("resourceType") != "OperationOutcome" or mode not in ("outcome", None):
            continue
        for issue in resource.get("issue") or []:
            severity, code = issue.get("severity"), issue.get("code")
            if severity in ("error", "fatal") or (severity == "warning" and code in ("not-supported", "processing")):
                problems.append(outcome_diagnostics({"resourceType": "OperationOutcome", "issue": [issue]}))
    return problems


def next_link(bundle: Mapping[str, Any]) -> str | None:
    for link in bundle.get("link") or []:
        if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
            return str(link["url"])
    return None


def bundle_resources(bundle: Mapping[str, Any]) -> list[dict]:
    """The resources of a searchset page (match and include; OperationOutcome entries left out)."""
    out = []
    for entry in bundle.get("entry") or []:
        resource = (entry or {}).get("resource")
        if isinstance(resource, dict) and resource.get("resourceType") not in (None, "OperationOutcome"):
            out.append(resource)
    return out


# -- the client ---------------------------------------------------------------------------------


class FhirClient:
    def __init__(
        self,
        base_url: str,
        *,
        settings: ClientSettings | None = None,
        profile: VendorProfile | str = "generic",
        auth: Auth | None = None,
        session: requests.Session | None = None,
        http: Http | None = None,
    ):
        self.settings = settings or ClientSettings()
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.http = http or Http(base_url, settings=self.settings, auth=auth, session=session)
        self._capabilities: Capabilities | None = None

    @property
    def base_url(self) -> str:
        return self.http.base_url

    @property
    def stats(self):
        return self.http.stats

    def _search_headers(self) -> dict[str, str]:
        return {"Prefer": "handling=strict"} if self.profile.strict_handling else {}

    # -- discovery ---------------------------------------------------------------------------
    def capabilities(self, refresh: bool = False) -> Capabilities:
        """The server's CapabilityStatement, read once.

        `GET metadata` is retried like any idempotent request, and on 500 too (it has no
        parameters: a 500 is the server's trouble, not the request's). A server that says it
        has none (404, 405, 501) gets `Capabilities.unknown`, and the profile decides. Any
        other failure raises, the message saying the capabilities could not be read: a run
        must not go on with defaults that may be wrong for a server that is merely failing
        (every patient would fail, or be pulled the wrong way)."""
        if self._capabilities is None or refresh:
            try:
                statement = self.http.json(
                    "GET",
                    "metadata",
                    what="GET metadata",
                    expect=resource_of("CapabilityStatement"),
                    retry_statuses=self.settings.retry.statuses | {500},
                )
            except ServerError as exc:
                if not isinstance(exc, NotFound) and exc.status not in (405, 501):
                    _say_unreadable(exc)
                    raise
                self._capabilities = Capabilities.unknown(str(exc))
            except AuthError:
                raise  # the credentials are refused: said as such, nothing else would work either
            except FhirError as exc:
                _say_unreadable(exc)
                raise
            else:
                self._capabilities = Capabilities.parse(statement)
        return self._capabilities

    # -- read and search -----------------------------------------------------------------------
    def read(self, resource_type: str, resource_id: str) -> dict:
        return self.http.json(
            "GET",
            f"{resource_type}/{quote(resource_id, safe='')}",
            what=f"GET {resource_type} read",
            expect=resource_of(resource_type),
        )

    def search(self, spec: SearchSpec, *, max_pages: int | None = None) -> list[dict]:
        """Every resource of a search, following `next` links (same origin, page cap)."""
        first = self.http.json(
            "GET", spec.url(), headers=self._search_headers(), what=f"GET {spec.describe()}", expect=_searchset
        )
        return self.collect(first, spec, max_pages=max_pages)

    def collect(self, first: Any, spec: SearchSpec, *, max_pages: int | None = None) -> list[dict]:
        """The resources of a searchset and of the pages after it."""
        return [r for page in self.pages(first, spec, max_pages=max_pages) for r in bundle_resources(page)]

    def pages(self, first: Any, spec: SearchSpec, *, max_pages: int | None = None) -> Iterator[dict]:
        limit = max_pages or self.settings.max_pages
        page = first
        count = 0
        while True:
            if not isinstance(page, dict) or page.get("resourceType") != "Bundle":
                raise FhirError(f"{spec.describe()}: the server did not answer a Bundle")
            problems = search_problems(page)
            if problems:
                raise IgnoredParameter(
                    f"{spec.describe()}: the server did not apply the search as asked: {'; '.join(problems)}"
                )
            count += 1
            yield page
            link = next_link(page)
            if not link:
                return
            if count >= limit:
                raise PageLimit(f"{spec.describe()}: more than {limit} pages; raise the page cap or narrow the search")
            self.http.check_origin(link)
            page = self.http.json(
                "GET", link, headers=self._search_headers(), what=f"GET {spec.describe()} next page", expect=_searchset
            )

    # -- batch and transaction -----------------------------------------------------------------
    def batch(self, entries: Sequence[Mapping[str, Any]], *, read_only: bool = True, what: str = "batch") -> list[dict]:
        """POST a batch Bundle; the response entries, in request order.

        A batch of reads is idempotent and retried like a GET; a batch with writes is not.
        """
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": list(entries)}
        response = self.http.json(
            "POST",
            "",
            body=bundle,
            idempotent=read_only,
            headers=self._search_headers(),
            what=f"POST {what}",
            expect=_response_bundle("batch-response", len(entries)),
        )
        return list(response.get("entry") or [])

    def transaction(self, bundle: Mapping[str, Any], *, what: str = "transaction") -> list[dict]:
        """POST a transaction Bundle (never retried here: see http.py); the response entries."""
        if bundle.get("type") != "transaction":
            raise FhirError("a transaction Bundle must have type transaction")
        response = self.http.json(
            "POST",
            "",
            body=dict(bundle),
            idempotent=False,
            what=f"POST {what}",
            expect=_response_bundle("transaction-response", len(bundle.get("entry") or [])),
        )
        return list(response.get("entry") or [])

    # -- writes ----------------------------------------------------------------------------------
    def create(self, resource: Mapping[str, Any], *, if_none_exist: str | None = None) -> WriteResult:
        """POST a resource; with `if_none_exist` (a query) a conditional create: 200 and the
        existing resource when one matches, 201 when created, 412 (Conflict) when several match."""
        rtype = resource["resourceType"]
        headers = {"Prefer": "return=representation"}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        resp = self.http.send("POST", rtype, body=dict(resource), headers=headers, what=f"POST {rtype} create")
        return _write_result(resp)

    def update(self, resource: Mapping[str, Any], *, if_match: str | None = None) -> WriteResult:
        """PUT Type/id; with `if_match` (an ETag such as W/"3") a versioned update: 412 (Conflict)
        when the resource changed since that version."""
        rtype, rid = resource["resourceType"], resource.get("id")
        if not rid:
            raise FhirError(f"update of a {rtype} without an id")
        headers = {"Prefer": "return=representation"}
        if if_match:
            headers["If-Match"] = if_match
        resp = self.http.send(
            "PUT", f"{rtype}/{quote(rid, safe='')}", body=dict(resource), headers=headers, what=f"PUT {rtype} update"
        )
        return _write_result(resp)

    def conditional_update(self, resource: Mapping[str, Any], query: str) -> WriteResult:
        """PUT Type?query: update the one match, create when none, 412 when several."""
        rtype = resource["resourceType"]
        resp = self.http.send(
            "PUT",
            f"{rtype}?{query}",
            body=dict(resource),
            headers={"Prefer": "return=representation"},
            what=f"PUT {rtype} conditional update",
        )
        return _write_result(resp)

    def close(self) -> None:
        self.http.session.close()


def _say_unreadable(exc: FhirError) -> None:
    """Make an error's message say that the server's capabilities could not be read."""
    exc.message = f"cannot read the server's capabilities (CapabilityStatement): {exc.message}"
    exc.args = (exc.message,)


def _searchset(value: Any) -> str | None:
    """An `expect` check for a search answer: a Bundle whose entries are objects."""
    if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
        return "the server did not answer a Bundle"
    entries = value.get("entry")
    if entries is not None and (not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries)):
        return "the server answered a Bundle whose entries are not objects"
    return None


def _response_bundle(kind: str, expected: int):
    """An `expect` check for a batch or transaction answer: a Bundle of `kind` with one object
    entry per request sent."""

    def check(value: Any) -> str | None:
        if not isinstance(value, dict) or value.get("resourceType") != "Bundle":
            return "the server did not answer a Bundle"
        if value.get("type") not in (kind, None):
            return f"the server answered a {value.get('type')} Bundle, not a {kind}"
        entries = value.get("entry") or []
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            return "the server answered a Bundle whose entries are not objects"
        if len(entries) != expected:
            return f"{expected} entries sent, {len(entries)} answered"
        return None

    return check


def _write_result(resp: requests.Response) -> WriteResult:
    resource = None
    if resp.content:
        try:
            resource = json_loads(resp.content)
        except ValueError:  # not JSON, nested too deep, a duplicate key
            resource = None
    return WriteResult(
        status=resp.status_code,
        resource=resource if isinstance(resource, dict) else None,
        location=resp.headers.get("Location") or resp.headers.get("Content-Location"),
        etag=resp.headers.get("ETag"),
    )


def etag_of(resource: Mapping[str, Any]) -> str | None:
    version = (resource.get("meta") or {}).get("versionId")
    return f'W/"{version}"' if version else None


__all__ = [
    "Capabilities",
    "FhirClient",
    "ResourceCapabilities",
    "SearchSpec",
    "WriteResult",
    "bundle_resources",
    "entry_status",
    "escape_token",
    "etag_of",
    "next_link",
    "search_problems",
]
