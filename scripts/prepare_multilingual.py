"""The multilingual demo corpus: the Debian Reference (Osamu Aoki; GPL-2+) in English, German,
French, Spanish and Italian, from Debian's ``debian-reference-<lang>`` packages (version 2.100).

Each chapter's paragraphs (``<p>``) are paired across languages by position, in the chapters whose
paragraph count is the same in every language. A pair is kept when its English paragraph has at
least ``MIN_WORDS`` words and every translation differs from the English (untranslated paragraphs
are left in English by the translators). Each kept paragraph becomes one document per language,
one JSON object per line: ``text``, ``lang``, ``paragraph`` (``ch03:17``: the same id in every
language). Documents go paragraph by paragraph, the languages of one paragraph together.

Usage: python scripts/prepare_multilingual.py [--dest assets] [--languages en,de,fr,es,it]
Writes ``<dest>/corpora/debian-reference.jsonl``; idempotent (a finished file is never rebuilt).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

VERSION = "2.100"
LANGUAGES = ("en", "de", "fr", "es", "it")
CHAPTERS = [f"ch{number:02d}" for number in range(1, 13)]
MIN_WORDS = 8


class Paragraphs(HTMLParser):
    """The text of each ``<p>`` of a page, whitespace collapsed; code inside a paragraph is kept."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth, self.pieces, self.found = 0, [], []

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            if self.depth == 0:
                self.pieces = []
            self.depth += 1

    def handle_endtag(self, tag):
        if tag == "p" and self.depth:
            self.depth -= 1
            if self.depth == 0:
                self.found.append(re.sub(r"\s+", " ", "".join(self.pieces)).strip())

    def handle_data(self, data):
        if self.depth:
            self.pieces.append(data)


def page_paragraphs(path: Path) -> list[str]:
    parser = Paragraphs()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser.found


def download(languages: tuple[str, ...], folder: Path) -> Path:
    """The packages' pages, extracted under ``folder``: ``apt-get download`` needs no root."""
    packages = [f"debian-reference-{lang}={VERSION}" for lang in languages]
    subprocess.run(["apt-get", "download", "-q", *packages], cwd=folder, check=True, capture_output=True)
    for deb in folder.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "root")], check=True)
    return folder / "root" / "usr" / "share" / "debian-reference"


def aligned_documents(pages: Path, languages: tuple[str, ...]) -> tuple[list[dict], dict]:
    documents, skipped = [], {"chapters": [], "short": 0, "untranslated": 0}
    for chapter in CHAPTERS:
        by_language = {lang: page_paragraphs(pages / f"{chapter}.{lang}.html") for lang in languages}
        if len({len(paragraphs) for paragraphs in by_language.values()}) != 1:
            skipped["chapters"].append(chapter)  # a translation added or dropped a paragraph: no safe pairing
            continue
        for index, english in enumerate(by_language["en"]):
            if len(english.split()) < MIN_WORDS:
                skipped["short"] += 1
                continue
            if any(by_language[lang][index] == english for lang in languages if lang != "en"):
                skipped["untranslated"] += 1
                continue
            documents += [{"text": by_language[lang][index], "lang": lang, "paragraph": f"{chapter}:{index}"}
                          for lang in languages]
    return documents, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=Path("assets"))
    parser.add_argument("--languages", default=",".join(LANGUAGES))
    args = parser.parse_args()
    languages = tuple(lang.strip() for lang in args.languages.split(",") if lang.strip())
    if "en" not in languages:
        raise SystemExit("--languages must include en: paragraphs are paired against the English")
    target = args.dest / "corpora" / "debian-reference.jsonl"
    if target.exists():
        print(f"[multilingual] already prepared: {target}")
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debian-reference-") as scratch:
        pages = download(languages, Path(scratch))
        documents, skipped = aligned_documents(pages, languages)
    partial = target.with_suffix(".jsonl.partial")
    with partial.open("w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")
    partial.rename(target)
    per_language = len(documents) // len(languages)
    print(f"[multilingual] {per_language} paragraphs in each of {', '.join(languages)} ({len(documents)} documents; "
          f"left out: chapters {', '.join(skipped['chapters']) or 'none'} (paragraph counts differ), "
          f"{skipped['short']} short, {skipped['untranslated']} untranslated): {target}")


if __name__ == "__main__":
    main()
