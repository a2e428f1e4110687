"""Typed settings of the CDS Hooks service, with their defaults, loaded from a YAML or JSON file.

Every setting has a default that is safe: no issuer is trusted (every signed request is
refused until one is configured), no FHIR server is reachable (the fallback query is off
until servers are allowlisted), no browser origin is allowed. `docs/cds-hooks.md` lists
them all; `Settings.model_json_schema()` is the machine-readable form.

Every setting can also be given as an environment variable, `FHIR_AIBL_` and its name in
capitals, nested ones joined with `__` (`FHIR_AIBL_PUBLIC_BASE_URL`,
`FHIR_AIBL_JWT__CLOCK_SKEW_SECONDS`, `FHIR_AIBL_FEEDBACK__DATABASE`); lists and mappings as
JSON (`FHIR_AIBL_CORS_ORIGINS='["https://ehr.example.org"]'`). The environment wins over the
file; the command line's flags win over both. `fhir-aibl serve`'s own flags (host, port,
workers, log level and format, the file itself) read `FHIR_AIBL_HOST` and so on.

The state directory (`state_dir`) holds the SQLite database (issued cards, feedback, the JWT
replay cache shared by every worker process). Unset, it is `$STATE_DIRECTORY` when systemd
provides one (`StateDirectory=`, e.g. /var/lib/fhir-aibl), else the user's state directory
(platformdirs: ~/.local/state/fhir-aibl on Linux): never the current working directory.

Paths in a configuration file are relative to that file. Secrets never live here: the
service holds none (it verifies EHR tokens with public keys, and uses the EHR's own
`fhirAuthorization` token for fallback queries).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import platformdirs
import yaml
from pydantic_settings import EnvSettingsSource
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import AiblError
from ..view.smart import SmartSettings

#: JWS algorithms the CDS Hooks specification allows: asymmetric only. ES384 and RS384 are
#: the ones it recommends; HMAC ("HS*") would let anyone holding the shared secret, including
#: this service, forge a client's token, and "none" is no signature at all.
ASYMMETRIC_ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


class SettingsError(AiblError):
    code = "settings-invalid"
    issue_type = "invalid"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL: {value!r}")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not carry credentials: {value!r}")
    return value.rstrip("/")


class Issuer(_Model):
    """One trusted CDS client (EHR) and where its public keys are."""

    iss: str = Field(description="the `iss` claim the EHR puts in its JWT, compared exactly")
    jku: list[str] = Field(
        default_factory=list,
        description="JWKS URLs this issuer may name in the JWT header `jku`; a token naming another URL is refused. "
        "A token without `jku` uses the first one.",
    )
    jwks_file: Path | None = Field(
        default=None,
        description="a JWK Set file with the issuer's public keys, for EHRs that register keys out of band. "
        "It verifies every token of this issuer whose `jku` is not one of the `jku` URLs above, whatever `jku` "
        "the token announces (that URL is then neither fetched nor trusted)",
    )

    @field_validator("jku")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [_check_url(v, "jku") for v in value]

    @model_validator(mode="after")
    def _keys_somewhere(self) -> "Issuer":
        if not self.jku and self.jwks_file is None:
            raise ValueError(f"issuer {self.iss!r} needs jku URLs or a jwks_file")
        return self


class JwtSettings(_Model):
    issuers: list[Issuer] = Field(default_factory=list, description="trusted issuers; none by default")
    algorithms: list[str] = Field(
        default_factory=lambda: list(ASYMMETRIC_ALGORITHMS),
        description="accepted JWS algorithms; only RS*, ES* and PS* may be listed",
    )
    # The specification wants short-lived tokens (the sandbox's live 5 minutes); a minute of
    # skew absorbs unsynchronised clocks without making a stolen token useful for long.
    clock_skew_seconds: int = Field(default=60, ge=0, le=300, description="tolerance on exp and iat")
    max_lifetime_seconds: int = Field(
        default=3600,
        ge=60,
        description="a token whose exp lies further than this in the future is refused: the replay cache "
        "must remember every jti until its exp",
    )
    jwks_cache_seconds: int = Field(default=3600, ge=0, description="how long fetched keys are reused")
    jwks_refetch_seconds: int = Field(
        default=60,
        ge=0,
        description="a token with an unknown kid triggers at most one re-fetch of its JWKS in this interval "
        "(key rotation without letting bad tokens hammer the EHR)",
    )
    jwks_timeout_seconds: float = Field(default=2.0, gt=0, description="time limit of one JWKS fetch")
    jwks_max_bytes: int = Field(default=256 * 1024, gt=0, description="largest JWKS document accepted")
    replay_cache_size: int = Field(default=100_000, gt=0, description="jti values remembered at most")

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if a not in ASYMMETRIC_ALGORITHMS]
        if bad:
            raise ValueError(f"only asymmetric algorithms are allowed ({', '.join(ASYMMETRIC_ALGORITHMS)}); not {bad}")
        if not value:
            raise ValueError("at least one algorithm")
        return value


class FhirSettings(_Model):
    """The fallback query to the EHR's FHIR server when a prefetch key is missing."""

    allowlist: list[str] = Field(
        default_factory=list,
        description="FHIR base URLs the service may query; the `fhirServer` of a request must equal one of them "
        "or lie below one (same scheme, host, port, path prefix). Empty: no fallback queries",
    )
    budget_seconds: float = Field(
        default=3.0, gt=0, description="time for all fallback queries of one request together"
    )
    max_pages: int = Field(default=10, ge=1, description="pages followed per search (`next` links)")
    max_response_bytes: int = Field(default=20 * 1024 * 1024, gt=0, description="largest FHIR response read")
    verify_tls: bool | str = Field(default=True, description="TLS verification: true, false, or a CA bundle path")

    @field_validator("allowlist")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [_check_url(v, "fhir.allowlist entry") for v in value]


