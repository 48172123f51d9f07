"""The static feature browser: the atlas tables rendered as HTML pages that open from disk, no server needed.

``<analysis folder>/site/`` holds ``index.html`` (a searchable, paged table of every feature),
``features/<id>.html`` (one page per feature), ``map.html`` (the 2-D map, when ``map.parquet``
exists), ``assets/`` (CSS and the two page scripts) and ``data/`` (the index and map data as
``.js`` files that assign JSON, because a page opened from ``file://`` may not fetch JSON).

Every string that comes from the corpus or the tokenizer is untrusted: Python-made HTML passes it
through :func:`html.escape`; JSON in the data files has ``<``, ``>``, ``&``, U+2028 and U+2029
written as ``\\uXXXX`` so no string can end the script; the page scripts insert data with
``textContent`` and ``createElement`` only. A Content-Security-Policy forbids inline scripts too.

Context rows are the bulk of the work (16k features x 40 rows x 25 tokens is 16M token spans), so
their HTML is assembled with Arrow compute kernels, not one Python format call per token.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import uuid
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lexica import storage
from lexica.analysis import atlas

SITE_FOLDER = "site"
ASSET_FILES = ("site.css", "index.js", "map.js")
INDEX_TOKENS = 5  # example tokens and promoted logit tokens shown per feature in the index
SEARCH_WORDS = 32  # context words per feature the index search looks through
SEARCH_WINDOW = 3  # ...taken this many tokens either side of each top example token
INTENSITY_LEVELS = 20  # background shades of an activating token (CSS classes a1..a20)
FEATURES_PER_BATCH = 1024  # context rows are turned into HTML this many features at a time
FILES_PER_WRITE = 512  # pages handed to the file system in one fsspec pipe() call (concurrent on S3)

# Whitespace and control characters would vanish or break a context line; show a visible stand-in.
VISIBLE_CHARACTERS = {"\n": "↵", "\r": "⏎", "\t": "⇥", "\x0b": "␋", "\x0c": "␌", "\x00": "␀"}
VISIBLE_CHARACTERS.update({chr(code): chr(0x2400 + code) for code in range(32) if chr(code) not in VISIBLE_CHARACTERS})
VISIBLE_CHARACTERS["\x7f"] = "␡"
_VISIBLE_TABLE = str.maketrans(VISIBLE_CHARACTERS)

# Feature pages run no script at all; the index and map run only their own files, never inline code.
# `file:` is listed beside 'self' because some browsers give a page opened from disk an opaque origin
# that 'self' does not match; the protection that matters here, no inline script or handler, stays.
PAGE_POLICY = "default-src 'none'; style-src 'self' file:; img-src 'self' file:"
SCRIPT_POLICY = "default-src 'none'; style-src 'self' file:; img-src 'self' file:; script-src 'self' file:"


def display_token(token: str) -> str:
    """A token as it is shown: newlines, tabs and control characters visible, a blank token as dots."""
    if token == "\r\n":
        return "↵"
    shown = token.translate(_VISIBLE_TABLE)
    if shown and not shown.strip(" "):
        return "·" * len(shown)
    return shown


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def script_json(document: object) -> str:
    """JSON that is safe inside a ``<script>`` file: nothing in it can close a tag or end a line of JS."""
    text = json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for character, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                            ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(character, code)
    return text


def _map_unique(strings: pa.Array, convert) -> pa.Array:
    """``convert`` applied to each distinct string once (tokens repeat: a vocabulary, not 16M strings)."""
    encoded = pc.dictionary_encode(pc.fill_null(strings, ""))
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    converted = pa.array([convert(token) for token in encoded.dictionary.to_pylist()], type=pa.string())
    return converted.take(encoded.indices)


def _shown_html(token: str | None) -> str:
    return escape(display_token(token or ""))


def _list_offsets(lists: pa.Array) -> np.ndarray:
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def _span_prefixes() -> tuple[pa.Array, pa.Array]:
    """Opening-tag pieces by code ``level * 2 + is_example``: the head before the title value, the tail after."""
    heads, tails = [], []
    for level in range(INTENSITY_LEVELS + 1):
        for example in (0, 1):
            classes = " ".join(([f"a{level}"] if level else []) + (["x"] if example else []))
            class_attribute = f' class="{classes}"' if classes else ""
            if level:
                heads.append(f'<span{class_attribute} title="')
                tails.append('">')
            else:
                heads.append(f"<span{class_attribute}")
                tails.append(">")
    return pa.array(heads), pa.array(tails)


SPAN_HEADS, SPAN_TAILS = _span_prefixes()


def context_items_html(contexts: pa.Table, scale: np.ndarray) -> list[str]:
    """One ``<li>`` per context row: its activation, its tokens shaded by activation / ``scale``, where it is.

    A token with a positive activation gets class ``a<level>`` (level 1..20, background intensity)
    and its exact activation as a title; the example token also gets class ``x``.
    """
    if contexts.num_rows == 0:
        return []
    tokens = contexts.column("tokens").combine_chunks()
    values = contexts.column("values").combine_chunks()
    offsets = _list_offsets(tokens)
    flat_tokens = pc.list_flatten(tokens)
    flat_values = pc.list_flatten(values)
    if len(flat_values) != len(flat_tokens):
        raise ValueError("contexts.parquet has rows whose tokens and values differ in length")
    shown = _map_unique(flat_tokens, _shown_html)

    lengths = np.diff(offsets)
    numbers = np.nan_to_num(flat_values.to_numpy(zero_copy_only=False).astype(np.float32), nan=0.0)
    row_scale = np.repeat(np.where(scale > 0, scale, 1.0).astype(np.float32), lengths)
    levels = np.where(numbers > 0, np.clip(np.ceil(numbers / row_scale * INTENSITY_LEVELS), 1, INTENSITY_LEVELS), 0)
    example = np.zeros(len(numbers), dtype=np.int64)
    centre = contexts.column("center").to_numpy().astype(np.int64)
    inside = (centre >= 0) & (centre < lengths)
    example[(offsets[:-1] + centre)[inside]] = 1
    codes = pa.array(levels.astype(np.int64) * 2 + example)
    titles = pc.if_else(pa.array(numbers > 0), pc.cast(pa.array(numbers), pa.string()), "")
    spans = pc.binary_join_element_wise(SPAN_HEADS.take(codes), titles, SPAN_TAILS.take(codes), shown,
                                        "</span>", "")
    rows = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), spans), "")
    activations = pc.cast(pc.round(pc.cast(contexts.column("activation"), pa.float64()), 3), pa.string())
    items = pc.binary_join_element_wise(
        '<li><span class="num">', activations, '</span><span class="ctx">', rows, '</span><span class="where">doc ',
        pc.cast(contexts.column("doc_id"), pa.string()), " · pos ", pc.cast(contexts.column("position"), pa.string()),
        "</span></li>", "")
    return items.to_pylist()


def _group_starts(sorted_ids: np.ndarray, feature_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row range [start, stop) of each feature in rows sorted by feature."""
    return (np.searchsorted(sorted_ids, feature_ids, side="left"),
            np.searchsorted(sorted_ids, feature_ids, side="right"))


