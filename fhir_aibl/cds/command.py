"""`fhir-aibl serve`: run the CDS Hooks service on uvicorn.

    fhir-aibl serve [--host 127.0.0.1] [--port 8080] [--config FILE] [--allow-unsigned]

Exit status: 0 after a clean shutdown; 2 when the service cannot start (a configuration
file that does not load or validate, rules that do not load, a port in use).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import AiblError
from ..resources import RULES_HELP
from .app import UNSIGNED_WARNING, create_app
from .settings import load_settings

log = logging.getLogger("fhir_aibl.cds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default: 8080)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="settings file, YAML or JSON (default: built-in defaults)")
    parser.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="accept requests without a valid JWT: LOCAL DEVELOPMENT ONLY",
    )
    parser.add_argument("--rules", type=Path, default=None, metavar="DIR-or-FILE",
                        help=RULES_HELP.replace(" (default:", "; it overrides the settings file's `rules` (default:"))
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="lowest level of log messages written to stderr (default: info)")


def _banner(text: str) -> None:
    line = "!" * 78
    print(f"{line}\n{text}\n{line}", file=sys.stderr)


def run(args: argparse.Namespace, *, serve=None) -> int:
    """Load the settings, build the app and serve it until interrupted.

    `serve` replaces `uvicorn.run` (tests check what would be served without opening a port).
    """
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = {"allow_unsigned": True} if args.allow_unsigned else {}
        if getattr(args, "rules", None) is not None:
            overrides["rules"] = args.rules
        settings = load_settings(args.config, **overrides)
        app = create_app(settings)
    except AiblError as exc:
        print(f"fatal: {exc}", file=sys.stderr)
        return 2
    if settings.allow_unsigned:
        _banner(UNSIGNED_WARNING)
    if not settings.jwt.issuers and not settings.allow_unsigned:
        log.warning("no trusted issuer is configured (jwt.issuers): every hook request will be refused with 401")
    if serve is None:
        import uvicorn

        serve = uvicorn.run
    try:
        serve(app, host=args.host, port=args.port, log_level=args.log_level, server_header=False)
    except OSError as exc:  # the port is in use, the address is not ours
        print(f"fatal: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - `python -m fhir_aibl.cds.command`
    parser = argparse.ArgumentParser(prog="fhir-aibl serve", description="Serve AIBL decision support as a CDS Hooks 2.0 service")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