class FeedbackSettings(_Model):
    database: Path | None = Field(
        default=None,
        description="SQLite file for issued cards, feedback and the JWT replay cache, shared by all worker "
        "processes; unset: cds.sqlite3 in state_dir",
    )
    suppression_days: float = Field(
        default=30, ge=0, description="an overridden card is not shown again for this long (0: never suppressed)"
    )
    suppression_scope: Literal["assessment", "patient"] = Field(
        default="assessment",
        description="assessment: only a card with the same assessment (category, risk factors, recommendations, "
        "flags) is suppressed; patient: any card of the same kind for the patient. Either way a worse category "
        "is always shown",
    )
    retention_days: float = Field(default=90, gt=0, description="issued-card records older than this are pruned")


class Coding(_Model):
    system: str
    code: str
    display: str


class Link(_Model):
    label: str
    url: str

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_url(value, "link url")


DEFAULT_OVERRIDE_REASONS = (
    Coding(system="urn:fhir-aibl:override-reason", code="already-addressed", display="Already addressed"),
    Coding(system="urn:fhir-aibl:override-reason", code="patient-declined", display="Patient declined"),
    Coding(system="urn:fhir-aibl:override-reason", code="clinical-judgement", display="Disagree: clinical judgement"),
    Coding(system="urn:fhir-aibl:override-reason", code="managed-elsewhere", display="Managed by another clinician"),
    Coding(system="urn:fhir-aibl:override-reason", code="data-incorrect", display="Record data incorrect"),
)
DEFAULT_LINKS = (
    Link(label="Hadji 2017 AIBL position statement (J Bone Oncol)", url="https://doi.org/10.1016/j.jbo.2017.03.001"),
    Link(label="ASCO 2019 guideline: osteoporosis in cancer survivors", url="https://doi.org/10.1200/JCO.19.01696"),
)


