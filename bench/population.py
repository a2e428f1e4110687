"""`assess --workers N` against one process on a synthetic population: wall time and CPU time of every process.

    python bench/population.py DIR [--workers 2] [--as-of 2026-06-01]

Runs `fhir-aibl assess DIR --format json` with --workers 1, then with --workers N, checks
that the two outputs are the same bytes, and prints one JSON object: wall seconds, and the
CPU seconds of every process of each run (the command, its forkserver and workers), read
from /proc while it runs.

Why CPU time too: on a machine shared with other work, wall time measures the neighbours.
The `fair` ratio is the one-process run's CPU time over the parallel run's critical path,
the command's own CPU time plus that of its busiest worker: what the wall-time ratio would
be with N idle cores (the workers run side by side, the command's own work does not
overlap theirs). Nothing here asserts a time: these are measurements.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[1]


def _peak_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def _cpu_by_pid() -> dict[int, tuple[int, float]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            out[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK)
    return out


def measure(argv: list[str], out: Path) -> dict:
    """Run argv, sampling the CPU time of it and its descendants; returns wall and per-process CPU."""
    start = time.perf_counter()
    with out.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.DEVNULL)
        seen: dict[int, float] = {}
        peak: dict[int, float] = {}
        while proc.poll() is None:
            table = _cpu_by_pid()
            tree = {proc.pid}
            grew = True
            while grew:
                grew = False
                for pid, (ppid, _cpu) in table.items():
                    if ppid in tree and pid not in tree:
                        tree.add(pid)
                        grew = True
            for pid in tree:
                peak[pid] = max(peak.get(pid, 0.0), _peak_mb(pid))
            for pid in tree - {proc.pid}:
                if pid in table:
                    seen[pid] = max(seen.get(pid, 0.0), table[pid][1])
            if proc.pid in table:
                seen[proc.pid] = max(seen.get(proc.pid, 0.0), table[proc.pid][1])
            time.sleep(0.2)
    wall = time.perf_counter() - start
    command = seen.pop(proc.pid, 0.0)
    workers = sorted((v for v in seen.values() if v > 0.05), reverse=True)
    return {
        "wall_s": round(wall, 1),
        "command_cpu_s": round(command, 1),
        "worker_cpu_s": [round(v, 1) for v in workers],
        "command_peak_mb": round(peak.pop(proc.pid, 0.0), 1),
        "worker_peak_mb": sorted((round(v, 1) for v in peak.values() if v > 1), reverse=True),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--as-of", default="2026-06-01")
    parser.add_argument("--keep", type=Path, default=None, help="keep the one-process output as this file (default: not kept)")
    args = parser.parse_args()
    exe = str(Path(sys.executable).parent / "fhir-aibl")
    base = [exe, "assess", str(args.data), "--as-of", args.as_of, "--format", "json"]
    with tempfile.TemporaryDirectory() as tmp:
        one = measure([*base, "--workers", "1"], Path(tmp) / "one.json")
        many = measure([*base, "--workers", str(args.workers)], Path(tmp) / "many.json")
        same = filecmp.cmp(Path(tmp) / "one.json", Path(tmp) / "many.json", shallow=False)
        if args.keep is not None:
            shutil.copyfile(Path(tmp) / "one.json", args.keep)
    serial_cpu = one["command_cpu_s"]
    critical = many["command_cpu_s"] + (many["worker_cpu_s"][0] if many["worker_cpu_s"] else 0.0)
    print(
        json.dumps(
            {
                "workers": args.workers,
                "one": one,
                "many": many,
                "identical_output": same,
                "wall_ratio": round(one["wall_s"] / many["wall_s"], 2),
                "fair_ratio": round(serial_cpu / critical, 2) if critical else None,
                "cpu_overhead": round((many["command_cpu_s"] + sum(many["worker_cpu_s"])) / serial_cpu, 2),
                "load_average": os.getloadavg(),
            }
        )
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