def _ranked_strings(feature_column: np.ndarray, strings: pa.Array, keep: int,
                    feature_ids: np.ndarray) -> list[list[str]]:
    """Per feature of ``feature_ids``, its most frequent non-empty strings (ties alphabetical), at most ``keep``."""
    if len(strings) == 0:
        return [[] for _ in feature_ids]
    table = pa.table({"feature": pa.array(feature_column, type=pa.int32()), "text": strings})
    table = table.filter(pc.invert(pc.equal(table["text"], "")))
    counted = table.group_by(["feature", "text"]).aggregate([([], "count_all")])
    counted = counted.sort_by([("feature", "ascending"), ("count_all", "descending"), ("text", "ascending")])
    grouped_features = counted["feature"].to_numpy()
    run_starts = np.flatnonzero(np.diff(grouped_features, prepend=np.iinfo(np.int64).min))
    run_lengths = np.diff(np.append(run_starts, len(grouped_features)))
    rank = np.arange(len(grouped_features)) - np.repeat(run_starts, run_lengths)
    kept = counted.filter(pa.array(rank < keep))
    kept_features = kept["feature"].to_numpy()
    texts = kept["text"].to_pylist()
    starts, stops = _group_starts(kept_features, feature_ids)
    return [texts[start:stop] for start, stop in zip(starts, stops, strict=True)]