class Settings(_Model):
    """Everything `fhir-aibl serve` can be told in its configuration file."""

    public_base_url: str | None = Field(
        default=None,
        description="the URL EHRs call, without /cds-services (e.g. https://cds.example.org). The JWT `aud` must "
        "equal {public_base_url}/cds-services/{id}; it comes from here only, never from a request's Host or "
        "X-Forwarded-* headers. Required unless allow_unsigned: the service refuses to start without it",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses (or CIDR networks) of reverse proxies whose X-Forwarded-For and X-Forwarded-Proto "
        "headers are believed (client address and scheme in logs); none by default: forwarded headers are ignored. "
        "They never decide which JWTs are accepted",
    )
    state_dir: Path | None = Field(
        default=None,
        description="folder of the service's state (the SQLite database); unset: $STATE_DIRECTORY (set by systemd's "
        "StateDirectory=), else the user's state directory (~/.local/state/fhir-aibl on Linux)",
    )
    patient_view_id: str = Field(
        default="aibl-patient-view", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="id of the patient-view service"
    )
    order_select_id: str = Field(
        default="aibl-order-select", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="id of the order-select service"
    )
    allow_unsigned: bool = Field(
        default=False, description="accept requests without a valid JWT: local development only; logged loudly"
    )
    cors_origins: list[str] = Field(default_factory=list, description="browser origins allowed by CORS; none by default")
    max_request_bytes: int = Field(default=5 * 1024 * 1024, gt=0, description="largest request body accepted (413)")
    # EHRs give a CDS service a few seconds (the spec leaves it to them; 5 s is common): an
    # answer after the EHR has given up helps nobody and ties up a worker.
    request_deadline_seconds: float = Field(default=5.0, gt=0, description="per-request deadline (503 after it)")
    assess_workers: int = Field(default=4, ge=1, description="threads running assessments (the engine is serialised)")
    fetch_workers: int = Field(default=16, ge=1, description="threads running fallback FHIR queries")
    max_queued: int = Field(default=256, ge=1, description="requests waiting for a worker beyond which 503 is answered")
    as_of: dt.date | None = Field(default=None, description="reference date of every assessment; unset: today")
    rules: Path | None = Field(default=None, description="ruleset: a folder holding aibl.yaml, or a rule file, with valuesets/ and recommendations.yaml beside it; unset: the ruleset shipped in the package")
    catalogue: Path | None = Field(default=None, description="recommendation catalogue; unset: recommendations.yaml beside the rules")
    safety: Path | None = Field(default=None, description="safety-block table; unset: the one shipped in the package (fhir_aibl/cds/safety.yaml)")
    prefetch: dict[str, str] | None = Field(
        default=None,
        description="replace the prefetch templates (key -> FHIR query with {{context.patientId}}); unset: the "
        "built-in ones (docs/cds-hooks.md)",
    )
    validate_resources: bool = Field(
        default=True, description="validate prefetched resources against the FHIR R4 models (invalid ones are dropped and counted on the card)"
    )
    log_patient_data: bool = Field(
        default=False, description="DEBUG ONLY: log patient ids and categories; off, logs carry no patient data"
    )
    source_label: str = Field(default="fhir-aibl: AIBL bone health", min_length=1, description="the cards' source.label")
    source_url: str | None = Field(default=None, description="a page about this service, shown as the card source link")
    links: list[Link] = Field(default_factory=lambda: list(DEFAULT_LINKS), description="guideline links on every card")
    override_reasons: list[Coding] = Field(
        default_factory=lambda: list(DEFAULT_OVERRIDE_REASONS), description="reasons offered when a card is overridden"
    )
    jwt: JwtSettings = Field(default_factory=JwtSettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    smart: SmartSettings = Field(default_factory=SmartSettings, description="the bone-health view as a SMART app (docs/view.md)")

    @property
    def state_path(self) -> Path:
        """The state directory in effect (see `state_dir`)."""
        if self.state_dir is not None:
            return self.state_dir
        systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(systemd) if systemd else platformdirs.user_state_path("fhir-aibl")

    @property
    def database_path(self) -> Path:
        """The SQLite database in effect: `feedback.database`, else cds.sqlite3 in the state directory."""
        return self.feedback.database if self.feedback.database is not None else self.state_path / "cds.sqlite3"

    @field_validator("public_base_url")
    @classmethod
    def _base(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, "public_base_url")

    @field_validator("source_url")
    @classmethod
    def _source(cls, value: str | None) -> str | None:
        return None if value is None else _check_url(value, "source_url")

    @model_validator(mode="after")
    def _consistent(self) -> "Settings":
        if self.patient_view_id == self.order_select_id:
            raise ValueError("patient_view_id and order_select_id must differ")
        if self.fhir.budget_seconds >= self.request_deadline_seconds:
            raise ValueError("fhir.budget_seconds must be below request_deadline_seconds")
        return self


def _resolve(data: dict, base: Path) -> dict:
    """Make the relative paths of a configuration file relative to the file's folder."""

    def fix(value):
        if value is None:
            return None
        path = Path(value)
        return str(path if path.is_absolute() else (base / path))

    data = dict(data)
    for key in ("rules", "catalogue", "safety", "state_dir"):
        if key in data:
            data[key] = fix(data[key])
    if isinstance(data.get("feedback"), dict) and "database" in data["feedback"]:
        data["feedback"] = {**data["feedback"], "database": fix(data["feedback"]["database"])}
    jwt = data.get("jwt")
    if isinstance(jwt, dict) and isinstance(jwt.get("issuers"), list):
        issuers = []
        for item in jwt["issuers"]:
            if isinstance(item, dict) and item.get("jwks_file"):
                item = {**item, "jwks_file": fix(item["jwks_file"])}
            issuers.append(item)
        data["jwt"] = {**jwt, "issuers": issuers}
    return data


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())


