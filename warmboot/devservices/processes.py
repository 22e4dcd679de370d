"""Stopping the processes the dev services, tests and benchmarks start."""

from __future__ import annotations

import subprocess
from pathlib import Path

from warmboot.worker import container


def stop(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds; waits for it either way."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_agent(proc: subprocess.Popen, home: Path) -> None:
    """An agent's machine dies: the agent SIGKILLed, then every container it ran (through their cgroups)."""
    proc.kill()
    proc.wait()
    container.remove_leftovers(home / "containers", f"the killed agent in {home}")
