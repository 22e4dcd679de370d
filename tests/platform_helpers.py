"""Helpers for end-to-end platform tests: a real server process, the real CLI, app files written to disk."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WARMBOOT = str(Path(sys.executable).parent / "warmboot")
#: The columns of `warmboot snapshot list`, in order (tests read its table).
SNAPSHOT_LIST_COLUMNS = [
    "function", "key", "state", "size", "created", "made in", "restores", "restore p50/p95", "cold p50", "note",
]  # fmt: skip


class Platform:
    """A warmboot home (under /var/tmp: containers get a private /tmp) and the server running on it."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="warmboot-test-", dir="/var/tmp"))
        self.apps_dir = self.home / "appfiles"
        self.apps_dir.mkdir()
        self.env = {
            **os.environ,
            "WARMBOOT_HOME": str(self.home),
            "COLUMNS": "250",
            "WARMBOOT_GATEWAY_PORT": "0",  # a free port: test servers never collide with a user's on 8700
            **(extra_env or {}),
        }
        self.server: subprocess.Popen[bytes] | None = None

    # ----- server --------------------------------------------------------------------------------------

    def start_server(self) -> None:
        log = open(self.home / "test-server.log", "ab")  # noqa: SIM115 - kept open for the server's life
        self.server = subprocess.Popen(
            [sys.executable, "-m", "warmboot.server"], env=self.env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while not (self.home / "server.sock").exists():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start: " + (self.home / "test-server.log").read_text()[-2000:])
            time.sleep(0.02)

    def stop_server(self) -> None:
        if self.server is None:
            return
        self.cli("server", "stop", check=False, timeout=90)
        try:
            self.server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        self.server = None

    def restart_server(self) -> None:
        self.stop_server()
        self.start_server()

    def close(self) -> None:
        self.stop_server()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.home)

    # ----- apps and the CLI ----------------------------------------------------------------------------

    def write_app(self, name: str, source: str) -> Path:
        """Write an app file; ``source`` is dedented. Returns its path."""
        path = self.apps_dir / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    def cli(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run the real `warmboot` CLI against this platform; returns the finished process (text)."""
        proc = subprocess.run(
            [WARMBOOT, *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"warmboot {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def python(self, code: str, *, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet (using the SDK) in a fresh process against this platform."""
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=self.apps_dir,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"snippet exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    @property
    def gateway_url(self) -> str:
        """The HTTP gateway's base URL (the server writes it once it listens)."""
        deadline = time.monotonic() + 30
        path = self.home / "gateway.url"
        while not path.exists():
            assert time.monotonic() < deadline, "the server never wrote gateway.url"
            time.sleep(0.02)
        return path.read_text().strip()

    def log_text(self, app_name: str) -> str:
        path = self.home / "logs" / f"{app_name}.log"
        return path.read_text() if path.exists() else ""


_IN_CHANGES = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200  # MODIFY ATTRIB CLOSE_WRITE MOVED_TO CREATE DELETE
_libc = ctypes.CDLL(None, use_errno=True)


def wait_for(what: str, check: Callable[[], Any], *, watch: Path, timeout: float = 120.0) -> Any:
    """Wait until ``check()`` is true, with a deadline; returns what it returned.

    What is waited for happens in another process (a container writes into a volume, the server a log line), which
    tells nobody: ``check()`` runs again on each change to the files in the folder ``watch`` (an inotify watch,
    set before the first check so that no change between the two is missed), and not in between."""
    watch.mkdir(parents=True, exist_ok=True)
    fd = _libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
    assert fd >= 0, f"inotify_init1: {os.strerror(ctypes.get_errno())}"
    try:
        wd = _libc.inotify_add_watch(fd, os.fsencode(watch), _IN_CHANGES)
        assert wd >= 0, f"inotify_add_watch({watch}): {os.strerror(ctypes.get_errno())}"
        deadline = time.monotonic() + timeout
        while not (value := check()):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting until {what}"
            if select.select([fd], [], [], remaining)[0]:
                with contextlib.suppress(BlockingIOError):
                    while os.read(fd, 65536):  # every change so far: one check covers them all
                        pass
        return value
    finally:
        os.close(fd)
