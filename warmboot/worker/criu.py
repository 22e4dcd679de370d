"""Running the CRIU binary and reading its log.

CRIU is used as a program rather than through its RPC service: one process per dump or restore keeps
failures isolated, and lets N restores of one snapshot run in parallel without a shared daemon.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shlex
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


def verbosity() -> int:
    """CRIU's log level: ``WARMBOOT_CRIU_VERBOSITY`` (0-4, default 2: errors and warnings). At 4 every line has a
    timestamp, which is how a restore's time inside CRIU is profiled; the logs of successful restores are then kept
    (in the store's ``.logs``) instead of removed."""
    raw = os.environ.get("WARMBOOT_CRIU_VERBOSITY", "2").strip()
    if raw not in {"0", "1", "2", "3", "4"}:
        raise HostSetupError(f"WARMBOOT_CRIU_VERBOSITY={raw!r}: expected 0 to 4 (CRIU's -v levels)")
    return int(raw)


#: Where CRIU's kernel-feature cache lives between runs (a directory on a tmpfs; see _kdat_cache_prefix).
KDAT_DIR = Path("/dev/shm/warmboot-criu")
_TMPFS_MAGIC = 0x01021994


@functools.cache
def _kdat_cache_prefix() -> tuple[str, ...]:
    """A command prefix that lets CRIU keep its kernel-feature cache, or nothing where it already can.

    CRIU probes the kernel's features on every run (about 23 ms measured here, of a 78 ms W0 restore) unless it
    finds them cached in /run/criu.kdat, and it writes that cache only when /run is a tmpfs (so that a reboot
    into another kernel drops it). Where /run is not one, as on this project's machines, CRIU runs in a mount
    namespace of its own with a directory of a host tmpfs bound over /run: the cache survives from run to run
    and still vanishes at reboot. Costs an unshare and a mount (a few ms); nothing of the host changes.
    """
    if _fs_type("/run") == _TMPFS_MAGIC or _fs_type(KDAT_DIR.parent) != _TMPFS_MAGIC:
        return ()
    KDAT_DIR.mkdir(mode=0o700, exist_ok=True)
    script = f'mount --bind {KDAT_DIR} /run && exec "$@"'
    return ("unshare", "--mount", "--propagation", "slave", "--", "sh", "-c", script, "criu")


def _fs_type(path: str | Path) -> int | None:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first field
    if libc.statfs(str(path).encode(), buf) != 0:
        return None
    return int.from_bytes(buf.raw[:8], "little", signed=True)


def run(
    args: Sequence[str],
    *,
    log_path: Path,
    pass_fds: Sequence[int] = (),
    timeout: float = 300,
    cgroups: Sequence[Path] = (),
) -> CriuResult:
    """Run ``criu ARGS`` with its log at ``log_path``; never raises for CRIU's own failure.

    ``cgroups``: groups CRIU joins before it starts, so that the processes it restores are born in them. Their
    memory is then charged to the container's group (cgroup v2 never moves what a process was charged when it
    is moved later), and no process has to be moved after the restore.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = list(_kdat_cache_prefix())
    if cgroups:
        joins = " && ".join(f"echo $$ > {shlex.quote(str(g / 'cgroup.procs'))}" for g in cgroups)
        if prefix:  # the same shell joins the groups and binds the cache: one program start fewer
            prefix[-2] = f"{joins} && {prefix[-2]}"
        else:
            prefix = ["sh", "-c", f'{joins} && exec "$@"', "criu"]
    cmd = [*prefix, str(binary()), *args, "--log-file", str(log_path), f"-v{verbosity()}"]
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
