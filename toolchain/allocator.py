"""Keep large freed blocks in the process heap (glibc): PyTorch on CPU otherwise pays page faults on every step.

glibc serves an allocation above its mmap threshold (at most 32 MB by its own adjustment) with a fresh
``mmap`` and returns it with ``munmap`` when freed, and gives the top of the heap back to the system above
its trim threshold. A training or evaluation step of an SR transformer allocates and frees tensors of tens to
hundreds of MB (activations, attention maps, the fake quantizers' temporaries) every time, so each step
faults its memory in again. Measured with ``2dq-calibrate`` on DAT-light x4 W4A4 (DOBI, transforms and 10
block-reconstruction steps per block, 16 patches, 2 threads, this 2-core machine, twice each): 176 / 171 s
with glibc's defaults, 100 / 90 s with the thresholds raised; system time 130 s -> 3.8 s, minor page faults
74 million -> 0.8 million; the artifacts byte-identical (``benchmarks/reconstruct.md``). The cost: freed
memory stays with the process until it ends (its peak, which it had touched anyway).

:func:`keep_freed_memory` sets both thresholds with ``mallopt`` (a no-op off glibc, or with
``TWODQ_MALLOC=default`` in the environment). The command-line tools call it at start.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: both thresholds: blocks up to 1 GiB come from the heap and stay there when freed
THRESHOLD = 1 << 30
ENV = "TWODQ_MALLOC"


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; ``True`` if both were set."""
    if os.environ.get(ENV, "").lower() == "default":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD))
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc: mmap and trim thresholds %d bytes (%s)", THRESHOLD, "set" if done else "refused")
    return done