ENV_PREFIX = "FHIR_AIBL_"


def environment_settings(environ: dict[str, str] | None = None) -> dict:
    """The settings given as FHIR_AIBL_... environment variables (nested: `__`), unvalidated."""
    source = EnvSettingsSource(
        Settings,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        case_sensitive=False,
        env_parse_none_str="null",
        env_ignore_empty=True,  # `FHIR_AIBL_X=` (as env files often have) means unset
    )
    if environ is not None:
        source.env_vars = {k.lower(): v for k, v in environ.items() if v != ""}
    try:
        return source()
    except Exception as exc:  # pydantic-settings' SettingsError: a value that should be JSON is not
        raise SettingsError(f"invalid environment variable: {exc}", source="environment") from exc


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_settings(
    path: str | Path | None = None, *, environ: dict[str, str] | None = None, use_environment: bool = True, **overrides
) -> Settings:
    """Settings from a YAML (.yaml/.yml) or JSON file, the FHIR_AIBL_... environment variables
    over it (`environ`, default os.environ; `use_environment=False` ignores them), then
    `overrides` on top. No file: the defaults."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"cannot read configuration: {exc.strerror or exc}", source=str(path)) from exc
        try:
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise SettingsError(f"not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}", source=str(path)) from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise SettingsError("a configuration file is a mapping of setting names to values", source=str(path))
        data = _resolve(loaded, path.resolve().parent)
    if use_environment:
        data = _merge(data, environment_settings(environ))
    data.update(overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        where = " and ".join(filter(None, [str(path) if path else None, "FHIR_AIBL_* variables" if use_environment and environment_settings(environ) else None]))
        raise SettingsError(f"invalid configuration: {_problems(exc)}", source=where or None) from exc


def settings_for_tests(directory: str | Path, **overrides) -> Settings:
    """Settings for tests and benchmarks: the defaults, the feedback database in `directory`.

    Keyword arguments replace top-level settings; nested ones take dicts or models
    (`jwt={"issuers": [...]}`). Nothing here relaxes security: pass `allow_unsigned=True`
    to skip JWT checks.
    """
    data = {"feedback": {"database": str(Path(directory) / "cds-feedback.sqlite3")}}
    for key, value in overrides.items():
        if key == "feedback" and isinstance(value, dict):
            data["feedback"] = {**data["feedback"], **value}
        else:
            data[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SettingsError(f"invalid settings: {_problems(exc)}") from exc
