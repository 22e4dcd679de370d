"""Running the CRIU binary and reading its log.

CRIU is used as a program rather than through its RPC service: one process per dump or restore keeps
failures isolated, and lets N restores of one snapshot run in parallel without a shared daemon.
"""

from __future__ import annotations

import functools
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from warmboot import config
from warmboot.errors import HostSetupError

# Lines CRIU logs as errors on every run here that mean nothing (see docs/snapshot-engine.md).
_HARMLESS = (re.compile(r"Can't setup RLIMIT_NOFILE for self"),)
_ERROR_LINE = re.compile(r"^(?:\([\d.]+\))?\s*(?:\d+:\s+)?Error\s+\((?P<where>[^)]*)\):\s*(?P<msg>.*)$")


@dataclass(frozen=True)
class CriuResult:
    """What one CRIU run left behind: its exit status and the error lines of its log."""

    returncode: int
    errors: list[str]
    log_path: Path


def binary() -> Path:
    """The CRIU binary warmboot runs; raises :class:`HostSetupError` when it is missing."""
    path = config.criu_path()
    if path.is_absolute():
        if not path.exists():
            raise HostSetupError(f"CRIU not found at {path}; run `make setup` (or set WARMBOOT_CRIU)")
        return path
    return path


@functools.cache
def version() -> str:
    """CRIU's version string, e.g. ``4.1.1``."""
    try:
        out = subprocess.run([str(binary()), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise HostSetupError(f"cannot run CRIU ({exc}); run `make setup`") from exc
    match = re.search(r"Version:\s*(\S+)", out)
    return match.group(1) if match else out.strip()


def error_lines(log_path: Path) -> list[str]:
    """The ``Error`` lines of a CRIU log, without the ones that are always there and harmless."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        match = _ERROR_LINE.match(line)
        if not match:
            continue
        msg = match.group("msg").strip()
        if any(p.search(msg) for p in _HARMLESS):
            continue
        found.append(f"({match.group('where')}) {msg}")
    return found


def run(args: Sequence[str], *, log_path: Path, pass_fds: Sequence[int] = (), timeout: float = 300) -> CriuResult:
    """Run ``criu ARGS`` with its log at ``log_path``; never raises for CRIU's own failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [str(binary()), *args, "--log-file", str(log_path), "-v2"]
    proc = subprocess.run(
        cmd,
        pass_fds=tuple(pass_fds),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        check=False,
    )
    errors = error_lines(log_path)
    if proc.returncode != 0 and not errors:
        errors = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()][-10:]
    return CriuResult(proc.returncode, errors, log_path)
