#!/usr/bin/env python3
"""Screenshot the bone-health view of one worked example (docs/view.png), as docs/view.md shows it.

    python scripts/view_screenshot.py [--case V43] [--history] [--out docs/view.png] [--width 900]

Assesses `fixtures/bundles/<case>.json` on the worked examples' reference date (2026-06-01, so
the picture is reproducible), renders the page exactly as `fhir-aibl assess --format html` and
the SMART app do, and takes a full-page screenshot with Playwright driving Debian's Chromium
(`apt-get install chromium`; no browser is downloaded). `--history` adds two earlier lumbar-spine
scans and a Z-score (the test suite's DXA history) so the chart shows a trend. The page loads
nothing from elsewhere, so the browser runs offline.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import sync_playwright  # noqa: E402

from fhir_aibl.assess import Assessor  # noqa: E402
from fhir_aibl.sources import iter_records  # noqa: E402
from fhir_aibl.view.site import write_site  # noqa: E402
from tests.browser import ARGS, CHROMIUM  # noqa: E402
from tests.view_helpers import with_history  # noqa: E402

AS_OF = dt.date(2026, 6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="V43")
    parser.add_argument("--history", action="store_true", help="add earlier DXA scans to the record")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "view.png")
    parser.add_argument("--width", type=int, default=900)
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        source = ROOT / "fixtures" / "bundles" / f"{args.case}.json"
        if args.history:
            source = Path(tmp) / f"{args.case}.json"
            source.write_text(json.dumps(with_history(args.case)))
        assessor = Assessor()
        problems: list = []
        pages = write_site(assessor, iter_records([source], terminology=assessor.terminology), AS_OF, Path(tmp) / "site", problems)
        if problems:
            print(f"cannot assess {source.name}: {problems[0]}", file=sys.stderr)
            return 1
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": 1000})
            page.goto(pages[0].as_uri())
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
