#!/usr/bin/env python3
"""Screenshot the population report of the synthetic population (docs/report.png), as docs/report.md shows it.

    python scripts/report_screenshot.py [--patients 1000] [--seed 1] [--out docs/report.png] [--width 900]
                                        [--height 2700] [--html out/report.html]

Writes the synthetic population (`fhir-aibl synth`, reference date 2026-06-01, so that the
picture is reproducible), assesses it with `fhir-aibl assess --report` exactly as a user would,
and takes a screenshot of the top of the page (`--height` pixels; 0 for the whole page) with
Playwright driving Debian's Chromium (`apt-get install chromium`; no browser is downloaded).
The page loads nothing from elsewhere, so the browser runs offline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from fhir_aibl.cli import main as fhir_aibl  # noqa: E402
from tests.browser import ARGS, CHROMIUM  # noqa: E402

AS_OF = "2026-06-01"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report.png")
    parser.add_argument("--width", type=int, default=900)
    parser.add_argument("--height", type=int, default=2700, help="pixels from the top; 0: the whole page")
    parser.add_argument("--html", type=Path, default=None, help="also keep the report's HTML here")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        folder, report = Path(tmp) / "population", Path(tmp) / "report.html"
        quiet = io.StringIO()
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            code = fhir_aibl(["synth", "--patients", str(args.patients), "--seed", str(args.seed), "--out", str(folder)])
            if code == 0:
                code = fhir_aibl(["assess", str(folder), "--as-of", AS_OF, "--format", "json", "--report", str(report)])
        if code != 0:
            print(quiet.getvalue(), file=sys.stderr)
            return 1
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height or 1000})
            page.goto(report.as_uri())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=not args.height)
            browser.close()
        if args.html is not None:
            args.html.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report, args.html)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
