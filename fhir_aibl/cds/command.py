"""`fhir-aibl serve`: run the CDS Hooks service on uvicorn, with one or several worker processes.

    fhir-aibl serve [--host 127.0.0.1] [--port 8080] [--workers N] [--config FILE] [--rules DIR-or-FILE]
                    [--log-level info] [--log-format text|json] [--graceful-timeout 30]
                    [--allow-unsigned]

Every flag also reads an environment variable (`FHIR_AIBL_HOST`, `FHIR_AIBL_PORT`,
`FHIR_AIBL_WORKERS`, `FHIR_AIBL_CONFIG`, `FHIR_AIBL_LOG_LEVEL`, `FHIR_AIBL_LOG_FORMAT`,
`FHIR_AIBL_GRACEFUL_TIMEOUT`); a flag given on the command line wins. The settings
themselves come from the file and `FHIR_AIBL_...` variables (settings.py).

Several workers (`--workers`, default: the number of CPU cores this process may use) share
one port: uvicorn's supervisor forks them, restarts one that dies, and on SIGHUP replaces
them one by one, each new worker serving only once it has loaded the rules (a rules upgrade
without downtime). They share the SQLite database (feedback, suppression, the JWT replay
cache), and their metrics are summed through `PROMETHEUS_MULTIPROC_DIR` (a fresh temporary
folder unless the variable is already set).

SIGTERM or SIGINT stops gracefully: no new connection is accepted, calls in progress get
`--graceful-timeout` seconds to finish, a connection accepted whose request has not been read yet
gets a second to send it (draining.py), then the pools and the database are closed.

Exit status: 0 after a clean shutdown; 2 when the service cannot start (a configuration
that does not load or validate, rules that do not load, a database that cannot be opened,
a port in use).
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from ..errors import AiblError
from ..resources import RULES_HELP
from .app import UNSIGNED_WARNING, create_app
from .metrics import MULTIPROC_ENV
from .settings import ENV_PREFIX, Settings, load_settings

log = logging.getLogger("fhir_aibl.cds")

#: The validated settings, as JSON, handed from `serve` to its worker processes.
WORKER_SETTINGS_ENV = "_FHIR_AIBL_SERVE_SETTINGS"
LOG_LEVELS = ("debug", "info", "warning", "error")
#: How long the supervisor waits for a worker's answer to its health ping, and for a new worker
#: (SIGHUP) to have loaded the rules and be serving.
WORKER_HEALTHCHECK_SECONDS = 60


def _env(name: str, default: str) -> str:
    """FHIR_AIBL_<name>, or `default` when unset or empty."""
    return os.environ.get(ENV_PREFIX + name) or default


def default_workers() -> int:
    """The number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host", default=_env("HOST", "127.0.0.1"), help="address to listen on (FHIR_AIBL_HOST; default: 127.0.0.1, this machine only)"
    )
    parser.add_argument("--port", type=int, default=_env("PORT", "8080"), help="port to listen on (FHIR_AIBL_PORT; default: 8080)")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=_env("WORKERS", str(default_workers())),
        metavar="N",
        help=f"worker processes behind the one port (FHIR_AIBL_WORKERS; default: the number of CPU cores, here {default_workers()})",
    )
    config = _env("CONFIG", "")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(config) if config else None,
        metavar="FILE",
        help="settings file, YAML or JSON (FHIR_AIBL_CONFIG; default: built-in defaults and FHIR_AIBL_... variables)",
    )
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept requests without a valid JWT: LOCAL DEVELOPMENT ONLY",
    )
    parser.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE",
                        help=RULES_HELP.replace(" (default:", "; it overrides the settings file's `rules` (default:"))
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "info"), choices=LOG_LEVELS, help="lowest level of log messages written to stderr (FHIR_AIBL_LOG_LEVEL; default: info)")
    parser.add_argument(
        "--log-format",
        default=_env("LOG_FORMAT", "text"),
        choices=("text", "json"),
        help="text, or json: one JSON object per line, for log collectors; never with patient data (FHIR_AIBL_LOG_FORMAT; default: text)",
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=_env("GRACEFUL_TIMEOUT", "30"),
        metavar="SECONDS",
        help="on SIGTERM, how long calls in progress may take to finish (FHIR_AIBL_GRACEFUL_TIMEOUT; default: 30)",
    )


