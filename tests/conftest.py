"""Shared test fixtures: where ../shared lives, and skips when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _worker_threads() -> int | None:
    """Compute threads of one worker of ``pytest -n N`` (None outside one): the cores shared out, so that N workers
    and the tools they launch do not each spread over all of them (on this project's two cores: 2148 s with two
    workers of two threads, 1557 s in one process, 982-1190 s with two workers of one thread)."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not os.environ.get("PYTEST_XDIST_WORKER") or not workers:
        return None
    return max(1, len(os.sched_getaffinity(0)) // int(workers))


# The quantizer's compiled kernels (toolchain/quant/compiled.py) cost seconds of compiling per kernel and process
# and pay only on large tensors: the tests run them eagerly (the same math), except
# tests/toolchain/quant/test_compiled.py, which turns compiling on and compares the two.
os.environ.setdefault("TWODQ_COMPILE", "0")

WORKER_THREADS = _worker_threads()
if WORKER_THREADS:
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)   # the tools a worker launches inherit it


def pytest_configure(config: pytest.Config) -> None:
    """The tests run with the allocator setting every command-line tool starts with (toolchain/allocator.py)."""
    from toolchain.allocator import keep_freed_memory

    keep_freed_memory()
    if WORKER_THREADS:
        import torch

        torch.set_num_threads(WORKER_THREADS)


SHARED = Path(os.environ.get("TWODQ_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (override with TWODQ_SHARED); skip if it is absent."""
    if not (SHARED / "datasets").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def datasets_dir(shared_dir: Path) -> Path:
    return shared_dir / "datasets"
