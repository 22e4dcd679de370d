"""Container output and platform events: one append-only log file per app, rotated, followed by readers."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: A log file is rotated (to ``<app>.log.1``, replacing the previous one) when it reaches this size.
DEFAULT_MAX_BYTES = int(os.environ.get("WARMBOOT_LOG_MAX_BYTES", str(64 << 20)))


class LogBook:
    """Appends timestamped lines to ``<dir>/<app name>.log``; :meth:`follow` reads them as they come.

    An app keeps at most about twice ``max_bytes`` of logs: the current file and the one before it.
    """

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, app_name: str) -> Path:
        return self.directory / f"{app_name}.log"

    def write(self, app_name: str, source: str, line: str) -> None:
        # One record per line, whatever the container printed: a bare carriage return would let its output
        # start a line of its own without the "[function container]" prefix (a forged "[warmboot]" line).
        line = line.replace("\r", "\\r")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        path = self.path(app_name)
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                if path.stat().st_size >= self.max_bytes:
                    os.replace(path, path.with_name(path.name + ".1"))
            with open(path, "a") as f:
                f.write(f"{stamp} [{source}] {line}\n")

    def follow(
        self, app_name: str, *, from_end: bool, follow: bool, keep_going: Callable[[], bool] = lambda: True
    ) -> Iterator[str]:
        """Lines of the app's log (from its start, the rotated file first, or only new ones); with ``follow``,
        wait for more, moving on to the new file when the log is rotated."""
        path = self.path(app_name)
        path.touch()
        if not from_end:
            with contextlib.suppress(FileNotFoundError), open(path.with_name(path.name + ".1"), newline="\n") as old:
                yield from (line.rstrip("\n") for line in old)
        f = open(path, newline="\n")  # noqa: SIM115 - reopened below when the log is rotated
        try:
            if from_end:
                f.seek(0, 2)
            pending = ""
            while True:
                chunk = f.readline()
                if chunk:
                    pending += chunk
                    if pending.endswith("\n"):
                        yield pending.rstrip("\n")
                        pending = ""
                    continue
                if not follow or not keep_going():
                    return
                if _rotated(path, f.fileno()):
                    # What the old file got between our last read and the rotation, then the new file.
                    rest = pending + f.read()
                    yield from rest.removesuffix("\n").split("\n") if rest else ()
                    pending = ""
                    f.close()
                    f = open(path, newline="\n")  # noqa: SIM115
                    continue
                time.sleep(0.1)
        finally:
            f.close()


def _rotated(path: Path, fd: int) -> bool:
    """Whether ``path`` is no longer the file open as ``fd`` (the log was rotated)."""
    try:
        return os.stat(path).st_ino != os.fstat(fd).st_ino
    except FileNotFoundError:
        return False
