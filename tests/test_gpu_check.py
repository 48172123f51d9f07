"""The GPU check script runs end to end (here on the CPU, tiny): a session lent a GPU runs it as is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_runs_and_prints_its_table():
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--device", "cpu"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1, result.stdout
    cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
    assert cells[1] == "3 (to block 2)" and int(cells[2].replace(",", "")) > 1000
    assert 0 < float(cells[5]) and cells[6].endswith("%")
    training = [line for line in result.stdout.splitlines() if line.startswith("| topk |")]
    assert [row.split("|")[4].strip() for row in training] == ["fp32", "bf16-mixed"], result.stdout
    for row in training:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[5].replace(",", "")) > 0 and cells[7].endswith("%") and float(cells[8]) > 0
    parity = [line for line in result.stdout.splitlines()
              if line.startswith(("| harvest", "| one TopK step", "| statistics pass", "| steered generation"))]
    assert len(parity) == 4, result.stdout
    # The CPU against itself: every path gives the same numbers (on a GPU the table shows the gaps).
    assert parity[0].endswith("| 0.0e+00 |") and "100.0%; 0.0e+00" in parity[2] and parity[3].endswith("| 16/16 |")
