"""A SMART on FHIR EHR for tests: an authorization server on Authlib, and a FHIR endpoint in front of SEKMET.

    ehr = SmartEhr(fhir_upstream="http://127.0.0.1:<sekmet>/fhir", redirect_uris=[...])
    with serve(ehr.app) as base:             # http://127.0.0.1:<port>
        ehr.base = base
        launch = ehr.new_launch("v06")       # what the EHR puts in the launch URL for this chart
        # the app is launched with iss = f"{base}/fhir" and launch

What it implements (SMART App Launch 2.x, EHR launch, public client):
- `GET /fhir/.well-known/smart-configuration`: the endpoints, `launch-ehr`, `client-public`,
  `context-ehr-patient`, PKCE `S256`;
- `GET /authorize`: Authlib's authorization-code grant with its PKCE extension (RFC 7636,
  required for this public client), checking the client, the redirect URI, `aud` (must be the
  FHIR base) and `launch` (must be one this EHR issued); the user is taken as already signed in
  and consenting, as in an EHR session;
- `POST /token`: Authlib's token endpoint (code, code_verifier, redirect_uri, client_id); the token
  response carries the launch context (`patient`);
- `GET /fhir/...`: the FHIR server, proxied to SEKMET, answering only with a valid bearer token and
  only about the token's patient (401 / 403 otherwise).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import requests
import uvicorn
from authlib.oauth2 import OAuth2Error
from authlib.oauth2.rfc6749 import AuthorizationServer, ClientMixin, grants
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload, JsonRequest, OAuth2Request
from authlib.oauth2.rfc7636 import CodeChallenge
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from .fhir_server import free_port

CLIENT_ID = "fhir-aibl-bone-health"


class _Request(OAuth2Request):
    def __init__(self, method: str, uri: str, headers: dict, args: dict, form: dict):
        super().__init__(method, uri, headers=headers)
        self._args, self._form = args, form
        self.payload = BasicOAuth2Payload({**args, **form})

    @property
    def args(self):
        return self._args

    @property
    def form(self):
        return self._form


@dataclass
class _Client(ClientMixin):
    client_id: str
    redirect_uris: list[str]

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope):
        return scope

    def check_redirect_uri(self, redirect_uri):
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret):
        return False  # a public client has none

    def check_endpoint_auth_method(self, method, endpoint):
        return method == "none"

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type == "authorization_code"


@dataclass
class _Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    patient: str
    code_challenge: str | None
    code_challenge_method: str | None
    created: float = field(default_factory=time.time)

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope


@dataclass
class _User:
    patient: str

    def get_user_id(self):
        return "practitioner-1"


class SmartEhr:
    def __init__(self, fhir_upstream: str, redirect_uris: list[str]):
        self.upstream = fhir_upstream.rstrip("/")
        self.base = ""  # set once the server listens
        self.clients = {CLIENT_ID: _Client(CLIENT_ID, list(redirect_uris))}
        self.launches: dict[str, str] = {}
        self.codes: dict[str, _Code] = {}
        self.tokens: dict[str, dict] = {}
        self.token_requests: list[dict] = []
        self.fhir_requests: list[str] = []
        self.server = self._authorization_server()
        self.app = self._app()

    @property
    def iss(self) -> str:
        return f"{self.base}/fhir"

    def new_launch(self, patient_id: str) -> str:
        launch = secrets.token_urlsafe(16)
        self.launches[launch] = patient_id
        return launch

    # -- Authlib ------------------------------------------------------------------------
    def _authorization_server(self) -> AuthorizationServer:
        ehr = self

        class Server(AuthorizationServer):
            def query_client(self, client_id):
                return ehr.clients.get(client_id)

            def save_token(self, token, request):
                ehr.tokens[token["access_token"]] = {"patient": token["patient"], "scope": token.get("scope", "")}

            def create_oauth2_request(self, request):
                return request

            def create_json_request(self, request):
                return JsonRequest(request.method, request.uri, request.headers)

            def handle_response(self, status, body, headers):
                return status, body, headers

            def send_signal(self, name, *args, **kwargs):
                pass

        class Grant(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["none"]

            def save_authorization_code(self, code, request):
                data = request.payload.data
                ehr.codes[code] = _Code(
                    code=code,
                    client_id=request.client.get_client_id(),
                    redirect_uri=data.get("redirect_uri"),
                    scope=data.get("scope", ""),
                    patient=ehr.launches[data["launch"]],
                    code_challenge=data.get("code_challenge"),
                    code_challenge_method=data.get("code_challenge_method"),
                )

            def query_authorization_code(self, code, client):
                found = ehr.codes.get(code)
                if found and found.client_id == client.get_client_id() and time.time() - found.created < 60:
                    return found
                return None

            def delete_authorization_code(self, authorization_code):
                ehr.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code):
                return _User(authorization_code.patient)

        def token(grant_type, client, user=None, scope=None, expires_in=None, include_refresh_token=True):
            return {
                "token_type": "Bearer",
                "access_token": secrets.token_urlsafe(32),
                "expires_in": 300,
                "scope": scope or "",
                "patient": user.patient,
            }

        server = Server()
        server.register_grant(Grant, [CodeChallenge(required=True)])
        server.register_token_generator("default", token)
        return server

    # -- HTTP ---------------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app = FastAPI()
        ehr = self

        @app.get("/fhir/.well-known/smart-configuration")
        async def configuration():
            return {
                "issuer": ehr.base,
                "authorization_endpoint": f"{ehr.base}/authorize",
                "token_endpoint": f"{ehr.base}/token",
                "token_endpoint_auth_methods_supported": ["none"],
                "grant_types_supported": ["authorization_code"],
                "scopes_supported": ["launch", "openid", "fhirUser", "patient/*.read"],
                "response_types_supported": ["code"],
                "capabilities": ["launch-ehr", "client-public", "context-ehr-patient", "permission-patient"],
                "code_challenge_methods_supported": ["S256"],
            }

        @app.get("/authorize")
        async def authorize(request: Request):
            args = dict(request.query_params)
            if args.get("aud", "").rstrip("/") != ehr.iss:
                return JSONResponse({"error": "invalid_request", "error_description": "aud is not this FHIR server"}, 400)
            if args.get("launch") not in ehr.launches:
                return JSONResponse({"error": "invalid_request", "error_description": "unknown launch"}, 400)
            req = _Request("GET", str(request.url), dict(request.headers), args, {})
            try:
                grant = ehr.server.get_consent_grant(req)
            except OAuth2Error as exc:
                return JSONResponse(dict(exc.get_body()), exc.status_code)
            status, body, headers = ehr.server.create_authorization_response(req, grant_user=_User(ehr.launches[args["launch"]]), grant=grant)
            location = dict(headers).get("Location")
            return RedirectResponse(location, status) if location else JSONResponse(body, status)

        @app.post("/token")
        async def token(request: Request):
            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            ehr.token_requests.append(form)
            req = _Request("POST", str(request.url), dict(request.headers), {}, form)
            status, body, headers = ehr.server.create_token_response(req)
            return JSONResponse(body, status, headers=dict(headers))

        @app.get("/fhir/{path:path}")
        async def fhir(path: str, request: Request):
            auth = request.headers.get("authorization", "")
            grant = ehr.tokens.get(auth[7:]) if auth.lower().startswith("bearer ") else None
            if grant is None:
                return JSONResponse({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "login"}]}, 401)
            query = parse_qs(urlsplit(str(request.url)).query)
            about = (query.get("patient") or query.get("subject") or [None])[0] or (path.split("/")[1] if path.startswith("Patient/") else None)
            if about is None and path == "Patient":
                about = (query.get("_id") or [None])[0]
            if about is None or about.split("/")[-1] != grant["patient"]:
                return JSONResponse({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "forbidden"}]}, 403)
            ehr.fhir_requests.append(f"{path}?{urlsplit(str(request.url)).query}")
            upstream = requests.get(f"{ehr.upstream}/{path}", params=list(request.query_params.multi_items()), timeout=30)
            body = upstream.text.replace(ehr.upstream, ehr.iss)
            return Response(body, upstream.status_code, media_type=upstream.headers.get("content-type", "application/fhir+json"))

        return app


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run an ASGI app with uvicorn on a free loopback port in a thread; yield its base URL; stop it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
