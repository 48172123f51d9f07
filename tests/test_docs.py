"""README stays true: every config knob is documented, and --help describes the same knobs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from analysis.config import AnalysisConfig
from harvest.config import HarvestConfig, field_help
from train.config import TrainConfig

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_readme_reference_lists_every_knob_with_its_help():
    for name, _, help_text in field_help(HarvestConfig) + field_help(TrainConfig) + field_help(AnalysisConfig):
        assert f"| `{name}` |" in README, f"README's configuration reference lacks {name}"
        assert help_text in README, f"README's description of {name} differs from config.py"


def test_cli_help_and_print_config(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "harvest", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--hook" in help_text and "resid_post.L" in help_text
    printed = subprocess.run([sys.executable, "-m", "harvest", "--config", "examples/demo.yaml", "--layer", "3",
                              "--print-config"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    assert "hook: resid_post.3" in printed and "sotu.jsonl" in printed


def test_analysis_usage_names_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "analysis", "--help"], capture_output=True, text=True, check=True)
    for subcommand in ("features", "steer", "monitor", "browse"):
        assert subcommand in result.stdout
    features_help = subprocess.run([sys.executable, "-m", "analysis", "features", "--help"], capture_output=True,
                                   text=True, check=True).stdout
    assert "--dictionary" in features_help and "--set" in features_help
