"""``lexica explain``: a short explanation of each chosen feature, written by an explainer model from
the feature's examples in the atlas.

For each feature the explainer sees up to ``max_examples`` of its contexts: its top examples at
even ranks first, then its quantile samples at even ranks; the odd-ranked ones are held out, for
scoring an explanation on text the explainer never saw. In every example the tokens the feature
fires on are marked «like this».

Explanations are stored with the atlas in ``<atlas>/explanations/``: each batch of features is one
Parquet part (``feature``, ``explanation``, ``explainer``, ``prompt_tokens``, ``created_at``),
written atomically, so a feature is explained exactly when the part holding it exists. A rerun
reads the parts and skips every feature this explainer (its name: a local model's path, an
endpoint's model name) has explained; another explainer explains them again, and the newest
explanation of a feature is the one the atlas shows and ``lexica score`` scores.
"""

from __future__ import annotations

import argparse
import re
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lexica import storage
from lexica.analysis import atlas
from lexica.analysis.config import ExplainConfig
from lexica.analysis.sources import AnalysisError, resolve_dictionary_name
from lexica.config import add_knob_flags, apply_overrides, from_dict, stage_section
from lexica.progress import Progress
from lexica.run import Run

EXPLANATIONS = "explanations"
EXPLANATIONS_SCHEMA = pa.schema([("feature", pa.int32()), ("explanation", pa.string()), ("explainer", pa.string()),
                                 ("prompt_tokens", pa.int32()), ("created_at", pa.float64())])
MARK_OPEN, MARK_CLOSE = "«", "»"
SYSTEM_PROMPT = ("You explain the features of a language model. A feature is a direction in the model's "
                 "activations that fires on some tokens of a text.")
# Asked plainly ("what do the marked tokens have in common?"), small explainers answered "nouns" or
# "the same grammatical structure" for features that fire on every comma or every "be": the
# question now asks for specific answers, and the marked tokens are counted for the explainer. (It
# gives no example answers: a 1.5B explainer gave the example back for unrelated features.)
QUESTION = ("Below are text excerpts where one feature fires; the tokens it fires on are marked {open}like "
            "this{close}. What does the feature fire on? Be specific: name the tokens, words or topic it fires "
            "on, not a vague category such as 'nouns' or 'the same grammatical structure'.")
ANSWER_FORMAT = "Answer with one short, specific phrase (at most 12 words) and nothing else."
COUNTED_TOKENS = 8  # the most frequent marked tokens listed after the examples

# Lead-ins small explainers put before the answer ("The marked tokens have in common that they are
# ..."): they carry no meaning, crowd the index and the concept names, and cost the scorer tokens.
LEAD_INS = re.compile(
    r"^(?:(?:the\s+)?(?:marked|highlighted|common)\s+(?:tokens|words|theme|thread|element|feature)s?"
    r"(?:\s+(?:all|here|above|in\s+these\s+excerpts))?\s*(?:have\s+in\s+common|share|have|is|are|refers?\s+to)?"
    r"(?:\s+(?:that|is|the\s+fact\s+that))?\s*[:,-]?\s*"
    r"|(?:they|these|all\s+of\s+them|all)\s+(?:are\s+all|all\s+are|are|refer\s+to|relate\s+to)\s+"
    r"|(?:the\s+feature|it)\s+(?:fires|activates)\s+on\s+"
    r"|(?:answer|explanation)\s*:\s*)+", re.IGNORECASE)


def tidy_explanation(text: str) -> str:
    """The explanation without a lead-in, surrounding quotes or emphasis, or a final full stop
    (the model's words otherwise; an answer that is all lead-in is kept as it came)."""
    tidied = LEAD_INS.sub("", text.strip())
    while True:
        stripped = tidied.strip().rstrip(".").strip()
        if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "\"'*`":
            stripped = stripped[1:-1]  # quotes or emphasis around the whole answer, never one inside it
        if stripped == tidied:
            break
        tidied = stripped
    return tidied or text.strip()


