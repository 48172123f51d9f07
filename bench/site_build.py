"""The feature browser at scale: synthetic atlases of 2^16, 2^18 and 2^20 features, built and opened.

For each width: writes a synthetic atlas (``tests/synthetic_atlas.py``: 20 top contexts + 4 x 4
quantile samples of 25 tokens per feature, 10 logit tokens each way, 10 neighbours, a map; theme
words from a 49,152-word vocabulary, like SmolLM2's), then in a child process (so its peak
resident memory is its own) builds the site with ``analysis.site.build_site``. Prints build time,
site bytes per feature (and the atlas tables' beside it), file count and peak memory; then in
headless Chromium, from disk: the time to open a feature page (from the last chunk) and to run a
search (by token), and the bytes that search loaded (its shard plus the summary files of the
results page). Targets at 2^20: build <= 10 min, <= 4 KB per feature, <= 2,000 files, a page and
a search each <= 500 ms.

Usage: python bench/site_build.py [--features 65536,262144,1048576] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THEMES = 49152


def folder_size(folder: Path, pattern: str = "*") -> tuple[int, int]:
    files = [path for path in folder.rglob(pattern) if path.is_file()]
    return len(files), sum(path.stat().st_size for path in files)


def build_in_child(folder: Path) -> dict:
    """Build the site in a fresh interpreter; its wall time and peak resident memory."""
    code = ("import json, resource, sys, time\n"
            "from lexica.analysis.site import build_site\n"
            "started = time.perf_counter()\n"
            f"build_site({str(folder)!r})\n"
            "print(json.dumps({'seconds': time.perf_counter() - started,\n"
            "                  'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(result.stdout.strip().splitlines()[-1])


def browser_timings(site: Path, features: int, theme: str) -> dict:
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("LEXICA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            feature = features - 7
            page.goto(site.as_uri() + "/index.html")  # a first load, so the timings below are not cold-start
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            started = time.perf_counter()
            page.goto(f"{site.as_uri()}/feature.html#{feature}")
            page.wait_for_selector("body[data-ready='1'] h1", timeout=60_000)
            page_seconds = time.perf_counter() - started
            page.goto(site.as_uri() + "/index.html")
            page.wait_for_selector("body[data-ready='1']", timeout=60_000)
            started = time.perf_counter()
            page.fill("#search", theme)
            page.wait_for_selector(f"body[data-query='{theme}']", timeout=60_000)
            search_seconds = time.perf_counter() - started - 0.15  # less the typing pause before a search
            shown = [int(value) for value in page.eval_on_selector_all(
                "#features tbody tr", "rows => rows.map(r => r.dataset.feature)")]
        finally:
            browser.close()
    from lexica.analysis.site import FEATURES_PER_SUMMARY
    from lexica.analysis.site_data import read_data_file
    from lexica.analysis.site_search import shard_of

    summaries = {feature // FEATURES_PER_SUMMARY for feature in shown}
    _, meta = read_data_file((site / "data" / "meta.js").read_text())
    shard = site / "data" / "search" / f"{shard_of(theme, meta['search_shards'])}.js"
    loaded = shard.stat().st_size + sum((site / "data" / "summaries" / f"{block}.js").stat().st_size
                                        for block in summaries)
    return {"page_ms": page_seconds * 1000, "search_ms": search_seconds * 1000, "search_mb": loaded / 2**20,
            "results": len(shown)}


def main(argv: list[str] | None = None) -> int:
    # Run as a script from anywhere: the package and the tests' synthetic atlas come from this checkout.
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from synthetic_atlas import theme_word, write_synthetic_atlas

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", default="65536,262144,1048576", help="comma-separated widths")
    parser.add_argument("--keep", type=Path, default=None, help="build under this folder and keep it")
    args = parser.parse_args(argv)

    rows = []
    for features in (int(value) for value in args.features.split(",")):
        parent = args.keep or Path(tempfile.mkdtemp(prefix="lexica-site-bench-"))
        folder = parent / f"atlas-{features}"
        try:
            started = time.perf_counter()
            write_synthetic_atlas(str(folder), features=features, contexts_per_feature=36, tokens_per_context=25,
                                  themes=THEMES, payloads=False)
            written = time.perf_counter() - started
            build = build_in_child(folder)
            files, size = folder_size(folder / "site")
            _, tables = folder_size(folder, "*.parquet")
            timings = browser_timings(folder / "site", features, theme_word(1234))
            rows.append((features, written, build, files, size, tables, timings))
            print(f"{features:,} features: synthetic tables {written:.0f} s, site {build['seconds']:.0f} s", flush=True)
        finally:
            if args.keep is None:
                shutil.rmtree(parent, ignore_errors=True)
    print("| features | build s | peak MB | files | site B/feature | tables B/feature | page ms | search ms | "
          "search MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for features, _, build, files, size, tables, timings in rows:
        browser = (f"{timings['page_ms']:.0f} | {timings['search_ms']:.0f} | {timings['search_mb']:.2f}" if timings
                   else "no Chromium | | ")
        print(f"| {features:,} | {build['seconds']:.0f} | {build['peak_mb']:,.0f} | {files:,} | "
              f"{size / features:,.0f} | {tables / features:,.0f} | {browser} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
