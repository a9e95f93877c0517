"""glibc malloc thresholds (toolchain/allocator.py): freed tensors stay in the heap, so steps stop faulting."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from toolchain import allocator
from toolchain.allocator import keep_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# allocate, fill and free a 64 MB block 20 times; print the minor page faults this took (the module is loaded from
# its file: importing the toolchain package would import torch, seconds per process)
_FAULTS = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
if sys.argv[1] == "tuned":
    assert allocator.keep_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    block = b"\\x01" * (64 << 20)
    del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_freed_blocks_are_reused_without_new_page_faults():
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode, allocator.__file__], capture_output=True,
                                       text=True, check=True).stdout) for mode in ("default", "tuned")}
    # glibc's default maps and unmaps each 64 MB block: ~16k faults per allocation; tuned, only the first one
    assert faults["default"] > 10 * 16384
    assert faults["tuned"] < 3 * 16384


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_the_environment_can_opt_out(monkeypatch):
    monkeypatch.setenv("TWODQ_MALLOC", "default")
    assert keep_freed_memory() is False