def parse_features(spec: str, d_sae: int, density: np.ndarray | None = None) -> list[int]:
    """Feature ids of ``spec``: ``all``, ``top:N`` (densest first; needs ``density``), or a comma list
    of ids and inclusive ranges (``0-99``, ``1,5,9``, ``0-9,20``), in the order given, without repeats."""
    text = spec.strip().lower()
    if text == "all":
        return list(range(d_sae))
    if text.startswith("top:"):
        count = text[4:]
        if not count.isdigit() or int(count) < 1:
            raise AnalysisError(f"features = {spec!r}: top:N needs a positive count, e.g. top:100")
        if density is None:
            raise AnalysisError("features = top:N orders features by density, from features.parquet; run "
                                "`lexica analysis features` first")
        order = np.lexsort((np.arange(len(density)), -density))
        return order[:int(count)].tolist()
    chosen: list[int] = []
    for part in text.split(","):
        part = part.strip()
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise AnalysisError(f"features = {spec!r}: {part!r} is not an id or a range like 0-99 (expected all, "
                                "top:N, or ids and ranges separated by commas)")
        first, last = int(low), int(high) if high else int(low)
        if first > last or last >= d_sae:
            raise AnalysisError(f"features = {spec!r}: {part!r} is outside 0-{d_sae - 1} (the dictionary has "
                                f"{d_sae:,} features) or runs backwards")
        chosen.extend(range(first, last + 1))
    return list(dict.fromkeys(chosen))


@dataclass
class Example:
    tokens: list[str]
    values: list[float]
    activation: float
    doc_id: int = -1
    position: int = -1
    kind: str = "top"
    band: int = -1
    rank: int = 0


def marked_text(example: Example, marks: list[bool] | None = None) -> str:
    """The example's text with each run of marked tokens wrapped in «...»: by default the tokens the
    feature fires on; ``marks`` (one per token) marks others (fuzzing's wrongly marked texts)."""
    pieces, inside = [], False
    marks = [value > 0 for value in example.values] if marks is None else marks
    for token, firing in zip(example.tokens, marks, strict=True):
        token = token or ""
        if firing and not inside:
            stripped = token.lstrip()
            pieces.append(token[:len(token) - len(stripped)] + MARK_OPEN)  # the space stays outside the mark
            token = stripped
        elif not firing and inside:
            pieces.append(MARK_CLOSE)
        inside = firing
        pieces.append(token)
    if inside:
        pieces.append(MARK_CLOSE)
    return "".join(pieces).replace("\n", " ").strip()


def split_examples(rows: pa.Table, max_examples: int) -> tuple[list[Example], list[Example]]:
    """(shown to the explainer, held out) of one feature's context rows: even ranks shown, top examples
    first, at most ``max_examples``; everything else held out."""
    shown, held_out = [], []
    for kind in ("top", "quantile"):
        kind_rows = rows.filter(pc.equal(rows["kind"], kind)).sort_by("rank").to_pylist()
        for row in kind_rows:
            example = Example(row["tokens"], row["values"], row["activation"], row.get("doc_id", -1),
                              row.get("position", -1), kind, row.get("band", -1), row["rank"])
            (shown if row["rank"] % 2 == 0 and len(shown) < max_examples else held_out).append(example)
    return shown, held_out


def marked_token_counts(examples: list[Example], limit: int = COUNTED_TOKENS) -> list[tuple[str, int]]:
    """The tokens the feature fires on in ``examples`` (without surrounding spaces), most frequent
    first (ties: first seen first), with their counts."""
    counts: dict[str, int] = {}
    for example in examples:
        for token, value in zip(example.tokens, example.values, strict=True):
            if value > 0:
                text = (token or "").strip() or repr(token or "")
                counts[text] = counts.get(text, 0) + 1
    return sorted(counts.items(), key=lambda item: -item[1])[:limit]


