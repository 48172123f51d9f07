"""Lexica and SAELens both ways against the real SAELens package, which lives in a venv of its own
(``make peers``; CI makes it and sets LEXICA_REQUIRE_PEERS=1, so there this test cannot skip):
scripts/check_saelens_interop.py exports every Lexica architecture (and transcoder) and loads it in SAELens, saves
every SAELens architecture Lexica imports and imports it, and compares what both compute."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / "bench" / ".venv-peers" / "bin" / "python"


def test_every_architecture_round_trips_through_the_real_saelens():
    if not PEERS_PYTHON.exists():
        if os.environ.get("LEXICA_REQUIRE_PEERS"):
            pytest.fail(f"LEXICA_REQUIRE_PEERS is set but {PEERS_PYTHON} does not exist: run make peers")
        pytest.skip("no peers venv with SAELens (make peers)")
    result = subprocess.run([str(PEERS_PYTHON), "scripts/check_saelens_interop.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert len(lines) == 27 and all(line.startswith("ok") for line in lines), result.stdout
