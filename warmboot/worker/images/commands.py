"""Running a host command with its output streamed line by line, keeping the last lines for an error message."""

from __future__ import annotations

import os
import subprocess
from collections import deque
from collections.abc import Callable

Progress = Callable[[str], None]

#: How many lines of a failing tool's output an error quotes.
TAIL_LINES = 20


def run_streaming(argv: list[str], progress: Progress, prefix: str) -> tuple[int, list[str]]:
    """Run ``argv`` with stdout+stderr merged, passing each line to ``progress``; returns (rc, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                progress(f"{prefix}{line}")
    return proc.wait(), list(tail)
