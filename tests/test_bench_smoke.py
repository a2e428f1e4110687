"""The benchmark suite runs end to end (bench/run.py --quick, tiny N), so that it cannot rot.

No time is asserted: the numbers depend on the machine. What is checked is that every
section ran (or says why it could not: `pending` when what it measures is not there) and
that the JSON holds what the README's table is built from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"engine", "assess", "cds", "connector", "drift", "population"}


def test_quick_bench_writes_every_section(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--sizes", "20",
         "--out", str(out), "--cache", str(tmp_path / "cache")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["quick"] is True
    assert {"cpus", "python"} <= set(results["machine"])
    sections = results["sections"]
    assert set(sections) == SECTIONS
    for name, section in sections.items():
        assert section["status"] in ("ok", "pending"), (name, section)
        assert "met" in section
        if section["status"] == "pending":
            assert section["reason"]
    # the sections that need nothing but the project always run
    engine, assess, drift = sections["engine"], sections["assess"], sections["drift"]
    assert engine["status"] == "ok" and engine["evaluations"] == 2000 and engine["evaluations_per_second"] > 0
    (run,) = assess["runs"]
    assert run["patients"] == 20
    for variant in ("shipped", "no-validation", "command"):
        assert run[variant]["seconds"] > 0 and run[variant]["peak_rss_mb"] > 0
    assert run["shipped"]["patients"] == 20 and run["shipped"]["problems"] == 0
    assert run["parse_floor"]["lines"] > 0 and run["resources"] >= run["parse_floor"]["lines"]
    assert drift["status"] == "ok" and drift["evaluations"] == 10_000 and "drift_mb" in drift
    if sections["cds"]["status"] == "ok":
        assert [r["rate"] for r in sections["cds"]["rates"]] == [100, 200]
        assert [run["workers"] for run in sections["cds"]["by_workers"]] == [1, 2]
        for run in sections["cds"]["by_workers"]:
            assert all({"p50_ms", "p99_ms", "max_ms", "errors"} <= set(r) for r in run["rates"])
            assert run["check"]["status"] == 200 and run["service_cpu_ms_per_request"] > 0
    if sections["connector"]["status"] == "ok":
        assert sections["connector"]["pull"]["round_trips_per_patient"] >= 1
        assert sections["connector"]["writeback"]["second_run"]["written"] == 0  # idempotent
    population = sections["population"]
    assert population["status"] == "ok"
    (run,) = population["runs"]
    assert run["patients"] == 20 and run["identical_output"] is True  # --workers 2 gives the bytes of one process
    assert run["one"]["command_cpu_s"] > 0 and run["fair_ratio"] is not None
    assert run["spark"]["status"] in ("ok", "not run", "error") and (run["spark"]["status"] == "ok" or run["spark"]["reason"])
    server = population["server"]
    assert server["status"] in ("ok", "pending")
    if server["status"] == "ok":
        for path in ("rest", "bulk"):
            assert server[path]["patients"] >= 1 and server[path]["requests"] >= 1
            assert server[path]["client_cpu_ms_per_patient"] > 0
        assert server["identical_results"] is True  # REST and Bulk assess a patient the same way
    # the table the README shows is in the JSON and on stdout
    assert results["table"].startswith("| section")
    assert results["table"] in proc.stdout


def test_one_section_alone_keeps_the_others_from_the_earlier_run(tmp_path):
    """`--only` runs one section; `--merge` keeps the rest; the table says which did not run."""
    out = tmp_path / "results.json"
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out), "--cache", str(tmp_path / "cache")]
    first = subprocess.run([*command, "--only", "engine"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    results = json.loads(out.read_text())
    assert results["sections"]["engine"]["status"] == "ok"
    assert results["sections"]["drift"] == {"status": "skipped", "reason": "not in --only", "met": None}
    assert "| drift " in results["table"] and "skipped" in results["table"]
    engine_run = results["sections"]["engine"]
    second = subprocess.run([*command, "--only", "drift", "--merge"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    merged = json.loads(out.read_text())
    assert merged["sections"]["drift"]["status"] == "ok" and merged["sections"]["drift"]["evaluations"] == 10_000
    assert merged["sections"]["engine"]["evaluations_per_second"] == engine_run["evaluations_per_second"]
    assert "evaluations/s, one core" in merged["table"] and "RSS drift" in merged["table"]