def prompt_messages(examples: list[Example]) -> list[dict[str, str]]:
    lines = [QUESTION.format(open=MARK_OPEN, close=MARK_CLOSE), ""]
    lines += [f"Example {number}: {marked_text(example)}" for number, example in enumerate(examples, 1)]
    if counted := marked_token_counts(examples):
        listed = ", ".join(f"{MARK_OPEN}{token}{MARK_CLOSE} {count}x" for token, count in counted)
        lines += ["", f"Marked tokens, most frequent first: {listed}"]
    lines += ["", ANSWER_FORMAT]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def read_feature_rows(folder_url: str, name: str, features: list[int], columns: list[str],
                      storage_options: dict | None = None) -> pa.Table:
    """The rows of ``features`` in an atlas table, reading only the row groups whose feature range holds one."""
    fs, folder = storage.url_to_fs(folder_url, storage_options)
    path = storage.join(folder, f"{name}.parquet")
    if not storage.exists(fs, path):
        raise atlas.AtlasMissingError(f"{folder_url} has no {name}.parquet; run `lexica analysis features` first")
    handle = storage.open_parquet(fs, path)
    column = handle.schema_arrow.get_field_index("feature")
    wanted = np.array(sorted(features), dtype=np.int64)
    groups = []
    for group in range(handle.metadata.num_row_groups):
        stats = handle.metadata.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            groups.append(group)
            continue
        first = np.searchsorted(wanted, stats.min)
        if first < len(wanted) and wanted[first] <= stats.max:
            groups.append(group)
    table = handle.read_row_groups(groups, columns=columns, use_threads=False) if groups else \
        handle.schema_arrow.empty_table().select(columns)
    return table.filter(pc.is_in(table["feature"], pa.array(wanted, pa.int32())))


class AtlasParts:
    """Records committed to an atlas folder as Parquet parts (``<atlas>/<name>/part-*.parquet``), each
    written atomically: a record exists exactly when the part holding it does."""

    def __init__(self, atlas_url: str, name: str, schema: pa.Schema, storage_options: dict | None = None, fs=None):
        """``fs`` given: ``atlas_url`` is that file system's path of the atlas folder."""
        if fs is None:
            fs, atlas_url = storage.url_to_fs(atlas_url, storage_options)
        self.fs, self.folder, self.schema = fs, storage.join(atlas_url, name), schema

    def parts(self) -> list[str]:
        if not storage.exists(self.fs, self.folder):
            return []
        return sorted(path for path in self.fs.ls(self.folder, detail=False) if path.endswith(".parquet"))

    def read(self) -> pa.Table:
        tables = [storage.open_parquet(self.fs, path).read(use_threads=False) for path in self.parts()]
        return pa.concat_tables(tables).cast(self.schema) if tables else self.schema.empty_table()

    def latest(self, columns: list[str] | None = None) -> pa.Table:
        """The newest record of each feature, sorted by feature (``columns`` of it, default all)."""
        table = self.read().sort_by([("feature", "ascending"), ("created_at", "descending")])
        features = table["feature"].to_numpy()
        first = np.flatnonzero(np.diff(features, prepend=-1)) if len(features) else np.empty(0, np.int64)
        latest = table.take(pa.array(first, pa.int64()))
        return latest.select(columns) if columns else latest

    def features(self) -> set[int]:
        return set(self.read().column("feature").to_pylist())

    def commit(self, rows: list[dict]) -> str:
        """Write one part atomically: its records exist once this returns."""
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self.fs.makedirs(self.folder, exist_ok=True)
        path = storage.join(self.folder, f"part-{rows[0]['feature']:08d}-{uuid.uuid4().hex[:8]}.parquet")
        with storage.atomic_open(self.fs, path) as handle:
            pq.write_table(table, handle, compression="zstd")
        return path


class ExplanationStore(AtlasParts):
    """The committed explanations of one atlas, under ``<atlas>/explanations/``."""

    def __init__(self, atlas_url: str, storage_options: dict | None = None, fs=None):
        super().__init__(atlas_url, EXPLANATIONS, EXPLANATIONS_SCHEMA, storage_options, fs)

    def latest(self, columns: list[str] | None = None) -> pa.Table:
        return super().latest(columns or ["feature", "explanation"])

    def explained(self, by: str | None = None) -> set[int]:
        """Features with an explanation (``by`` given: one by that explainer)."""
        table = self.read()
        if by is not None:
            table = table.filter(pc.equal(table["explainer"], by))
        return set(table.column("feature").to_pylist())