def index_words(top_contexts: pa.Table, feature_ids: np.ndarray) -> tuple[list[list[str]], list[list[str]]]:
    """Per feature: its most frequent example tokens (display form) and its search words (lower case).

    Search words are the tokens within :data:`SEARCH_WINDOW` of each top example, stripped and
    lower-cased, most frequent first.
    """
    if top_contexts.num_rows == 0:
        return [[] for _ in feature_ids], [[] for _ in feature_ids]
    tokens = top_contexts.column("tokens").combine_chunks()
    offsets = _list_offsets(tokens)
    lengths = np.diff(offsets)
    flat_tokens = pc.list_flatten(tokens)
    row_features = top_contexts.column("feature").to_numpy()
    centre = np.clip(top_contexts.column("center").to_numpy().astype(np.int64), 0, np.maximum(lengths - 1, 0))
    has_tokens = lengths > 0
    example_tokens = flat_tokens.take(pa.array((offsets[:-1] + centre)[has_tokens]))
    shown = _map_unique(example_tokens, lambda token: display_token(token or ""))
    top_tokens = _ranked_strings(row_features[has_tokens], shown, INDEX_TOKENS, feature_ids)

    window = np.arange(-SEARCH_WINDOW, SEARCH_WINDOW + 1)
    positions = centre[:, None] + window[None, :]
    valid = (positions >= 0) & (positions < lengths[:, None])
    flat_positions = (offsets[:-1, None] + positions)[valid]
    window_features = np.broadcast_to(row_features[:, None], positions.shape)[valid]
    words = _map_unique(flat_tokens.take(pa.array(flat_positions)), lambda token: (token or "").strip().lower())
    search_words = _ranked_strings(window_features, words, SEARCH_WORDS, feature_ids)
    return top_tokens, search_words


class HistogramDrawer:
    """Inline SVG bars of a feature's activation histogram (log-spaced bins), trimmed to its occupied range.

    Bin labels and decade ticks depend only on the edges, so they are formatted once per site.
    """

    WIDTH, HEIGHT, AXIS = 640, 120, 16

    def __init__(self, edges: list[float]):
        self.edges = edges
        self.bin_labels = [f"{low:.3g}–{high:.3g}" for low, high in zip(edges[:-1], edges[1:], strict=True)]
        # The x axis is logarithmic: label the decade edges (…, 0.1, 1, 10, …) that fall inside the range.
        self.decade = [edge > 0 and abs(np.log10(edge) - round(np.log10(edge))) < 1e-6 for edge in edges]

    def svg(self, counts: list[int]) -> str:
        counts = counts or []
        occupied = [i for i, count in enumerate(counts) if count]
        if not occupied or len(self.edges) < len(counts) + 1:
            return '<p class="empty">No activations recorded.</p>'
        first, last = occupied[0], occupied[-1]
        shown = counts[first:last + 1]
        height = self.HEIGHT
        bar = self.WIDTH / len(shown)
        bar_width = f"{max(bar - 1, 1):.1f}"
        tallest = max(shown)
        parts = [f'<svg class="histogram" viewBox="0 0 {self.WIDTH} {height + self.AXIS}" role="img" '
                 'aria-label="activation histogram">']
        for offset, count in enumerate(shown):
            if count:
                bar_height = max(1.0, count / tallest * height)
                parts.append(f'<rect x="{offset * bar:.1f}" y="{height - bar_height:.1f}" width="{bar_width}" '
                             f'height="{bar_height:.1f}"><title>{self.bin_labels[first + offset]}: {count:,}</title>'
                             '</rect>')
        for offset in range(len(shown) + 1):
            if self.decade[first + offset]:
                parts.append(f'<text x="{offset * bar:.1f}" y="{height + self.AXIS - 3}">'
                             f'{self.edges[first + offset]:g}</text>')
        parts.append("</svg>")
        return "".join(parts)


