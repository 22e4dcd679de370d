"""Running a host command with its output streamed line by line, keeping the last lines for an error message."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Sequence

Progress = Callable[[str], None]

#: How many lines of a failing tool's output an error quotes.
TAIL_LINES = 20


def run_streaming(
    argv: Sequence[str],
    on_line: Progress,
    *,
    prefix: str = "",
    c_locale: bool = False,
    skip_blank: bool = False,
) -> tuple[int, list[str]]:
    """Run ``argv`` with stdout+stderr merged, passing each line to ``on_line``; returns (status, last lines).

    Lines reach ``on_line`` as ``prefix + line``; the last :data:`TAIL_LINES` are returned without the prefix.
    ``c_locale`` runs it with ``LC_ALL=C`` (messages that can be quoted and matched); ``skip_blank`` drops empty
    lines and trailing white space (the progress output of apt and skopeo). The
    command runs in its own session: if this call is interrupted (``on_line`` raises, the thread is stopped), the
    whole session is killed, so nothing it started outlives the step.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, "LC_ALL": "C"} if c_locale else None,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if skip_blank:
                line = line.rstrip()
                if not line:
                    continue
            tail.append(line)
            on_line(prefix + line)
        status = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: stop the command and whatever it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return status, list(tail)
