"""Screenshots of the served browser talking to the run's model: test your text, and steering.

Serves ``<run>/analysis/<dictionary>/site`` with the run's model (as ``lexica browse`` does), then
in headless Chromium types TEXT into *test your text* with FEATURE highlighted, and steers FEATURE
at VALUE from its page, writing ``OUT_DIR/browser-test-your-text.png`` and
``OUT_DIR/browser-steer.png``.

Usage: python scripts/screenshot_live.py RUN OUT_DIR --feature N [--text T] [--prompt P] [--value 3x]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from screenshot_site import find_chromium

from lexica.analysis import browse
from lexica.analysis.live import LiveLimits, LiveModel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dictionary", default=None)
    parser.add_argument("--feature", type=int, required=True)
    parser.add_argument("--text", default="Madam Speaker, the state of our union is strong, and America is ready.")
    parser.add_argument("--prompt", default="My fellow Americans,")
    parser.add_argument("--value", default="3x")
    parser.add_argument("--tokens", type=int, default=24)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        print("error: no Chromium found; set LEXICA_CHROMIUM or install it (make browser)", file=sys.stderr)
        return 2
    live = LiveModel(args.run, args.dictionary, "cpu", LiveLimits(max_new_tokens=max(64, args.tokens)))
    site, _ = browse.resolve_site(args.run, args.dictionary)
    server, url = browse.serve(site, live=live)
    base = url.removesuffix("index.html")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 760})
            page.goto(base + "index.html")
            page.wait_for_selector("#live-text:not([hidden])", timeout=30_000)
            page.fill("#text", args.text)
            page.fill("#watch", str(args.feature))
            page.click("#analyse")
            page.wait_for_selector("body[data-text='done']", timeout=120_000)
            fired = page.locator("#text-tokens span.fires")
            (fired.first if fired.count() else page.locator("#text-tokens span").first).click()
            page.locator("#live-text").screenshot(path=str(args.out_dir / "browser-test-your-text.png"))
            page.goto(f"{base}feature.html#{args.feature}")
            page.wait_for_selector("#steer-run", timeout=30_000)
            page.fill("#steer-prompt", args.prompt)
            page.fill("#steer-value", args.value)
            page.fill("#steer-tokens", str(args.tokens))
            page.click("#steer-run")
            page.wait_for_selector("body[data-steer='done']", timeout=300_000)
            page.locator("section", has_text="Steer").last.screenshot(path=str(args.out_dir / "browser-steer.png"))
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    print(args.out_dir / "browser-test-your-text.png", args.out_dir / "browser-steer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