def _number(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}g}"


class _TokenHtml(dict):
    """Escaped display HTML of tokens, computed once per distinct token (logit tokens repeat across features)."""

    def __missing__(self, token: str | None) -> str:
        self[token] = shown = _shown_html(token)
        return shown


def _token_list_html(tokens: list[str], values: list[float], token_html: _TokenHtml) -> str:
    cells = "".join(f'<li><span class="tok">{token_html[token]}</span><span class="num">{value:+.3f}</span></li>'
                    for token, value in zip(tokens, values, strict=False))
    return f'<ol class="logit">{cells}</ol>'


def _head(title: str, css: str, policy: str) -> str:
    return ('<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{escape(title)}</title><link rel="stylesheet" href="{css}"></head>')


def _summary_line(summary: dict) -> str:
    facts = []
    for key in ("model", "hook", "target_hook", "d_sae", "tokens", "store"):
        value = summary.get(key)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            shown = f"{value:,}" if isinstance(value, int) else value
            facts.append(f"{key} <b>{escape(shown)}</b>")
    return " · ".join(facts)


class _Tables:
    """The atlas tables a site is built from, indexed by feature."""

    def __init__(self, folder_url: str, storage_options: dict | None):
        self.summary = atlas.read_summary(folder_url, storage_options)
        features = atlas.read_table(folder_url, "features", storage_options).sort_by("feature")
        self.feature_ids = features["feature"].to_numpy().astype(np.int64)
        self.fires = features["fires"].to_numpy()
        self.density = features["density"].to_numpy()
        self.max_activation = features["max_activation"].to_numpy()
        self.mean_activation = features["mean_activation"].to_numpy()
        self.histograms = features["histogram"].to_pylist()
        self.position = {int(feature): row for row, feature in enumerate(self.feature_ids)}

        contexts = atlas.read_table(folder_url, "contexts", storage_options)
        # Per feature: top examples by rank, then quantile samples band by band.
        contexts = contexts.append_column("order", pc.if_else(pc.equal(contexts["kind"], "top"), 0, 1))
        self.contexts = contexts.sort_by([("feature", "ascending"), ("order", "ascending"),
                                          ("band", "ascending"), ("rank", "ascending")])
        self.context_features = self.contexts["feature"].to_numpy()

        self.logits = self._optional(folder_url, "logits", storage_options)
        self.neighbours = self._optional(folder_url, "neighbours", storage_options)
        self.map = self._optional(folder_url, "map", storage_options)

    def _optional(self, folder_url: str, name: str, storage_options: dict | None) -> dict[int, dict] | None:
        if not atlas.has_table(folder_url, name, storage_options):
            return None
        rows = atlas.read_table(folder_url, name, storage_options).to_pylist()
        return {row["feature"]: row for row in rows}


