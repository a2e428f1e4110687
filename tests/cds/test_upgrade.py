"""A rules upgrade without downtime: SIGHUP to `fhir-aibl serve --workers 2` replaces the workers
one by one with workers on the new rules while every call is answered, and new rules that do
not load leave the old workers serving."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fhir_aibl.cds.samples import patient_view_request

from ..conftest import ROOT
from .conftest import AS_OF, PV, bundle
from .serving import free_port, start, wait_ready

DEADLINE_SECONDS = 240


def _call(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", "Connection": "close"})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_sighup_upgrades_the_rules_worker_by_worker_and_refuses_rules_that_do_not_load(tmp_path):
    rules = tmp_path / "rules"
    shutil.copytree(ROOT / "rules", rules)
    port = free_port()
    config = tmp_path / "cds.yaml"
    config.write_text(f"as_of: {AS_OF}\nrules: rules/aibl.yaml\nstate_dir: state\n")
    proc, log = start(tmp_path, config, port, "--workers", "2", "--allow-unsigned")
    body = json.dumps(patient_view_request(bundle("V06"))).encode()
    answers: list[int] = []

    def hook() -> tuple[str, int]:
        status, headers, _ = _call(port, "POST", f"/cds-services/{PV}", body)
        answers.append(status)
        pid = json.loads(_call(port, "GET", "/health/live")[2])["pid"]
        return headers.get("x-fhir-aibl-ruleset", ""), pid

    def until(condition, what: str) -> None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not condition():
            if proc.poll() is not None:
                pytest.fail(f"the service stopped: {log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not happen: {log.read_text()[-3000:]}")
            time.sleep(0.05)

    try:
        wait_ready(proc, port, log)
        old_ruleset, _ = hook()
        old_pids = {hook()[1] for _ in range(40)}

        # a harmless change (a comment) changes the rules' content hash, hence the ruleset name
        (rules / "aibl.yaml").write_text((rules / "aibl.yaml").read_text() + "\n# upgraded\n")
        proc.send_signal(signal.SIGHUP)
        seen: list[tuple[str, int]] = []

        def upgraded() -> bool:
            seen.append(hook())
            recent = seen[-20:]
            return len(recent) == 20 and all(r != old_ruleset and p not in old_pids for r, p in recent)

        until(upgraded, "the upgrade")
        new_ruleset = seen[-1][0]
        assert new_ruleset and new_ruleset != old_ruleset
        assert set(answers) == {200}  # every call answered during the upgrade
        new_pids = {p for _, p in seen[-20:]}

        # rules that do not load: the new worker never serves, the old ones stay
        (rules / "aibl.yaml").write_text("rules: [this is not\n")
        proc.send_signal(signal.SIGHUP)
        until(lambda: (hook(), "aborting the restart" in log.read_text())[1], "the refusal of the broken rules")
        for _ in range(20):
            ruleset, pid = hook()
            assert ruleset == new_ruleset and pid in new_pids
        assert set(answers) == {200}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0


def test_the_upgrade_bench_runs_and_every_call_is_answered():
    """bench/upgrade.py (the measurement in docs/deployment.md), tiny: one upgrade under load."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "upgrade.py"), "--upgrades", "1", "--every", "10", "--clients", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    result = json.loads(done.stdout)
    assert result["failed"] == 0 and result["answered"] > 0 and result["upgrades"] == 1
