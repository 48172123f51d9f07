"""retain_freed_memory keeps a step's freed tensors for reuse: no page faults on reallocation."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Its own process: the setting is process-wide and must be measured from glibc's defaults.
SCRIPT = textwrap.dedent("""
    import resource
    import torch
    from lexica.train.memory import retain_freed_memory

    def faults(cycles=10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(cycles):
            tensors = [torch.ones(2 << 20) for _ in range(4)]  # a step's worth of 8 MiB temporaries
            del tensors
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults(2)
    default = faults()
    applied = retain_freed_memory()
    faults(2)
    print(default, applied, faults())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_step_temporaries_are_reused_without_page_faults():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    default, applied, retained = result.stdout.split()
    assert applied == "True"
    assert int(default) > 1000  # glibc hands the 32 MiB back every cycle and faults it in again
    assert int(retained) < 50, (default, retained)