class _FeaturePages:
    """Renders ``features/<id>.html``; what every page shares is formatted once here."""

    def __init__(self, tables: _Tables, top_tokens: list[list[str]], edges: list[float], has_map: bool):
        self.tables, self.has_map = tables, has_map
        self.histogram = HistogramDrawer(edges)
        self.token_html = _TokenHtml()
        self.dictionary = str(tables.summary.get("dictionary", "atlas"))
        self.chips = ["".join(f'<span class="tok">{escape(word)}</span>' for word in words) for words in top_tokens]

    def page(self, row: int, items: list[str], kinds: np.ndarray, bands: np.ndarray,
             activations: np.ndarray) -> str:
        """The page of the feature at ``row``; ``items`` are its context rows' ``<li>`` HTML, in table order."""
        tables = self.tables
        ids = tables.feature_ids
        feature = int(ids[row])
        previous_link = (f'<a rel="prev" href="{ids[row - 1]}.html">← feature {ids[row - 1]}</a>' if row > 0
                         else "<span></span>")
        next_link = (f'<a rel="next" href="{ids[row + 1]}.html">feature {ids[row + 1]} →</a>'
                     if row + 1 < len(ids) else "<span></span>")
        map_link = f'<a href="../map.html#f={feature}">map</a>' if self.has_map else ""
        parts = [_head(f"Feature {feature} · {self.dictionary}", "../assets/site.css", PAGE_POLICY),
                 f'<body class="feature-page"><nav class="bar">{previous_link}<a href="../index.html">index</a>'
                 f'{map_link}{next_link}</nav><main>',
                 f'<h1>Feature {feature}</h1><dl class="stats">'
                 f'<div><dt>density</dt><dd>{_number(tables.density[row])}</dd></div>'
                 f'<div><dt>fires</dt><dd>{int(tables.fires[row]):,}</dd></div>'
                 f'<div><dt>max activation</dt><dd>{_number(tables.max_activation[row])}</dd></div>'
                 f'<div><dt>mean activation</dt><dd>{_number(tables.mean_activation[row])}</dd></div></dl>',
                 f'<section><h2>Activation histogram</h2>{self.histogram.svg(tables.histograms[row])}</section>',
                 "<section><h2>Top contexts</h2>"]
        top_count = int(np.count_nonzero(kinds == 0))  # rows come top examples first
        if top_count:
            parts.append(f'<ol class="contexts">{"".join(items[:top_count])}</ol>')
        else:
            parts.append('<p class="empty">This feature never fired on the analysed tokens.</p>')
        parts.append("</section>")
        if top_count < len(items):
            parts.append("<section><h2>Samples by activation quantile</h2>")
            band_starts = np.flatnonzero(np.diff(bands[top_count:], prepend=np.inf)) + top_count
            for start, stop in zip(band_starts, [*band_starts[1:], len(items)], strict=True):
                low, high = activations[start:stop].min(), activations[start:stop].max()
                parts.append(f'<h3>Band {int(bands[start])} <small>activations {low:.3f}–{high:.3f}</small></h3>'
                             f'<ol class="contexts">{"".join(items[start:stop])}</ol>')
            parts.append("</section>")
        parts.append(self._logits(feature))
        parts.append(self._neighbours(feature))
        parts.append("</main></body></html>\n")
        return "".join(parts)

    def _logits(self, feature: int) -> str:
        logits = self.tables.logits.get(feature) if self.tables.logits is not None else None
        if not logits:
            return ""
        promoted = _token_list_html(logits["promoted_tokens"], logits["promoted_values"], self.token_html)
        suppressed = _token_list_html(logits["suppressed_tokens"], logits["suppressed_values"], self.token_html)
        return (f'<section><h2>Logit effects</h2><div class="columns"><div><h3>Promoted</h3>{promoted}</div>'
                f'<div><h3>Suppressed</h3>{suppressed}</div></div></section>')

    def _neighbours(self, feature: int) -> str:
        neighbours = self.tables.neighbours.get(feature) if self.tables.neighbours is not None else None
        if not neighbours or not neighbours["neighbours"]:
            return ""
        items = []
        for other, cosine in zip(neighbours["neighbours"], neighbours["cosines"], strict=False):
            other_row = self.tables.position.get(other)
            if other_row is None:  # not in features.parquet: no page to link to
                items.append(f'<li>feature {int(other)}<span class="num">cos {cosine:.3f}</span></li>')
            else:
                items.append(f'<li><a href="{int(other)}.html">feature {int(other)}</a><span class="num">cos '
                             f'{cosine:.3f}</span><span class="chips">{self.chips[other_row]}</span></li>')
        return (f'<section><h2>Nearest features (decoder cosine)</h2><ol class="neighbours">{"".join(items)}</ol>'
                '</section>')


