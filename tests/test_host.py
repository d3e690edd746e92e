"""The runtime's CPU allocator setting: freed activations are reused, not page-faulted in again."""

import subprocess
import sys

import pytest

CHILD = r"""
import resource, sys
import torch
if sys.argv[1] == "tuned":
    from malt.runtime.host import tune_allocator
    assert tune_allocator(), "mallopt refused the settings"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2):                      # warm up torch's own first-use allocations
    torch.ones(16 << 20).sum()
before = faults()
for _ in range(40):                     # forty 64 MiB activations, each freed before the next
    torch.ones(16 << 20).sum()
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_tuned_allocator_reuses_freed_memory():
    default, tuned = _faults("default"), _faults("tuned")
    # default glibc: every 64 MiB tensor is a fresh mmap, 16k pages faulted in each time (~655k in all)
    assert default > 40 * 16_000 * 0.9
    # tuned: the heap grows at most a few times (0 to 82k faults seen), then is reused
    assert tuned < default / 4
