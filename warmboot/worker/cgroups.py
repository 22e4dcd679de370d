"""Resource limits for containers, through the host's cgroups (v2, or v1's memory, cpu and pids controllers).

Every container gets a pids limit (so a fork bomb stays inside it); ``memory=`` and ``cpu=`` add a memory
limit and a CPU quota. The container joins its groups before any of its code runs (its launcher writes
``cgroup.procs``), and the container has no cgroup filesystem of its own, so it cannot change them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from warmboot.errors import UnsupportedOptionError

_ROOT = Path("/sys/fs/cgroup")
#: Default number of processes and threads a container may hold (``WARMBOOT_CONTAINER_PIDS_MAX`` overrides):
#: room for torch's thread pools on a large machine, few enough that a fork bomb cannot exhaust the host.
DEFAULT_PIDS_MAX = 1024
_CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class Limits:
    """What to hold a container to: ``None`` leaves that resource unlimited."""

    memory_mib: int | None = None
    cpu: float | None = None  #: cores' worth of CPU time (a CFS quota)
    pids: int | None = None

    @classmethod
    def for_function(cls, memory_mib: int | None, cpu: float | None) -> Limits:
        pids = int(os.environ.get("WARMBOOT_CONTAINER_PIDS_MAX", DEFAULT_PIDS_MAX))
        return cls(memory_mib=memory_mib, cpu=cpu, pids=pids)


@dataclass(frozen=True)
class Groups:
    """One container's cgroup directories (one per v1 controller, or a single v2 group)."""

    paths: tuple[Path, ...]
    memory: Path | None  #: where the OOM kill count lives

    def oom_kills(self) -> int:
        """How many of the container's processes the kernel killed for exceeding its memory limit.

        The cgroup's own count, because the exit status cannot tell an OOM kill from any other SIGKILL.
        """
        if self.memory is None:
            return 0
        for name in ("memory.events", "memory.oom_control"):  # v2, v1: both hold a line "oom_kill N"
            with contextlib.suppress(OSError, ValueError):
                for line in (self.memory / name).read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        return 0

    def remove(self) -> None:
        """Remove the emptied groups (best effort: a straggling process keeps one until it exits)."""
        for group in self.paths:
            with contextlib.suppress(OSError):
                os.rmdir(group)


def _v2() -> bool:
    return (_ROOT / "cgroup.controllers").exists()


def create(name: str, limits: Limits) -> Groups:
    """Groups named ``name`` holding ``limits``, for one container to join."""
    if _v2():
        return _create_v2(name, limits)
    return _create_v1(name, limits)


def _create_v2(name: str, limits: Limits) -> Groups:
    available = (_ROOT / "cgroup.controllers").read_text().split()
    parent = _ROOT / "warmboot"
    parent.mkdir(exist_ok=True)
    wanted = [c for c, on in (("memory", limits.memory_mib), ("cpu", limits.cpu), ("pids", limits.pids)) if on]
    missing = [c for c in wanted if c not in available]
    if missing:
        raise _missing(missing)
    with contextlib.suppress(OSError):
        (_ROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
        (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
    group = parent / name
    group.mkdir(exist_ok=True)
    if limits.memory_mib:
        (group / "memory.max").write_text(str(limits.memory_mib << 20))
        with contextlib.suppress(OSError):
            (group / "memory.swap.max").write_text("0")
    if limits.cpu:
        (group / "cpu.max").write_text(f"{int(limits.cpu * _CFS_PERIOD_US)} {_CFS_PERIOD_US}")
    if limits.pids:
        (group / "pids.max").write_text(str(limits.pids))
    return Groups((group,), group if limits.memory_mib else None)


def _create_v1(name: str, limits: Limits) -> Groups:
    paths: list[Path] = []
    memory = None
    if limits.memory_mib:
        memory = _v1_group("memory", name)
        (memory / "memory.limit_in_bytes").write_text(str(limits.memory_mib << 20))
        # Without swap accounting the limit applies to RAM only, and with no swap here that is the limit.
        with contextlib.suppress(OSError):
            (memory / "memory.memsw.limit_in_bytes").write_text(str(limits.memory_mib << 20))
        paths.append(memory)
    if limits.cpu:
        cpu = _v1_group("cpu", name)
        (cpu / "cpu.cfs_period_us").write_text(str(_CFS_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(int(limits.cpu * _CFS_PERIOD_US)))
        paths.append(cpu)
    if limits.pids:
        pids = _v1_group("pids", name)
        (pids / "pids.max").write_text(str(limits.pids))
        paths.append(pids)
    return Groups(tuple(paths), memory)


def _v1_group(controller: str, name: str) -> Path:
    root = _ROOT / controller
    if not root.is_dir():
        raise _missing([controller])
    group = root / "warmboot" / name
    group.mkdir(parents=True, exist_ok=True)
    return group


def _missing(controllers: list[str]) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        f"this host has no cgroup {', '.join(controllers)} controller mounted (see `warmboot doctor`): "
        "enable it, or remove the memory=/cpu= option that needs it"
    )


def _groups_named(name: str) -> list[Path]:
    if _v2():
        candidates = [_ROOT / "warmboot" / name]
    else:
        candidates = [_ROOT / controller / "warmboot" / name for controller in ("memory", "cpu", "pids")]
    return [group for group in candidates if group.is_dir()]


def kill_leftover(name: str, timeout: float = 10.0) -> int:
    """Kill every process still in the groups named ``name`` (a container whose server died), then remove them.

    Returns how many processes were killed. The cgroup is the one place that knows every process of a container
    (its init, whatever it forked, a restored copy's tree), so this finds them all, even after ``kill -9`` of
    the server that started them.
    """
    killed = 0
    for group in _groups_named(name):
        procs = group / "cgroup.procs"
        pids = [int(p) for p in procs.read_text().split()] if procs.exists() else []
        killed += len(pids)
        if (group / "cgroup.kill").exists():
            (group / "cgroup.kill").write_text("1")  # atomic: nothing can fork its way out meanwhile
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        deadline = time.monotonic() + timeout
        while procs.exists() and procs.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.01)  # the kernel reaps asynchronously: wait for the group to empty before removing it
        with contextlib.suppress(OSError):
            os.rmdir(group)
    return killed