def _index_page(summary: dict, features: int, has_map: bool) -> str:
    name = summary.get("dictionary", "atlas")
    map_link = '<a href="map.html">map</a>' if has_map else ""
    return (_head(f"{name} · Lexica atlas", "assets/site.css", SCRIPT_POLICY) +
            f'<body class="index-page"><nav class="bar"><span>Lexica atlas</span>{map_link}</nav><main>'
            f'<h1>{escape(name)}</h1><p class="summary">{features:,} features · {_summary_line(summary)}</p>'
            '<div class="controls"><input id="search" type="search" autocomplete="off" spellcheck="false" '
            'placeholder="Search: feature id, token or context word" aria-label="search features">'
            '<span id="status" role="status"></span></div>'
            '<table id="features"><thead><tr>'
            '<th data-sort="feature">feature</th><th data-sort="density">density</th>'
            '<th data-sort="max">max act.</th><th>top tokens</th><th>promoted logits</th>'
            '<th data-sort="cluster">cluster</th></tr></thead><tbody></tbody></table>'
            '<div class="pager"><button id="previous" type="button">← previous</button><span id="page"></span>'
            '<button id="next" type="button">next →</button></div>'
            '<noscript><p>The feature table needs JavaScript; feature pages are plain HTML under features/.</p>'
            '</noscript></main><script src="data/index.js"></script><script src="assets/index.js"></script>'
            '</body></html>\n')


def _map_page(summary: dict) -> str:
    name = summary.get("dictionary", "atlas")
    return (_head(f"Map · {name} · Lexica atlas", "assets/site.css", SCRIPT_POLICY) +
            '<body class="map-page"><nav class="bar"><a href="index.html">index</a>'
            f'<span>{escape(name)}: decoder directions in 2-D, coloured by cluster; scroll to zoom, drag to pan, '
            'click a point to open its feature</span><button id="reset" type="button">reset view</button></nav>'
            '<div id="stage"><canvas id="map"></canvas><div id="tooltip" hidden></div></div>'
            '<script src="data/map.js"></script><script src="assets/map.js"></script></body></html>\n')


def _data_script(variable: str, document: object) -> bytes:
    return f"window.{variable} = {script_json(document)};\n".encode()


def _rounded(values: np.ndarray, digits: int = 4) -> list[float]:
    return [float(f"{value:.{digits}g}") for value in np.nan_to_num(values.astype(np.float64))]


class _Writer:
    """Pages go out in batches through fsspec; ``index.html`` is written last by the caller."""

    def __init__(self, fs, folder: str):
        self.fs, self.folder, self.pending, self.files = fs, folder, {}, 0

    def add(self, relative_path: str, data: bytes | str) -> None:
        self.pending[storage.join(self.folder, relative_path)] = data.encode() if isinstance(data, str) else data
        if len(self.pending) >= FILES_PER_WRITE:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.fs.pipe(self.pending)
            self.files += len(self.pending)
            self.pending = {}


def build_site(analysis_folder_url: str, storage_options: dict | None = None) -> str:
    """Write ``<analysis folder>/site/`` from the atlas tables; returns the URL (or path) of its index.html.

    Locally the site is built in a hidden sibling folder and renamed into place, so ``site/`` is
    either the previous site or the finished new one. On object storage (no rename) the old site is
    removed first and ``index.html`` is written last: a site without it is one still being built.
    """
    tables = _Tables(analysis_folder_url, storage_options)
    edges = [float(edge) for edge in tables.summary.get("histogram_edges") or atlas.HISTOGRAM_EDGES]
    has_map = tables.map is not None
    fs, analysis_folder = storage.url_to_fs(analysis_folder_url, storage_options)
    final_folder = storage.join(analysis_folder, SITE_FOLDER)
    local = storage.is_local(fs)
    build_folder = storage.join(analysis_folder, f".site-build-{uuid.uuid4().hex[:8]}") if local else final_folder
    if not local and storage.exists(fs, final_folder):
        fs.rm(final_folder, recursive=True)
    if local:
        fs.makedirs(storage.join(build_folder, "features"), exist_ok=True)
        fs.makedirs(storage.join(build_folder, "data"), exist_ok=True)
        fs.makedirs(storage.join(build_folder, "assets"), exist_ok=True)
    try:
        writer = _Writer(fs, build_folder)
        _write_pages(tables, edges, has_map, writer)
        writer.flush()
        writer.add("index.html", _index_page(tables.summary, len(tables.feature_ids), has_map))
        writer.flush()
    except BaseException:
        if local:
            shutil.rmtree(build_folder, ignore_errors=True)
        raise
    if local:
        _swap_into_place(build_folder, final_folder)
    return storage.to_url(fs, storage.join(final_folder, "index.html"))


