"""The static feature browser: built from a synthetic atlas, then driven in headless Chromium.

Pages are opened from disk (file://) and, where marked, served by ``analysis.browse.serve``.
The atlas carries hostile corpus strings; they must show as literal text and never run.
Without Chromium the browser tests skip (``make browser`` installs it) unless
LEXICA_REQUIRE_BROWSER=1, which turns the skip into a failure.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from synthetic_atlas import PAYLOADS, write_synthetic_atlas

from lexica import storage
from lexica.analysis import browse
from lexica.analysis.site import BUILT_FROM, build_site
from lexica.analysis.site_data import data_script, parse_record, read_data_file
from lexica.cli import main as lexica_main

FEATURES = 150  # more than one index page (50 rows)
PAYLOAD_FEATURE = 1
WIDE_FEATURES = 1 << 18  # the scale test's atlas: 256 data chunks, small contexts to stay quick


@pytest.fixture(scope="module")
def atlas_site(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("atlas")
    facts = write_synthetic_atlas(str(folder), features=FEATURES, contexts_per_feature=12, tokens_per_context=20)
    index = build_site(str(folder))
    assert Path(index) == folder / "site" / "index.html"
    return folder / "site", facts


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
    page.wait_for_function("query => document.body.dataset.query === query", arg=text.strip())
    return index_rows(page)


def open_feature(page, base: str, feature: int) -> None:
    page.open(f"{base}feature.html#{feature}")
    page.page.wait_for_function("f => document.querySelector('h1')?.textContent === 'Feature ' + f", arg=feature)


def test_index_lists_and_pages_features(atlas_site, page):
    site_dir, _ = atlas_site
    page.open((site_dir / "index.html").as_uri())
    assert index_rows(page.page) == list(range(50))
    assert page.page.text_content("#status") == f"{FEATURES} features"
    page.page.click("#next")
    page.page.wait_for_selector("#features tbody tr[data-feature='50']")
    assert index_rows(page.page) == list(range(50, 100))
    features = pq.read_table(site_dir.parent / "features.parquet").to_pydict()
    for order, key in (("density", lambda f: (-features["density"][f], f)),
                       ("max", lambda f: (-features["max_activation"][f], f)),
                       ("rare", lambda f: (features["density"][f], f))):
        page.page.select_option("#order", order)
        page.page.wait_for_function("order => document.body.dataset.listed === order", arg=order)
        assert index_rows(page.page) == sorted(features["feature"], key=key)[:25], order


def test_search_by_id_and_by_top_token(atlas_site, page):
    site_dir, facts = atlas_site
    page.open((site_dir / "index.html").as_uri())
    assert search(page.page, "42")[0] == 42
    word = facts["theme"][77]
    found = search(page.page, word)
    assert 77 in found and len(found) < FEATURES
    row_text = page.page.text_content("#features tbody tr[data-feature='77']")
    assert word in row_text
    assert 77 in search(page.page, word[:-1].upper())  # a prefix, in any case
    assert search(page.page, "no-such-word-anywhere") == []


@pytest.mark.parametrize("origin", ["file", "http"])
def test_click_through_to_feature_page(atlas_site, page, served, origin):
    site_dir, facts = atlas_site
    page.open((site_dir / "index.html").as_uri() if origin == "file" else served + "index.html")
    word = facts["theme"][23]
    search(page.page, word)
    page.page.click("#features tbody tr[data-feature='23'] a")
    page.page.wait_for_url(re.compile(r".*/feature\.html#23$"))
    page.page.wait_for_selector("body[data-ready='1'] h1")
    assert page.page.text_content("h1") == "Feature 23"
    assert page.page.locator("ol.contexts li").count() == 12  # 8 top examples + 4 quantile samples (1 per band)
    assert page.page.locator("h3", has_text="Band").count() == 4
    examples = page.page.locator("ol.contexts").first.locator(".ctx span.x")
    assert examples.count() == 8
    assert word in examples.first.text_content()
    assert float(examples.first.get_attribute("title")) > 0
    assert "a20" in examples.first.get_attribute("class")  # the top example is shaded fully
    page.page.click("a[rel=next]")
    page.page.wait_for_function("() => document.querySelector('h1')?.textContent === 'Feature 24'")
    neighbour = page.page.locator("ol.neighbours a").first
    target = int(neighbour.text_content().split()[-1])
    neighbour.click()
    page.page.wait_for_function("f => document.querySelector('h1')?.textContent === 'Feature ' + f", arg=target)


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
    page.page.wait_for_function(
        "f => document.getElementById('tooltip').textContent.startsWith('feature ' + f + '\\n')", arg=target)
    page.page.mouse.click(point["x"], point["y"])
    page.page.wait_for_url(re.compile(rf".*/feature\.html#{target}$"))
    page.page.wait_for_selector("body[data-ready='1'] h1")
    assert page.page.text_content("h1") == f"Feature {target}"


def own_scripts(view) -> list[str]:
    sources = view.eval_on_selector_all("script", "nodes => nodes.map(n => n.getAttribute('src'))")
    assert all(src and re.fullmatch(r"(assets|data(/[a-z]+)?)/[a-z0-9-]+\.js", src) for src in sources), sources
    return sources


@pytest.mark.parametrize("origin", ["file", "http"])
def test_hostile_strings_render_as_text(atlas_site, page, served, origin):
    site_dir, facts = atlas_site
    base = site_dir.as_uri() + "/" if origin == "file" else served
    view = page.page

    open_feature(page, base, PAYLOAD_FEATURE)
    own_scripts(view)
    assert view.locator("img, iframe, object").count() == 0
    assert view.locator("svg").count() == 1 and view.locator("svg.histogram").count() == 1
    context_text = view.text_content("main")
    for payload in PAYLOADS:
        assert payload in context_text  # shown literally, e.g. "&amp;" as five characters
    example_tokens = view.locator(".ctx span.x").all_text_contents()
    assert PAYLOADS[0] in example_tokens
    assert "<b>" in view.title()  # the dictionary name is shown, not parsed
    assert "↵" in context_text  # newline tokens stay visible without breaking the line
    assert view.evaluate("window.lexica.displayToken('\\n') + window.lexica.displayToken('  ') + "
                         "window.lexica.displayToken('a\\u0000b') + window.lexica.displayToken('\\t')") == "↵··a␀b⇥"
    page.assert_inert()

    page.open(base + "index.html")
    assert view.text_content("h1") == "synthetic <b>dictionary</b>"
    assert view.locator("#facts b").count() == 5  # the summary's facts, each its own text
    rows = search(view, "<script>")  # a prefix of the payload word, itself hostile
    assert PAYLOAD_FEATURE in rows
    row_text = view.text_content(f"#features tbody tr[data-feature='{PAYLOAD_FEATURE}']")
    assert PAYLOADS[0] in row_text and PAYLOADS[1] in row_text
    own_scripts(view)
    assert view.locator("img, svg, iframe").count() == 0
    page.assert_inert()

    page.open(base + "map.html")
    position = view.evaluate(f"window.lexicaMap.screenPosition({PAYLOAD_FEATURE})")
    view.mouse.move(position["x"], position["y"])
    view.wait_for_selector("#tooltip:not([hidden])")
    assert view.text_content("#tooltip").startswith("feature ")
    assert view.locator("#tooltip *").count() == 0
    own_scripts(view)
    assert view.locator("img, svg").count() == 0


BASE64 = '"[A-Za-z0-9+/=]*"'
PART_NAME = re.compile(r"part-\d{8}-[0-9a-f]{8}\.parquet")
DATA_FILE = re.compile(rf'lexicaData\("[a-z0-9/-]+","(json|bin|bin\[\])",(\[({BASE64},?)*\]|{BASE64})\);\n')


def test_built_files_hold_no_corpus_text(atlas_site):
    site_dir, _ = atlas_site
    for path in site_dir.rglob("*"):
        if not path.is_file() or path.parent.name == "assets":
            continue
        text = path.read_text()
        for payload in PAYLOADS[:3]:  # every payload with markup in it
            assert payload not in text, f"{path} holds {payload!r}"
        if path.name == BUILT_FROM:  # the explanation and score parts shown: generated names only
            assert all(PART_NAME.fullmatch(name) for names in json.loads(text).values() for name in names)
        elif path.suffix == ".html":  # only the site's own tags
            assert len(re.findall("<script", text)) == len(re.findall(r'<script src="(assets|data)/[a-z]+\.js">'
                                                                     r"</script>", text))
            assert "<img" not in text and "<svg" not in text
        else:
            assert DATA_FILE.fullmatch(text), f"{path} is not a base64 data file"


def test_records_round_trip(atlas_site):
    site_dir, facts = atlas_site
    _, meta = read_data_file((site_dir / "data" / "meta.js").read_text())
    _, vocabulary = read_data_file((site_dir / "data" / "vocab.js").read_text())
    _, chunk = read_data_file((site_dir / "data" / "features" / "0.js").read_text())
    assert meta["features"] == len(chunk) == FEATURES and meta["per_chunk"] == 1024  # the last chunk is short
    head, ids, levels = parse_record(chunk[77], meta["id_bytes"])
    assert head["f"] == 77 and len(head["c"]) == 12 and len(ids) == len(levels) == 12 * 20
    centre = head["c"][0][4]
    assert vocabulary["text"][ids[centre]] == " " + facts["theme"][77]
    assert levels[centre] == 255  # the top example is the feature's maximum
    assert data_script("k", "json", "QUJD") == b'lexicaData("k","json","QUJD");\n'


def test_optional_tables_are_left_out(tmp_path, page):
    write_synthetic_atlas(str(tmp_path), features=5, contexts_per_feature=4, tokens_per_context=6,
                          with_logits=False, with_neighbours=False, with_map=False)
    build_site(str(tmp_path))
    build_site(str(tmp_path))  # a rebuild replaces the site in one rename
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith(".")) == []
    site_dir = tmp_path / "site"
    assert not (site_dir / "map.html").exists() and not (site_dir / "data" / "map.js").exists()
    _, meta = read_data_file((site_dir / "data" / "meta.js").read_text())
    assert (meta["has_logits"], meta["has_neighbours"], meta["has_map"]) == (False, False, False)
    assert 'href="map.html"' not in (site_dir / "index.html").read_text()
    open_feature(page, site_dir.as_uri() + "/", 3)
    text = page.page.text_content("main")
    assert "Logit effects" not in text and "Nearest features" not in text
    assert page.page.locator("a[href^='map.html']").count() == 0
    open_feature(page, site_dir.as_uri() + "/", 4)  # the last one: no "next"
    assert page.page.locator("a[rel=next]").count() == 0


@pytest.fixture(scope="module")
def wide_site(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("wide")
    facts = write_synthetic_atlas(str(folder), features=WIDE_FEATURES, contexts_per_feature=4, tokens_per_context=8,
                                  themes=49152, bands=2, logit_tokens=5, neighbours=5)
    build_site(str(folder))
    return folder / "site", facts


def test_a_wide_atlas_is_chunked_and_searchable(wide_site, page):
    site_dir, facts = wide_site
    files = [path for path in site_dir.rglob("*") if path.is_file()]
    chunks = WIDE_FEATURES // 1024
    assert len(list((site_dir / "data" / "features").iterdir())) == chunks
    assert len(files) < chunks * 2  # grows with features / 1,024, not with features
    _, meta = read_data_file((site_dir / "data" / "meta.js").read_text())
    shards = sorted((site_dir / "data" / "search").iterdir())
    assert len(shards) == meta["search_shards"] > 1
    assert max(path.stat().st_size for path in shards) < 2 << 20

    base = site_dir.as_uri() + "/"
    page.open(base + "index.html")
    assert search(page.page, "200000")[0] == 200000  # by id
    feature = 1234
    theme = facts["theme"][feature]
    by_token = search(page.page, theme)
    assert feature in by_token and all(other % 49152 == feature % 49152 for other in by_token[:5])
    by_prefix = search(page.page, theme[:5])
    assert by_prefix  # a word prefix finds the words that start with it
    page.page.click(f"#features tbody tr[data-feature='{by_token[0]}'] a")
    page.page.wait_for_selector("body[data-ready='1'] h1")
    assert page.page.text_content("h1") == f"Feature {by_token[0]}"

    far = WIDE_FEATURES - 3  # a record from the last chunk
    open_feature(page, base, far)
    assert page.page.locator("ol.contexts li").count() == 4
    assert page.page.locator(".ctx span.x").count() == 4

    page.open(base + "map.html")
    point = page.page.evaluate(f"window.lexicaMap.screenPosition({far})")
    page.page.mouse.move(point["x"], point["y"])
    page.page.wait_for_selector("#tooltip:not([hidden])")
    shown = int(page.page.text_content("#tooltip").split()[1])
    page.page.mouse.click(point["x"], point["y"])
    page.page.wait_for_url(re.compile(rf".*/feature\.html#{shown}$"))
    page.page.wait_for_selector("body[data-ready='1'] h1")
    assert page.page.text_content("h1") == f"Feature {shown}"
    near = page.page.evaluate("window.lexicaMap ? null : 0")  # the feature page has no map script
    assert near == 0


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


def test_a_site_is_built_on_object_storage(s3_server):
    _, options = s3_server
    url = "s3://lexica-test/site-atlas"
    write_synthetic_atlas(url, features=40, contexts_per_feature=6, tokens_per_context=8, storage_options=options)
    index = build_site(url, options)
    fs, path = storage.url_to_fs(url, options)
    assert index.endswith("site/index.html") and fs.exists(f"{path}/site/index.html")
    _, meta = read_data_file(fs.cat(f"{path}/site/data/meta.js").decode())
    assert meta["features"] == 40 and fs.exists(f"{path}/site/data/features/0.js")
    build_site(url, options)  # a rebuild replaces the old site (removed first: object storage has no rename)
    assert fs.exists(f"{path}/site/index.html")
