"""examples/quickstart.py, which uses only the public API, runs end to end on the demo model and
corpus (a small run made by the script itself with --quick)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quickstart_runs_on_the_demo_assets(tmp_path):
    assert (ROOT / "assets" / "models" / "smollm2-135m-instruct").is_dir(), "demo assets missing: run `make assets`"
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "examples/quickstart.py", str(run), "--quick"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "store resid_post.15:" in out and "of d_model 576" in out
    assert "dictionary topk-resid_post.15-8x-k32: 4608 features over 576 dimensions" in out
    assert "ActiveFeatures(" in out and "strongest:" in out and "densest features:" in out
    # The script used the run it was given, and a second run only reads it.
    assert (run / "dictionaries" / "topk-resid_post.15-8x-k32" / "final" / "sae_weights.safetensors").is_file()
    again = subprocess.run([sys.executable, "examples/quickstart.py", str(run)], cwd=ROOT, capture_output=True,
                           text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert again.returncode == 0 and "[harvest]" not in again.stderr, again.stderr[-2000:]
