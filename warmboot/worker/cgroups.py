"""Memory limits for containers, through the host's cgroup memory controller (v2 or v1)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from warmboot.errors import UnsupportedOptionError

_ROOT = Path("/sys/fs/cgroup")


def _memory_root() -> tuple[Path, str]:
    """Where warmboot's container cgroups go, and the name of the limit file there."""
    controllers = _ROOT / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        return _ROOT / "warmboot", "memory.max"
    if (_ROOT / "memory" / "memory.limit_in_bytes").exists():
        return _ROOT / "memory" / "warmboot", "memory.limit_in_bytes"
    raise UnsupportedOptionError(
        "memory= needs the cgroup memory controller, which this host does not have mounted "
        "(see `warmboot doctor`); remove memory= or enable the controller"
    )


def create_memory_cgroup(name: str, limit_mib: int) -> Path:
    """A cgroup limited to ``limit_mib`` MiB, for one container to join (its launcher writes ``cgroup.procs``)."""
    root, limit_file = _memory_root()
    group = root / name
    group.mkdir(parents=True, exist_ok=True)
    (group / limit_file).write_text(str(limit_mib * 1024 * 1024))
    if limit_file == "memory.limit_in_bytes":
        # Without swap accounting the limit applies to RAM only, and with no swap here that is the limit.
        with contextlib.suppress(OSError):
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_mib * 1024 * 1024))
    return group


def oom_kills(group: Path) -> int:
    """How many of ``group``'s processes the kernel killed for exceeding its limit (0 when unreadable).

    The cgroup's own count, because the exit status cannot tell: util-linux 2.38 ``unshare --fork`` fails to
    re-raise SIGKILL on itself and exits 1 ("sigprocmask unblock failed") when the namespace's init is killed.
    """
    for name in ("memory.events", "memory.oom_control"):  # v2, v1: both hold a line "oom_kill N"
        with contextlib.suppress(OSError, ValueError):
            for line in (group / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


def remove(group: Path) -> None:
    """Remove an emptied container cgroup (best effort: a straggling process keeps it until it exits)."""
    with contextlib.suppress(OSError):
        os.rmdir(group)
