"""Fixtures of the CDS Hooks tests: apps on the shared Assessor, an in-process client, an EHR signer.

The app is called in process through httpx's ASGI transport (no port, no network); the
EHR's JWKS is served by a `responses` mock, so the service fetches it with requests as it
would in production.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import responses
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet

from fhir_aibl.cds import create_app, settings_for_tests
from fhir_aibl.cds.app import CdsService

from ..conftest import FIXTURES, SHARED_DATA

BUNDLES = FIXTURES / "bundles"
CDS_DATA = SHARED_DATA / "cds-hooks"
AS_OF = "2026-06-01"
BASE = "https://cds.example.org"
EHR_ISS = "https://ehr.example.org"
EHR_JKU = "https://ehr.example.org/.well-known/jwks.json"
PV = "aibl-patient-view"
OS = "aibl-order-select"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


def bundle(name: str) -> dict:
    return json.loads((BUNDLES / f"{name}.json").read_text())


def cds_data(rel: str) -> Path:
    path = CDS_DATA / rel
    if not path.exists():
        pytest.skip(f"../shared/data/cds-hooks/{rel} is not beside the project")
    return path


class Client:
    """A synchronous face on httpx.AsyncClient over the ASGI app, plus concurrent calls."""

    def __init__(self, app):
        self.loop = asyncio.new_event_loop()
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=60)

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def get(self, url: str, **kw) -> httpx.Response:
        return self.run(self.http.get(url, **kw))

    def post(self, url: str, **kw) -> httpx.Response:
        return self.run(self.http.post(url, **kw))

    def options(self, url: str, **kw) -> httpx.Response:
        return self.run(self.http.options(url, **kw))

    def gather(self, calls: list[tuple[str, dict]]) -> list[httpx.Response]:
        async def all_of():
            return await asyncio.gather(*(self.http.post(url, **kw) for url, kw in calls))

        return self.run(all_of())

    def close(self) -> None:
        self.run(self.http.aclose())
        self.loop.close()


@dataclass
class Harness:
    app: Any
    client: Client
    clock: list[float] = field(default_factory=lambda: [time.time()])

    @property
    def cds(self) -> CdsService:
        return self.app.state.cds

    def hook(self, service: str, body: Any, headers: dict | None = None) -> httpx.Response:
        return self.client.post(f"/cds-services/{service}", json=body, headers=headers or {})

    def feedback(self, service: str, body: Any, headers: dict | None = None) -> httpx.Response:
        return self.client.post(f"/cds-services/{service}/feedback", json=body, headers=headers or {})


@pytest.fixture
def make_app(tmp_path, assessor) -> Iterator[Callable[..., Harness]]:
    """`make_app(**settings)`: an app on the shared Assessor, clock in `harness.clock[0]`.

    Unsigned by default (most tests are about the clinical answer); JWT tests pass
    `allow_unsigned=False` with issuers.
    """
    made: list[Harness] = []

    def make(**overrides) -> Harness:
        overrides.setdefault("allow_unsigned", True)
        overrides.setdefault("as_of", AS_OF)
        settings = settings_for_tests(tmp_path / f"app{len(made)}", **overrides)
        clock = [time.time()]
        app = create_app(settings, assessor=assessor, clock=lambda: clock[0])
        harness = Harness(app, Client(app), clock)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.client.close()
        harness.cds.close()


@dataclass
class Signer:
    """An EHR: an EC P-384 key, its JWKS, and tokens signed with it."""

    key: ECKey
    iss: str = EHR_ISS
    jku: str = EHR_JKU

    @property
    def jwks(self) -> dict:
        return KeySet([self.key]).as_dict(private=False)

    def token(self, aud: str, *, header: dict | None = None, key=None, **claims) -> str:
        now = int(claims.pop("now", time.time()))
        body = {"iss": self.iss, "aud": aud, "iat": now, "exp": now + 300, "jti": str(uuid.uuid4())}
        body.update(claims)
        for name in [k for k, v in body.items() if v is None]:
            del body[name]
        head = {"alg": "ES384", "typ": "JWT", "kid": self.key.kid, "jku": self.jku}
        head.update(header or {})
        for name in [k for k, v in head.items() if v is None]:
            del head[name]
        return jwt.encode(head, body, key or self.key, algorithms=[head["alg"]])

    def bearer(self, aud: str, **kw) -> dict:
        return {"Authorization": f"Bearer {self.token(aud, **kw)}"}

    def issuer_settings(self) -> dict:
        return {"issuers": [{"iss": self.iss, "jku": [self.jku]}]}


@pytest.fixture(scope="session")
def signer() -> Signer:
    return Signer(ECKey.generate_key("P-384", parameters={"kid": "ehr-key-1", "alg": "ES384", "use": "sig"}))


@pytest.fixture
def jwks_server(signer) -> Iterator[responses.RequestsMock]:
    """The EHR's JWKS URL, answered by a `responses` mock (requests never leaves the process)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.get(EHR_JKU, json=signer.jwks)
        yield mock