def refresh_site(folder_url: str, config) -> None:
    """Rebuild the atlas's site (when ``config.site``) if it misses committed explanations or scores,
    including those of an earlier run killed before its own rebuild."""
    if config.site:
        from lexica.analysis.site import build_site, site_is_stale

        if site_is_stale(folder_url, config.storage_options):
            build_site(folder_url, config.storage_options)


def explain(config: ExplainConfig, explainer=None) -> dict:
    """Explain the chosen features not yet explained; ``explainer`` (an object with ``name`` and
    ``complete(list of message lists) -> (texts, prompt token counts)``) defaults to a local chat model."""
    from lexica.analysis.explainers import open_backend

    config.validate()
    name = resolve_dictionary_name(config.run, config.dictionary, config.storage_options)
    folder = Run(config.run, config.storage_options).atlas_url(name)
    summary = atlas.read_summary(folder, config.storage_options)
    density = None
    if config.features.strip().lower().startswith("top:"):
        table = atlas.read_table(folder, "features", config.storage_options).select(["feature", "density"])
        density = np.zeros(int(summary["d_sae"]))
        density[table["feature"].to_numpy()] = table["density"].to_numpy()
    chosen = parse_features(config.features, int(summary["d_sae"]), density)
    store = ExplanationStore(folder, config.storage_options)
    explainer = explainer or open_backend(config.explainer, config, config.max_new_tokens)
    # Another explainer explains again (its explanation, the newest, is then the one shown).
    done = store.explained(by=explainer.name)
    todo = [feature for feature in chosen if feature not in done]
    progress = Progress("explain", len(todo), "features")
    columns = ["feature", "kind", "rank", "activation", "tokens", "values"]
    written, without_examples, prompt_total = 0, 0, 0
    for start in range(0, len(todo), config.features_per_part):
        batch = todo[start:start + config.features_per_part]
        rows = read_feature_rows(folder, "contexts", batch, columns, config.storage_options)
        prompts, asked = [], []
        for feature in batch:
            shown, _ = split_examples(rows.filter(pc.equal(rows["feature"], feature)), config.max_examples)
            if shown:
                prompts.append(prompt_messages(shown))
                asked.append(feature)
            else:
                without_examples += 1  # never fired on the analysed tokens: nothing to explain from
        if asked:
            texts, prompt_tokens = explainer.complete(prompts)
            store.commit([{"feature": feature, "explanation": tidy_explanation(text), "explainer": explainer.name,
                           "prompt_tokens": count, "created_at": time.time()}
                          for feature, text, count in zip(asked, texts, prompt_tokens, strict=True)])
            written += len(asked)
            prompt_total += sum(prompt_tokens)
        progress.update(start + len(batch), prompt_total, f"{written} explained")
    progress.update(len(todo), prompt_total, f"{written} explained", final=True)
    refresh_site(folder, config)
    return {"atlas": folder, "chosen": len(chosen), "already_explained": len(chosen) - len(todo),
            "explained": written, "without_examples": without_examples, "explainer": explainer.name}


EXPLAIN_FLAGS = {"run": "run", "dictionary": "dictionary", "features": "features", "explainer": "explainer",
                 "device": "device", "workers": "workers", "max_examples": "max_examples", "batch_size": "batch_size"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lexica explain",
                                     description="Explain features with an explainer model, from their atlas "
                                                 "examples; explanations are stored with the atlas.")
    add_knob_flags(parser, ExplainConfig, "explain", EXPLAIN_FLAGS)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    values = stage_section(args.config, "explain") if args.config else {}
    values = apply_overrides(ExplainConfig, values, args, EXPLAIN_FLAGS, args.set)
    result = explain(from_dict(ExplainConfig, values, "explain"))
    print(f"explained {result['explained']} features ({result['already_explained']} already were by this explainer, "
          f"{result['without_examples']} never fired) with {result['explainer']}: {result['atlas']}/{EXPLANATIONS}")
    return 0
