"""The docs stay true: the configuration reference is generated from the knobs, what is cited exists,
and --help describes the same knobs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from lexica import reference
from lexica.analysis.config import AnalysisConfig
from lexica.config import field_help
from lexica.harvest.config import HarvestConfig
from lexica.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_reference_is_generated_from_the_knobs():
    written = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert written == reference.markdown(), "docs/configuration.md is stale: python -m lexica.reference > " \
                                            "docs/configuration.md"
    for name, _, help_text in field_help(HarvestConfig) + field_help(TrainConfig) + field_help(AnalysisConfig):
        assert f"| `{name}` |" in written and help_text in written, name


def test_every_document_cited_exists():
    """README's links and every docs/… path named in code, docs or configs point at real files."""
    cited = set(re.findall(r"\]\((docs/[\w./-]+\.(?:md|png))\)", README))
    assert len(cited) >= 10
    folders = ["lexica", "harvest", "train", "analysis", "deploy", "tests", "bench", "scripts", "examples", "docs"]
    # Hidden folders (bench/.venv-peers, bench/.real-activations) hold others' files and data, not ours.
    texts = [*ROOT.glob("*.md"), *(path for folder in folders for path in (ROOT / folder).rglob("*")
                                   if path.suffix in (".py", ".md", ".yaml", ".sh", ".js", ".html")
                                   and not any(part.startswith(".") for part in path.relative_to(ROOT).parts))]
    for path in texts:
        text = path.read_text(encoding="utf-8")
        cited |= set(re.findall(r"\b(docs/[\w-]+\.md)", text))
        assert path.name == "test_docs.py" or "DESIGN.md" not in text, f"{path} cites DESIGN.md, not in the repo"
    missing = sorted(path for path in cited if not (ROOT / path).is_file())
    assert not missing, f"cited but missing: {missing}"


def test_readme_is_a_front_page():
    assert len(README.splitlines()) <= 100
    assert "make demo" in README and "make test" in README and "docs/images/" in README


def lexica(*arguments: str) -> str:
    """What ``python -m lexica ARGUMENTS`` prints (it must succeed), run from the repository root."""
    return subprocess.run([sys.executable, "-m", "lexica", *arguments], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout


def test_cli_help_and_print_config(tmp_path):
    help_text = lexica("harvest", "--help")
    assert "--hook" in help_text and "resid_post.L" in help_text
    printed = lexica("harvest", "--config", "examples/demo.yaml", "--layer", "3", "--print-config")
    assert "hook: resid_post.3" in printed and "sotu.jsonl" in printed


def test_analysis_usage_names_every_subcommand():
    usage = lexica("analysis", "--help")
    for subcommand in ("features", "steer", "monitor", "browse"):
        assert subcommand in usage
    features_help = lexica("analysis", "features", "--help")
    assert "--dictionary" in features_help and "--set" in features_help
