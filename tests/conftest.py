"""Shared test fixtures: where ../shared lives, and skips when it is absent."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """The tests run with the allocator setting every command-line tool starts with (toolchain/allocator.py)."""
    from toolchain.allocator import keep_freed_memory

    keep_freed_memory()
SHARED = Path(__import__("os").environ.get("TWODQ_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (override with TWODQ_SHARED); skip if it is absent."""
    if not (SHARED / "datasets").is_dir():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def datasets_dir(shared_dir: Path) -> Path:
    return shared_dir / "datasets"
