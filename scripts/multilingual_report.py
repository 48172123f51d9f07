"""Which features fire on the same concept in several languages: a report from a multilingual atlas.

Reads an atlas built with ``analysis.label_field: lang`` over a corpus whose rows carry ``lang`` and
``paragraph`` (``scripts/prepare_multilingual.py``: the same paragraph in several languages), and
reports two things:

1. the features whose top examples come from at least ``--min-languages`` languages, with one
   example per language (the token it fires on marked «like this»); many fire on strings that are
   the same in every language (paths, URLs, numbers, names);
2. the stricter test of one concept across languages: features whose examples (top and quantile)
   include the *same paragraph* in at least ``--min-languages`` languages, firing there on
   *different* words: the feature follows the translation of a word, not its spelling.

Usage: python scripts/multilingual_report.py [--run runs/multilingual] [--dictionary NAME]
       [--min-languages 3] [--show 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from lexica.analysis import atlas
from lexica.analysis.labels import document_labels
from lexica.analysis.sources import resolve_dictionary_name
from lexica.run import Run
from lexica.store import ActivationStore


def window_text(row: dict, before: int = 10, after: int = 4) -> str:
    centre = row["center"]
    start, stop = max(0, centre - before), min(len(row["tokens"]), centre + after + 1)
    pieces = []
    for index in range(start, stop):
        token = (row["tokens"][index] or "").replace("\n", " ")
        if index == centre:  # the spaces around the token stay outside the mark
            token = f"{token[:len(token) - len(token.lstrip())]}«{token.strip()}»{token[len(token.rstrip()):]}"
        pieces.append(token)
    return "".join(pieces).strip()


def report(run: str, dictionary: str | None, min_languages: int, show: int) -> tuple[list[str], dict]:
    name = resolve_dictionary_name(run, dictionary)
    folder = Run(run).atlas_url(name)
    summary = atlas.read_summary(folder)
    manifest = ActivationStore(summary["store"]).manifest
    languages = document_labels(manifest["corpus"], "lang")
    paragraphs = document_labels(manifest["corpus"], "paragraph")
    contexts = atlas.read_table(folder, "contexts").select(["feature", "kind", "rank", "activation", "doc_id",
                                                           "tokens", "center"]).to_pylist()
    translated = translated_concepts(contexts, languages, paragraphs, min_languages)
    explanations = {}
    if Path(folder, "explanations").exists():
        from lexica.analysis.explain import ExplanationStore

        latest = ExplanationStore(folder).latest()
        explanations = dict(zip(latest["feature"].to_pylist(), latest["explanation"].to_pylist(), strict=True))
    tops = collections.defaultdict(list)
    for row in contexts:
        if row["kind"] == "top":
            tops[row["feature"]].append(row)
    found = []
    for feature, rows in tops.items():
        spoken = collections.Counter(languages.get(row["doc_id"], "?") for row in rows)
        by_paragraph = collections.defaultdict(set)
        for row in rows:
            by_paragraph[paragraphs.get(row["doc_id"])].add(languages.get(row["doc_id"]))
        shared = sum(1 for langs in by_paragraph.values() if len(langs) >= 2)
        if len(spoken) >= min_languages:
            found.append((len(spoken), shared, feature, spoken, rows))
    found.sort(key=lambda item: (-item[0], -item[1], item[2]))
    facts = {"dictionary": name, "features_with_examples": len(tops), "multilingual": len(found),
             "min_languages": min_languages, "by_languages": collections.Counter(item[0] for item in found),
             "with_shared_paragraphs": sum(1 for item in found if item[1])}
    lines = [f"Dictionary `{name}` ({summary['d_sae']:,} features, {summary['tokens']:,} tokens of "
             f"{', '.join(sorted(set(languages.values())))}): of {len(tops):,} features with top examples, "
             f"**{len(found):,} have top examples in ≥ {min_languages} languages** "
             + ", ".join(f"{count:,} in {langs}" for langs, count in sorted(facts["by_languages"].items(),
                                                                              reverse=True))
             + f"; {facts['with_shared_paragraphs']:,} of them fire on the same paragraph in two or more "
               "languages.", ""]
    for count, shared, feature, spoken, rows in found[:show]:
        explanation = f" — explained as “{explanations[feature]}”" if feature in explanations else ""
        profile = ", ".join(f"{lang} {n}" for lang, n in spoken.most_common())
        lines += [f"### Feature {feature}: {count} languages ({profile}); {shared} paragraphs in several "
                  f"languages{explanation}", ""]
        seen = set()
        for row in sorted(rows, key=lambda r: r["rank"]):
            lang = languages.get(row["doc_id"], "?")
            if lang in seen:
                continue
            seen.add(lang)
            lines.append(f"- **{lang}** ({row['activation']:.1f}, paragraph {paragraphs.get(row['doc_id'])}): "
                         f"{window_text(row)}")
        lines.append("")
    facts["translated"] = len(translated)
    lines += [f"## One concept, different words: {len(translated):,} features", "",
              f"Features that fire on the same paragraph in ≥ {min_languages} languages, on a different word in "
              "each (the window around the token it fires on, per language):", ""]
    for feature, paragraph, rows in translated[:show]:
        explanation = f" — explained as “{explanations[feature]}”" if feature in explanations else ""
        lines += [f"### Feature {feature}, paragraph {paragraph}{explanation}", ""]
        lines += [f"- **{languages[row['doc_id']]}** ({row['activation']:.1f}): {window_text(row)}" for row in rows]
        lines.append("")
    return lines, facts


def centre_word(row: dict) -> str:
    return (row["tokens"][row["center"]] or "").strip().lower()


def translated_concepts(contexts: list[dict], languages: dict, paragraphs: dict,
                        min_languages: int) -> list[tuple[int, str, list[dict]]]:
    """(feature, paragraph, one example per language) for the features that fire on one paragraph in
    ``min_languages`` or more languages on as many different words; most languages first."""
    by_feature = collections.defaultdict(list)
    for row in contexts:
        by_feature[row["feature"]].append(row)
    found = []
    for feature, rows in by_feature.items():
        by_paragraph = collections.defaultdict(dict)
        for row in sorted(rows, key=lambda r: -r["activation"]):
            by_paragraph[paragraphs.get(row["doc_id"])].setdefault(languages.get(row["doc_id"]), row)
        best = None
        for paragraph, per_language in by_paragraph.items():
            words = {centre_word(row) for row in per_language.values()}
            if len(per_language) >= min_languages and len(words) >= min_languages and (
                    best is None or len(per_language) > len(best[1])):
                best = (paragraph, per_language)
        if best:
            found.append((feature, best[0], [best[1][lang] for lang in sorted(best[1])]))
    found.sort(key=lambda item: (-len(item[2]), item[0]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/multilingual")
    parser.add_argument("--dictionary", default=None)
    parser.add_argument("--min-languages", type=int, default=3)
    parser.add_argument("--show", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here as well")
    args = parser.parse_args()
    lines, _ = report(args.run, args.dictionary, args.min_languages, args.show)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
