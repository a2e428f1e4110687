#!/usr/bin/env python3
"""Render the cards of one CDS Hooks answer as a clinician sees them, and screenshot the page.

    python scripts/render_card.py [--case V06] [--hook patient-view] [--out docs/card.png]
                                  [--html out/card.html] [--width 760] [--height 840]

What it does: builds the patient-view request of a fixture record (`fixtures/bundles/<case>.json`,
full prefetch, reference date 2026-06-01 so that the picture is reproducible), sends it to
the service in process (no port, no network), renders the answer's cards into one HTML page
laid out like an EHR's CDS card panel (indicator colour, summary, source, the Markdown detail,
suggestion buttons, links, the override reasons), then takes a screenshot with headless
Chromium (Debian: `apt-get install chromium`).

Needs `markdown-it-py` to render the cards' Markdown (`pip install markdown-it-py`); the
service itself does not. Chromium runs offline: the page has no external resources.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fhir_aibl.cds import create_app, patient_view_request, settings_for_tests  # noqa: E402

COLOURS = {"info": "#1f6feb", "warning": "#d4a72c", "critical": "#cf222e"}
CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; margin: 0; background: #f3f4f6; color: #1f2328; }
header { background: #24292f; color: #fff; padding: 10px 18px; font-size: 13px; }
header b { font-size: 15px; }
main { padding: 14px 18px; }
.card { background: #fff; border: 1px solid #d0d7de; border-left: 6px solid var(--c); border-radius: 6px; margin: 0 0 14px; padding: 12px 16px; box-shadow: 0 1px 2px rgba(0,0,0,.06); }
.top { display: flex; gap: 10px; align-items: baseline; }
.badge { background: var(--c); color: #fff; font-size: 11px; font-weight: 700; text-transform: uppercase; padding: 1px 7px; border-radius: 10px; }
.summary { font-weight: 700; font-size: 15px; }
.source { color: #57606a; font-size: 12px; margin: 2px 0 8px; }
.detail { border-top: 1px solid #eaeef2; padding-top: 6px; }
.detail p { margin: 6px 0; } .detail ul { margin: 4px 0 8px; padding-left: 20px; } .detail li { margin: 3px 0; }
.detail code { background: #eff1f3; padding: 0 3px; border-radius: 3px; font-size: 12px; }
.suggestions { margin-top: 10px; display: flex; flex-wrap: wrap; gap: 8px; }
.suggestions button { border: 1px solid #1f883d; background: #1f883d; color: #fff; border-radius: 6px; padding: 5px 10px; font-size: 13px; }
.suggestions button.alt { background: #fff; color: #1f883d; }
.links { margin-top: 8px; font-size: 12px; } .links a { color: #0969da; margin-right: 12px; }
.dismiss { margin-top: 8px; font-size: 12px; color: #57606a; }
.dismiss select { font-size: 12px; }
"""


def _markdown(text: str) -> str:
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - a clear message instead of a traceback
        sys.exit("render_card.py needs markdown-it-py: pip install markdown-it-py")
    # CDS Hooks cards carry GitHub-flavoured Markdown; raw HTML in it is not rendered.
    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"]).render(text)


def card_html(card: dict) -> str:
    colour = COLOURS.get(card.get("indicator", "info"), COLOURS["info"])
    parts = [f'<section class="card" style="--c:{colour}">']
    parts.append(
        f'<div class="top"><span class="badge">{html.escape(card.get("indicator", "info"))}</span>'
        f'<span class="summary">{html.escape(card["summary"])}</span></div>'
    )
    source = card["source"]
    label = html.escape(source["label"])
    if source.get("url"):
        label = f'<a href="{html.escape(source["url"])}">{label}</a>'
    parts.append(f'<div class="source">Source: {label}</div>')
    if card.get("detail"):
        parts.append(f'<div class="detail">{_markdown(card["detail"])}</div>')
    if card.get("suggestions"):
        buttons = [
            f'<button class="{"" if s.get("isRecommended") else "alt"}">{html.escape(s["label"])}</button>'
            for s in card["suggestions"]
        ]
        parts.append(f'<div class="suggestions">{"".join(buttons)}</div>')
    if card.get("links"):
        links = [f'<a href="{html.escape(link["url"])}">{html.escape(link["label"])}</a>' for link in card["links"]]
        parts.append(f'<div class="links">{"".join(links)}</div>')
    if card.get("overrideReasons"):
        options = "".join(f"<option>{html.escape(r['display'])}</option>" for r in card["overrideReasons"])
        parts.append(f'<div class="dismiss">Dismiss with reason: <select>{options}</select></div>')
    parts.append("</section>")
    return "".join(parts)


def page(cards: list[dict], title: str) -> str:
    body = "".join(card_html(c) for c in cards) or "<p>No cards.</p>"
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head><body><header><b>{html.escape(title)}</b></header><main>{body}</main></body></html>"
    )


def answer(case: str) -> tuple[list[dict], str]:
    import httpx

    record = json.loads((ROOT / "fixtures" / "bundles" / f"{case}.json").read_text())
    request = patient_view_request(record)
    with tempfile.TemporaryDirectory() as tmp:
        app = create_app(settings_for_tests(tmp, allow_unsigned=True, as_of="2026-06-01"))

        async def call():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://render") as client:
                return await client.post("/cds-services/aibl-patient-view", json=request)

        try:
            response = asyncio.run(call())
        finally:
            app.state.cds.close()
    response.raise_for_status()
    patient = request["prefetch"]["patient"]
    name = " ".join(patient.get("name", [{}])[0].get("given", []) + [patient.get("name", [{}])[0].get("family", "")]).strip()
    title = f"{name or request['context']['patientId']} · {patient.get('gender', '')}, born {patient.get('birthDate', '?')} · CDS Hooks patient-view"
    return response.json()["cards"], title


def screenshot(html_path: Path, png: Path, width: int, height: int, chromium: str) -> None:
    exe = shutil.which(chromium)
    if exe is None:
        sys.exit(f"{chromium} not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            f"--window-size={width},{height}",
            html_path.resolve().as_uri(),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="V06", help="fixture record (default: V06, high risk)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "card.png")
    parser.add_argument("--html", type=Path, default=ROOT / "out" / "card.html")
    parser.add_argument("--width", type=int, default=760, help="about the 724 px card column of the CDS Hooks Sandbox, plus margins")
    parser.add_argument("--height", type=int, default=840)
    parser.add_argument("--chromium", default="chromium")
    args = parser.parse_args(argv)
    cards, title = answer(args.case)
    args.html.parent.mkdir(parents=True, exist_ok=True)
    args.html.write_text(page(cards, title), encoding="utf-8")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(args.html, args.out, args.width, args.height, args.chromium)
    print(f"{len(cards)} card(s) of {args.case}: {args.html} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
