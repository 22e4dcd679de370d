"""Container output and platform events: one append-only log file per app, followed by readers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class LogBook:
    """Appends timestamped lines to ``<dir>/<app name>.log``; :meth:`follow` reads them as they come."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, app_name: str) -> Path:
        return self.directory / f"{app_name}.log"

    def write(self, app_name: str, source: str, line: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())
        with self._lock, open(self.path(app_name), "a") as f:
            f.write(f"{stamp} [{source}] {line}\n")

    def follow(
        self, app_name: str, *, from_end: bool, follow: bool, keep_going: Callable[[], bool] = lambda: True
    ) -> Iterator[str]:
        """Lines of the app's log (from its start, or only new ones); with ``follow``, wait for more."""
        path = self.path(app_name)
        path.touch()
        with open(path) as f:
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
                time.sleep(0.1)
