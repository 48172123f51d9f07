"""The static feature browser: built from a synthetic atlas, then driven in headless Chromium.

Pages are opened from disk (file://) and, where marked, served by ``analysis.browse.serve``.
The atlas carries hostile corpus strings; they must show as literal text and never run.
Without Chromium the browser tests skip (``make browser`` installs it) unless
LEXICA_REQUIRE_BROWSER=1, which turns the skip into a failure.
"""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

import pytest
from synthetic_atlas import PAYLOADS, write_synthetic_atlas

from lexica.analysis import browse
from lexica.analysis.site import build_site, display_token, script_json
from lexica.cli import main as lexica_main

FEATURES = 150  # more than one index page (100 rows)
PAYLOAD_FEATURE = 1


def find_chromium() -> str | None:
    return os.environ.get("LEXICA_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def atlas_site(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("atlas")
    facts = write_synthetic_atlas(str(folder), features=FEATURES, contexts_per_feature=12, tokens_per_context=20)
    index = build_site(str(folder))
    assert Path(index) == folder / "site" / "index.html"
    return folder / "site", facts


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    required = os.environ.get("LEXICA_REQUIRE_BROWSER") == "1"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            pytest.fail("LEXICA_REQUIRE_BROWSER=1 but the playwright package is missing (make browser)")
        pytest.skip("playwright is not installed; `make browser` sets up the browser tests")
    if chromium is None:
        if required:
            pytest.fail("LEXICA_REQUIRE_BROWSER=1 but no Chromium was found (set LEXICA_CHROMIUM or run make browser)")
        pytest.skip("no Chromium found (set LEXICA_CHROMIUM or run `make browser`)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield launched
        launched.close()


class Watched:
    """A page plus what it must not do: open dialogs or throw script errors."""

    def __init__(self, page):
        self.page, self.dialogs, self.errors = page, [], []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, url: str, wait_ready: bool = True) -> None:
        self.page.goto(url)
        if wait_ready:
            self.page.wait_for_selector("body[data-ready='1']", timeout=10_000)

    def assert_inert(self) -> None:
        assert self.page.evaluate("typeof window.__pwned") == "undefined"
        assert self.dialogs == []
        assert self.errors == []


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    watched = Watched(context.new_page())
    yield watched
    watched.assert_inert()
    context.close()


@pytest.fixture(scope="module")
def served(atlas_site):
    site_dir, _ = atlas_site
    server, url = browse.serve(site_dir)
    assert url.startswith("http://127.0.0.1:")
    yield url.removesuffix("index.html")
    server.shutdown()
    server.server_close()


def index_rows(page) -> list[int]:
    return [int(value) for value in page.eval_on_selector_all("#features tbody tr", "rows => rows.map(r => "
                                                                                      "r.dataset.feature)")]


def search(page, text: str) -> list[int]:
    page.fill("#search", text)  # the table follows after a short pause, with the query in the URL
    page.wait_for_function("query => location.hash === (query ? '#q=' + encodeURIComponent(query) : '')",
                           arg=text.strip().lower())
    return index_rows(page)


def test_index_lists_and_pages_features(atlas_site, page):
    site_dir, _ = atlas_site
    page.open((site_dir / "index.html").as_uri())
    assert index_rows(page.page) == list(range(100))
    assert page.page.text_content("#status") == f"{FEATURES} features"
    page.page.click("#next")
    assert index_rows(page.page) == list(range(100, FEATURES))


def test_search_by_id_and_by_top_token(atlas_site, page):
    site_dir, facts = atlas_site
    page.open((site_dir / "index.html").as_uri())
    assert search(page.page, "42")[0] == 42
    word = facts["theme"][77]
    found = search(page.page, word)
    assert 77 in found and len(found) < FEATURES
    row_text = page.page.text_content("#features tbody tr[data-feature='77']")
    assert word in row_text
    assert search(page.page, "no-such-word-anywhere") == []


@pytest.mark.parametrize("origin", ["file", "http"])
def test_click_through_to_feature_page(atlas_site, page, served, origin):
    site_dir, facts = atlas_site
    page.open((site_dir / "index.html").as_uri() if origin == "file" else served + "index.html")
    word = facts["theme"][23]
    search(page.page, word)
    page.page.click("#features tbody tr[data-feature='23'] a")
    page.page.wait_for_url(re.compile(r".*/features/23\.html$"))
    assert page.page.text_content("h1") == "Feature 23"
    assert page.page.locator("ol.contexts li").count() == 12  # 8 top examples + 4 quantile samples (1 per band)
    assert page.page.locator("h3", has_text="Band").count() == 4
    examples = page.page.locator("ol.contexts").first.locator(".ctx span.x")
    assert examples.count() == 8
    assert word in examples.first.text_content()
    assert float(examples.first.get_attribute("title")) > 0
    assert "a20" in examples.first.get_attribute("class")  # the top example is shaded fully
    page.page.click("a[rel=next]")
    page.page.wait_for_url(re.compile(r".*/features/24\.html$"))


def test_map_point_opens_its_feature(atlas_site, page):
    site_dir, _ = atlas_site
    page.open((site_dir / "map.html").as_uri())
    positions = page.page.evaluate(f"[...Array({FEATURES}).keys()].map(f => window.lexicaMap.screenPosition(f))")
    # A point far from every other one, so the click cannot be taken by a neighbour.
    def isolation(feature: int) -> float:
        here = positions[feature]
        return min((here["x"] - other["x"]) ** 2 + (here["y"] - other["y"]) ** 2
                   for index, other in enumerate(positions) if index != feature)
    target = max(range(FEATURES), key=isolation)
    point = positions[target]
    page.page.mouse.move(point["x"], point["y"])
    assert page.page.text_content("#tooltip").startswith(f"feature {target}\n")
    page.page.mouse.click(point["x"], point["y"])
    page.page.wait_for_url(re.compile(rf".*/features/{target}\.html$"))
    assert page.page.text_content("h1") == f"Feature {target}"


@pytest.mark.parametrize("origin", ["file", "http"])
def test_hostile_strings_render_as_text(atlas_site, page, served, origin):
    site_dir, facts = atlas_site
    base = site_dir.as_uri() + "/" if origin == "file" else served
    view = page.page

    page.open(base + f"features/{PAYLOAD_FEATURE}.html", wait_ready=False)
    assert view.locator("script").count() == 0
    assert view.locator("img").count() == 0
    assert view.locator("svg").count() == 1 and view.locator("svg.histogram").count() == 1
    context_text = view.text_content("main")
    for payload in PAYLOADS:
        assert payload in context_text  # shown literally, e.g. "&amp;" as five characters
    example_tokens = view.locator(".ctx span.x").all_text_contents()
    assert PAYLOADS[0] in example_tokens
    assert "<b>" in view.title()  # the dictionary name is shown, not parsed
    assert "↵" in context_text  # newline tokens stay visible without breaking the line
    page.assert_inert()

    page.open(base + "index.html")
    assert view.text_content("h1") == "synthetic <b>dictionary</b>"
    rows = search(view, "pwned")
    assert PAYLOAD_FEATURE in rows
    row_text = view.text_content(f"#features tbody tr[data-feature='{PAYLOAD_FEATURE}']")
    assert PAYLOADS[0] in row_text and PAYLOADS[1] in row_text
    assert view.locator("script").count() == 2  # data/index.js and assets/index.js only
    assert view.locator("img, svg, main script, iframe").count() == 0
    page.assert_inert()

    page.open(base + "map.html")
    position = view.evaluate(f"window.lexicaMap.screenPosition({PAYLOAD_FEATURE})")
    view.mouse.move(position["x"], position["y"])
    tooltip = view.text_content("#tooltip")
    assert tooltip.startswith("feature ")
    assert view.locator("#tooltip *").count() == 0
    assert view.locator("script").count() == 2 and view.locator("img, svg").count() == 0


def test_built_files_hold_no_unescaped_payload(atlas_site):
    site_dir, _ = atlas_site
    page = (site_dir / "features" / f"{PAYLOAD_FEATURE}.html").read_text()
    for payload in PAYLOADS:
        assert html.escape(payload, quote=True) in page
    for path in site_dir.rglob("*"):
        if path.suffix not in (".html", ".js") or path.parent.name == "assets":
            continue
        text = path.read_text()
        for payload in PAYLOADS[:3]:  # every payload with markup in it
            assert payload not in text, f"{path} holds {payload!r} unescaped"
        if path.suffix == ".html":
            # Only the site's own tags: two <script src> on the index and map, the histogram's <svg>.
            scripts = 2 if path.name in ("index.html", "map.html") else 0
            assert text.count("<script") == scripts and text.count("</script>") == scripts
            assert "<img" not in text
            assert text.count("<svg") == text.count('<svg class="histogram"')
        else:
            assert not set("<>&\u2028\u2029") & set(text), f"{path} holds a character that could end its script"


def test_script_json_and_display_token():
    encoded = script_json({"token": "</script><!--\u2028\u2029&"})
    assert not set("<>&\u2028\u2029") & set(encoded)
    assert display_token("\n") == "↵" and display_token("\t") == "⇥" and display_token("  ") == "··"
    assert display_token(" the") == " the" and display_token("a\x00b") == "a␀b"


def test_optional_tables_are_left_out(tmp_path):
    write_synthetic_atlas(str(tmp_path), features=5, contexts_per_feature=4, tokens_per_context=6,
                          with_logits=False, with_neighbours=False, with_map=False)
    build_site(str(tmp_path))
    build_site(str(tmp_path))  # a rebuild replaces the site in one rename
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
    site_dir = tmp_path / "site"
    assert not (site_dir / "map.html").exists() and not (site_dir / "data" / "map.js").exists()
    page = (site_dir / "features" / "3.html").read_text()
    assert "Logit effects" not in page and "Nearest features" not in page and "map.html" not in page
    assert 'href="map.html"' not in (site_dir / "index.html").read_text()
    assert sorted(int(path.stem) for path in (site_dir / "features").glob("*.html")) == list(range(5))


def test_browse_command(tmp_path, capsys):
    run = tmp_path / "run"
    assert lexica_main(["browse", "--run", str(run)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    export = run / "dictionaries" / "topk-1" / "final"
    export.mkdir(parents=True)
    (export / "cfg.json").write_text("{}")
    assert lexica_main(["browse", "--run", str(run)]) == 2
    assert "site of dictionary 'topk-1' is not built" in capsys.readouterr().err
    write_synthetic_atlas(str(run / "analysis" / "topk-1"), features=3, contexts_per_feature=4, tokens_per_context=5)
    build_site(str(run / "analysis" / "topk-1"))
    assert lexica_main(["browse", "--run", str(run), "--print-path"]) == 0
    assert capsys.readouterr().out.strip() == (run / "analysis" / "topk-1" / "site" / "index.html").as_uri()
    assert lexica_main(["browse", "--run", str(run), "--port", "70000"]) == 2
    assert "not a port number" in capsys.readouterr().err
    assert browse.is_loopback("127.0.0.1") and browse.is_loopback("::1") and not browse.is_loopback("0.0.0.0")