def log_config(level: str, fmt: str) -> dict:
    """logging.config.dictConfig for this process, uvicorn's loggers and every worker's."""
    formatter = (
        {"()": "fhir_aibl.cds.logs.JsonFormatter"}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["default"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level.upper()}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def _banner(text: str) -> None:
    line = "!" * 78
    print(f"{line}\n{text}\n{line}", file=sys.stderr)


def worker_app():
    """The app of one worker process (uvicorn's factory), from the settings `run` validated."""
    settings = Settings.model_validate_json(os.environ[WORKER_SETTINGS_ENV])
    return create_app(settings)


def run(args: argparse.Namespace, *, serve=None) -> int:
    """Load the settings, build the app and serve it until stopped.

    The app is built here in any case, so that a configuration, rules or a database that do not
    load stop the command with exit 2 before anything listens. With one worker it is the app
    served; with several, each worker builds its own from the same validated settings.
    `serve` replaces `uvicorn.run` (tests check what would be served without opening a port).
    """
    logging.config.dictConfig(log_config(args.log_level, args.log_format))
    try:
        overrides = {"allow_unsigned": True} if args.allow_unsigned else {}
        if getattr(args, "rules", None) is not None:
            overrides["rules"] = args.rules
        settings = load_settings(args.config, **overrides)
        if args.log_format == "json" and settings.log_patient_data:
            raise AiblError("log_patient_data is for debugging on a developer's machine: it cannot be combined with --log-format json")
        app = create_app(settings)
    except AiblError as exc:
        print(f"fatal: {exc}", file=sys.stderr)
        return 2
    if settings.allow_unsigned:
        _banner(UNSIGNED_WARNING)
    if not settings.jwt.issuers and not settings.allow_unsigned:
        log.warning("no trusted issuer is configured (jwt.issuers): every hook request will be refused with 401")
    log.info("state database: %s", settings.database_path)
    if serve is None:
        import uvicorn

        serve = uvicorn.run
    from .draining import DrainingH11Protocol  # uvicorn's, imported only to serve
    options = {
        "host": args.host,
        "port": args.port,
        "log_level": args.log_level,
        "log_config": log_config(args.log_level, args.log_format),
        "server_header": False,
        # X-Forwarded-For/-Proto only from the proxies named in trusted_proxies (none by default)
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": ",".join(settings.trusted_proxies) or None,
        "timeout_graceful_shutdown": args.graceful_timeout,
        # a stopping worker still answers a connection it accepted whose request was not read yet
        "http": DrainingH11Protocol,
    }
    saved = {name: os.environ.get(name) for name in (WORKER_SETTINGS_ENV, MULTIPROC_ENV)}
    metrics_dir: str | None = None
    # uvicorn stops gracefully on SIGTERM, then raises the signal again once its own handler is
    # removed: this handler turns that into the clean exit 0 (one worker; the supervisor of
    # several exits 0 by itself).
    previous_sigterm = signal.signal(signal.SIGTERM, _terminated)
    try:
        if args.workers == 1:
            serve(app, **options)
        else:
            app.state.cds.close()  # each worker opens its own
            os.environ[WORKER_SETTINGS_ENV] = settings.model_dump_json()
            metrics_dir = _metrics_dir()
            # A worker loading the rules (or busy) may take more than uvicorn's 5 s to answer the
            # supervisor's ping: it would be killed as hung, and a SIGHUP upgrade aborted.
            serve(
                "fhir_aibl.cds.command:worker_app",
                factory=True,
                workers=args.workers,
                timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
                **options,
            )
    except OSError as exc:  # the port is in use, the address is not ours
        print(f"fatal: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # uvicorn stops with sys.exit when it cannot bind or start
        if exc.code not in (0, None):
            print(f"fatal: the service did not start on {args.host}:{args.port} (see the log above)", file=sys.stderr)
            return 2
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if metrics_dir is not None and saved[MULTIPROC_ENV] is None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


class _Terminated(Exception):
    """SIGTERM after (or before) serving: the stop asked for."""


def _terminated(signum, frame) -> None:
    raise _Terminated


def _metrics_dir() -> str:
    """PROMETHEUS_MULTIPROC_DIR for the workers: the operator's (emptied), or a fresh temporary one."""
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        Path(given).mkdir(parents=True, exist_ok=True)
        for stale in Path(given).glob("*.db"):  # counters of a previous run would be summed in
            stale.unlink()
        return given
    path = tempfile.mkdtemp(prefix="fhir-aibl-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m fhir_aibl.cds.command`
    parser = argparse.ArgumentParser(prog="fhir-aibl serve", description="Serve AIBL decision support as a CDS Hooks 2.0 service")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
