"""glibc malloc thresholds (toolchain/allocator.py): freed tensors stay in the heap, so steps stop faulting."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from toolchain.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# allocate and free a 64 MB tensor 20 times; print the minor page faults this took
_FAULTS = """
import resource, sys, torch
from toolchain.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20).add_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_freed_blocks_are_reused_without_new_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "tuned")}
    # glibc's default maps and unmaps each 64 MB block: ~16k faults per allocation; tuned, only the first one
    assert faults["default"] > 10 * 16384
    assert faults["tuned"] < 3 * 16384


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_the_environment_can_opt_out(monkeypatch):
    monkeypatch.setenv("TWODQ_MALLOC", "default")
    assert keep_freed_memory() is False