def _swap_into_place(build_folder: str, final_folder: str) -> None:
    retired = None
    if os.path.exists(final_folder):
        retired = f"{final_folder}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final_folder, retired)
    os.replace(build_folder, final_folder)
    if retired:
        shutil.rmtree(retired, ignore_errors=True)


def _write_pages(tables: _Tables, edges: list[float], has_map: bool, writer: _Writer) -> None:
    for name in ASSET_FILES:
        writer.add(f"assets/{name}", resources.files("lexica.analysis").joinpath("site_assets", name).read_bytes())

    contexts = tables.contexts
    top_contexts = contexts.filter(pc.equal(contexts["order"], 0))
    top_tokens, search_words = index_words(top_contexts, tables.feature_ids)
    logits = tables.logits or {}
    promoted = [[display_token(token or "") for token in logits[int(f)]["promoted_tokens"][:INDEX_TOKENS]]
                if int(f) in logits else [] for f in tables.feature_ids]
    clusters = ([int(tables.map[int(f)]["cluster"]) if int(f) in tables.map else None for f in tables.feature_ids]
                if has_map else None)
    search = ["\n".join(dict.fromkeys([str(int(f)), *(w.lower() for w in top), *(w.lower() for w in logit),
                                       *words]))
              for f, top, logit, words in zip(tables.feature_ids, top_tokens, promoted, search_words,
                                                  strict=True)]
    writer.add("data/index.js", _data_script("LEXICA_INDEX", {
        "feature": [int(f) for f in tables.feature_ids], "density": _rounded(tables.density),
        "max": _rounded(tables.max_activation), "top": top_tokens, "promoted": promoted if tables.logits else None,
        "cluster": clusters, "search": search,
    }))
    if has_map:
        rows = list(tables.map.values())
        writer.add("data/map.js", _data_script("LEXICA_MAP", {
            "feature": [int(row["feature"]) for row in rows],
            "x": [round(float(row["x"]), 4) for row in rows], "y": [round(float(row["y"]), 4) for row in rows],
            "cluster": [int(row["cluster"]) for row in rows],
            "top": [top_tokens[tables.position[row["feature"]]][:3] if row["feature"] in tables.position else []
                    for row in rows],
        }))
        writer.add("map.html", _map_page(tables.summary))

    pages = _FeaturePages(tables, top_tokens, edges, has_map)
    starts, stops = _group_starts(tables.context_features, tables.feature_ids)
    for first in range(0, len(tables.feature_ids), FEATURES_PER_BATCH):
        last = min(first + FEATURES_PER_BATCH, len(tables.feature_ids))
        row_start, row_stop = int(starts[first]), int(stops[last - 1])
        block = contexts.slice(row_start, row_stop - row_start)
        block_features = block["feature"].to_numpy()
        known = np.clip(np.searchsorted(tables.feature_ids, block_features), 0, len(tables.feature_ids) - 1)
        items = context_items_html(block, tables.max_activation[known])
        kinds, bands = block["order"].to_numpy(), block["band"].to_numpy()
        activations = block["activation"].to_numpy()
        for row in range(first, last):
            begin, end = int(starts[row]) - row_start, int(stops[row]) - row_start
            page = pages.page(row, items[begin:end], kinds[begin:end], bands[begin:end], activations[begin:end])
            writer.add(f"features/{int(tables.feature_ids[row])}.html", page)
