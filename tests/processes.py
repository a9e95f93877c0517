"""Helpers for tests that run the real tools as processes."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path


def kill_at_first_checkpoint(process: subprocess.Popen, checkpoint: Path, timeout: float) -> None:
    """SIGKILL ``process`` (started with ``stderr=PIPE``) as soon as ``checkpoint`` appears; fail the test if
    the process ends first or nothing appears within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not checkpoint.exists():
        assert process.poll() is None, f"the process ended before its first checkpoint: {process.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
