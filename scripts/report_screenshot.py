"""Screenshot a `toolchain report` HTML file in headless Chromium (Debian's /usr/bin/chromium, driven by playwright):
the figures of BENCHMARKS.md. Prints the charts it found and fails on a console error or a network request.

    python scripts/report_screenshot.py report.html docs/figures/report-demo.png [--width 1300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1300)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": args.width, "height": 900})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: r.url.startswith("file:") or requests.append(r.url))
        page.goto(args.html.resolve().as_uri())
        charts = page.evaluate("""() => [...document.querySelectorAll("svg.chart")].map(
            s => ({id: s.id, bars: s.querySelectorAll("rect.bar").length}))""")
        args.png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.png), full_page=True)
        browser.close()
    print(json.dumps({"charts": charts, "console_errors": errors, "requests": requests}, indent=2))
    return 1 if errors or requests else 0


if __name__ == "__main__":
    sys.exit(main())
