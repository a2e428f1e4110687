"""Load FHIR Bundles of any type into a test server as transactions of PUTs by id.

Each resource keeps the id the file reader (`fhir_aibl.sources`) gives it: its own `id`,
else the uuid of its `urn:uuid:` fullUrl. So a record pulled from the server and the same
record read from the file name the same resources, and their assessments can be compared.
References to entries of the same Bundle (`urn:uuid:...`, or the entry's absolute
fullUrl) are rewritten to `Type/id`; a reference to something the Bundle does not hold
(`urn:uuid:` of nothing, a conditional `Practitioner?identifier=...`) keeps only its
display, because a server must refuse a transaction with a reference it cannot resolve.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import requests

URN_PREFIXES = ("urn:uuid:", "urn:oid:")


def _entry_id(entry: dict) -> str | None:
    resource = entry.get("resource") or {}
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        return rid
    full = entry.get("fullUrl") or ""
    for prefix in URN_PREFIXES:
        if full.startswith(prefix):
            return full[len(prefix) :]
    return None


def _resources(bundle: dict) -> Iterator[tuple[dict, str | None]]:
    for entry in bundle.get("entry") or []:
        resource = entry.get("resource")
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "Bundle":
            yield from _resources(resource)
            continue
        yield entry, entry.get("fullUrl")


def _rewrite(node: Any, mapping: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, mapping) for k, v in node.items()}
        ref = out.get("reference")
        if isinstance(ref, str):
            if ref in mapping:
                out["reference"] = mapping[ref]
            elif ref.startswith(URN_PREFIXES) or "?" in ref:
                del out["reference"]
                out.setdefault("display", "reference outside the loaded Bundle")
        return out
    if isinstance(node, list):
        return [_rewrite(v, mapping) for v in node]
    return node


def to_put_transaction(bundle: dict) -> dict:
    items = []
    mapping: dict[str, str] = {}
    for entry, full_url in _resources(bundle):
        rid = _entry_id(entry)
        if rid is None:
            rid = str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(entry["resource"], sort_keys=True)))
        rtype = entry["resource"]["resourceType"]
        if full_url:
            mapping[full_url] = f"{rtype}/{rid}"
        items.append((rtype, rid, entry["resource"]))
    entries = []
    for rtype, rid, resource in items:
        body = _rewrite(copy.deepcopy(resource), mapping)
        body["id"] = rid
        meta = {k: v for k, v in (body.pop("meta", None) or {}).items() if k not in ("versionId", "lastUpdated")}
        if meta:  # the server owns versionId and lastUpdated; profiles and tags stay
            body["meta"] = meta
        entries.append({"resource": body, "request": {"method": "PUT", "url": f"{rtype}/{rid}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def load_bundle(base_url: str, bundle: dict, session: requests.Session, what: str = "a Bundle") -> int:
    """POST one Bundle as a PUT transaction; the number of resources loaded."""
    tx = to_put_transaction(bundle)
    resp = session.post(base_url, json=tx, headers={"Content-Type": "application/fhir+json"}, timeout=300)
    if resp.status_code != 200:
        raise RuntimeError(f"loading {what} failed: HTTP {resp.status_code}: {resp.text[:500]}")
    return len(tx["entry"])


def load_files(base_url: str, paths: Iterable[Path], session: requests.Session | None = None) -> int:
    """POST each file as a PUT transaction; the number of resources loaded."""
    session = session or requests.Session()
    total = 0
    for path in paths:
        bundle = json.loads(Path(path).read_text())
        if bundle.get("resourceType") != "Bundle":
            bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": bundle}]}
        total += load_bundle(base_url, bundle, session, what=str(path))
    return total
