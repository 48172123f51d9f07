"""Screenshot one page of a built feature-atlas site with headless Chromium (for demos and reviews).

Usage: python scripts/screenshot_site.py SITE_DIR OUT.png [--page index|feature|map|concepts] [--feature N]
Chromium is found as LEXICA_CHROMIUM, else `chromium` / `chromium-browser` / `google-chrome` on PATH.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    configured = os.environ.get("LEXICA_CHROMIUM")
    if configured:
        return configured
    return next((found for name in BROWSER_NAMES if (found := shutil.which(name))), None)


def screenshot(site_dir: Path, out: Path, page: str = "index", feature: int | None = None,
               width: int = 1280, height: int = 900, full_page: bool = False) -> Path:
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no Chromium found; set LEXICA_CHROMIUM or install it (make browser)")
    target = site_dir / f"{page}.html"
    if not target.exists():
        raise FileNotFoundError(f"{target} does not exist (is {site_dir} a built site folder?)")
    url = target.resolve().as_uri() + (f"#{feature or 0}" if page == "feature" else "")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            view = browser.new_page(viewport={"width": width, "height": height})
            view.goto(url)
            view.wait_for_selector("body[data-ready='1']", timeout=15_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            view.screenshot(path=str(out), full_page=full_page)
        finally:
            browser.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site_dir", type=Path, help="the site folder (<run>/analysis/<dictionary>/site)")
    parser.add_argument("out", type=Path, help="PNG file to write")
    parser.add_argument("--page", choices=("index", "feature", "map", "concepts"), default="index")
    parser.add_argument("--feature", type=int, default=None, help="feature id for --page feature (default: first)")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full-page", action="store_true", help="capture the whole scrollable page")
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.site_dir, args.out, args.page, args.feature, args.width, args.height, args.full_page)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
