"""A real FHIR R4 server for integration tests: SEKMET (`sekmet-fhir` on PyPI, FastAPI + SQLite).

    from tests.fhir_server import sekmet_fixture, sekmet_server

    sekmet_base_url = sekmet_fixture()          # in a conftest.py: a session-scoped fixture

    def test_something(sekmet_base_url):        # "http://127.0.0.1:<port>/fhir"
        ...

    with sekmet_server(tmp_path) as base_url:   # or a server of your own, for one test
        ...

What it does, and why:

- SEKMET runs in a virtual environment of its own (`python -m venv` + `pip install
  sekmet-fhir==0.1.1`), never in the project's: its dependencies (typer, faker, lxml,
  pyjwt, ...) must not leak into what fhir-aibl is tested with. The venv is built once and
  cached in `.cache/sekmet-venv/` at the project root (git-ignored), guarded by a file
  lock so that parallel pytest processes build it once; a marker file records the pinned
  version, so a changed pin rebuilds it. Set `SEKMET_VENV` to use a venv elsewhere.
- Each server gets a config file with the keys SEKMET 0.1.1 reads (sekmet/config.py:
  `Settings`): `host: 127.0.0.1` (loopback only), a free `port`, `base_url`, a temporary
  `data_dir` (the SQLite database lives there) and `simulator: {enabled: false}` (the
  simulator would otherwise answer MedicationRequests and Tasks with resources of its
  own, which would change what the tests see). It runs with the config directory as its
  working directory and without inherited `SEKMET_*` variables, which override the file.
- It is ready when `GET [base]/metadata` answers 200, polled for at most
  `startup_timeout` seconds (60 by default); the process is terminated (then killed) at
  the end, and its log is kept beside the config for post-mortems.
- If the venv cannot be built or the server does not start, the fixture skips the tests
  with the reason, unless the environment variable `CI` is set (CI must prove the
  integration): then it fails them.

`seed` copies a data directory saved earlier (`data_dir_of`) into the new server, so
that a database loaded once can back several servers without loading it again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

SEKMET_SPEC = "sekmet-fhir==0.1.1"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".cache" / "sekmet-venv"
#: pip may need to fetch a dozen wheels on a fresh machine
VENV_BUILD_TIMEOUT = 900.0
STARTUP_TIMEOUT = 60.0


class SekmetUnavailable(RuntimeError):
    """The SEKMET venv could not be built or the server did not start."""


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / (name + (".exe" if os.name == "nt" else ""))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock, builds are rare
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sekmet_venv(venv: Path | None = None) -> Path:
    """The `sekmet` executable of a venv holding SEKMET_SPEC, built if needed."""
    venv = Path(os.environ.get("SEKMET_VENV") or venv or DEFAULT_VENV)
    marker = venv / ".fhir-aibl-installed"
    exe = _bin(venv, "sekmet")
    if marker.exists() and marker.read_text().strip() == SEKMET_SPEC and exe.exists():
        return exe
    with _file_lock(venv.parent / (venv.name + ".lock")):
        if marker.exists() and marker.read_text().strip() == SEKMET_SPEC and exe.exists():
            return exe  # another process built it while we waited
        shutil.rmtree(venv, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(_bin(venv, "python")), "-m", "pip", "install", "--disable-pip-version-check", "-q", SEKMET_SPEC],
        ]
        for cmd in steps:
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=VENV_BUILD_TIMEOUT, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise SekmetUnavailable(f"cannot build the SEKMET venv ({' '.join(cmd[-2:])}): {exc}") from exc
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                raise SekmetUnavailable(
                    f"cannot build the SEKMET venv: {' '.join(cmd[2:4])} exited {proc.returncode}: {' | '.join(tail)}"
                )
        if not exe.exists():
            raise SekmetUnavailable(f"{SEKMET_SPEC} installed but {exe} is missing")
        marker.write_text(SEKMET_SPEC + "\n")
    return exe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _config(port: int, data_dir: Path, extra: dict | None) -> str:
    import yaml

    config = {
        "host": "127.0.0.1",
        "port": port,
        "base_url": f"http://127.0.0.1:{port}/fhir",
        "data_dir": str(data_dir),
        "simulator": {"enabled": False},
        # the traffic log stores every request body in the database: not needed, and slow
        "log_inbound": False,
        **(extra or {}),
    }
    return yaml.safe_dump(config, sort_keys=False)


def _wait_ready(base_url: str, proc: subprocess.Popen, deadline: float) -> str | None:
    """None when ready, else why not."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"sekmet exited with status {proc.returncode} before answering"
        try:
            if requests.get(f"{base_url}/metadata", timeout=2).status_code == 200:
                return None
        except requests.RequestException:
            pass
        time.sleep(0.1)
    return "no answer from GET /metadata in time"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def sekmet_server(
    tmp_path: Path,
    *,
    seed: Path | None = None,
    extra_config: dict | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Iterator[str]:
    """Start SEKMET on 127.0.0.1 with its data in `tmp_path`; yield its FHIR base URL.

    Raises SekmetUnavailable when the venv cannot be built or the server does not start.
    """
    exe = sekmet_venv()
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEKMET_")}
    last_error = "not started"
    for _ in range(3):  # a free port can be taken between choosing it and binding it
        port = free_port()
        run_dir = tmp_path / f"sekmet-{port}"
        data_dir = run_dir / "data"
        run_dir.mkdir(parents=True)
        if seed is not None:
            shutil.copytree(seed, data_dir)
        config = run_dir / "sekmet.yaml"
        config.write_text(_config(port, data_dir, extra_config))
        base_url = f"http://127.0.0.1:{port}/fhir"
        log_path = run_dir / "sekmet.log"
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(
                    [str(exe), "serve", "--config", str(config)],
                    cwd=run_dir,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            except OSError as exc:
                raise SekmetUnavailable(f"cannot start sekmet: {exc}") from exc
            try:
                why = _wait_ready(base_url, proc, time.monotonic() + startup_timeout)
                if why is None:
                    yield base_url
                    return
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                last_error = f"{why}: {' | '.join(tail)}"
                if "address already in use" not in last_error.lower():
                    break
            finally:
                _stop(proc)
    raise SekmetUnavailable(f"SEKMET did not start: {last_error}")


def data_dir_of(base_url: str, tmp_path: Path) -> Path:
    """The data directory of the server at `base_url`, started by sekmet_server under `tmp_path`;
    pass it as `seed` to another server once this one has stopped."""
    port = base_url.rsplit(":", maxsplit=1)[-1].split("/", maxsplit=1)[0]
    return Path(tmp_path) / f"sekmet-{port}" / "data"


def unavailable(reason: str) -> None:
    """Skip (locally) or fail (on CI) a test that needs SEKMET."""
    message = f"SEKMET FHIR server unavailable: {reason}"
    if on_ci():
        pytest.fail(message + " (CI is set: the integration tests must run)", pytrace=False)
    pytest.skip(message)


def sekmet_fixture(scope: str = "session", **server_kwargs) -> Callable:
    """A pytest fixture (default session-scoped) yielding a running SEKMET's base URL.

    Assign it to a name in a conftest.py: `sekmet_base_url = sekmet_fixture()`.
    """

    @pytest.fixture(scope=scope)
    def _sekmet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
        stack = contextlib.ExitStack()
        try:
            base_url = stack.enter_context(sekmet_server(tmp_path_factory.mktemp("sekmet"), **server_kwargs))
        except SekmetUnavailable as exc:
            unavailable(str(exc))
        with stack:
            yield base_url

    return _sekmet
