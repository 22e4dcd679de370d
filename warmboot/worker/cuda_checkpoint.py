"""GPU memory snapshots: the CUDA driver's process checkpoint API, through ctypes.

CRIU cannot dump a process that holds a CUDA context (its GPU memory and device mappings). The driver
(r550+, API since CUDA 12.8) can *checkpoint* such a process from outside: lock it (wait for its in-flight
work, block new CUDA calls), then copy its device memory into its own host memory and release the GPU.
CRIU then dumps it like any process. A restored copy is *restored* (device memory put back on a GPU) and
*unlocked*, and its CUDA calls go on. Another process (the worker) drives these steps by PID; the target is
never frozen or stopped for them.

The argument structs' member order and sizes follow the CUDA header (``cuda.h`` of CUDA 12.8+/13.x), as
bindgen reproduced it in cudarc's driver bindings (``CUcheckpointLockArgs_st { unsigned int timeoutMs;
unsigned int reserved0; cuuint64_t reserved1[7]; }``, the others ``cuuint64_t reserved[8]`` or, for
restore, ``{ CUcheckpointGpuPair *gpuPairs; unsigned int gpuPairsCount; char reserved[52]; }``), which
match cuda-python's ``cydriver`` declarations; every one of them is 64 bytes. (NVIDIA's HTML reference
lists the members alphabetically, which is not their layout.)
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import threading
from collections.abc import Iterable

from warmboot.errors import GpuSnapshotError

#: ``CUprocessState`` values (cuda.h).
RUNNING, LOCKED, CHECKPOINTED, FAILED = 0, 1, 2, 3
STATE_NAMES = {RUNNING: "running", LOCKED: "locked", CHECKPOINTED: "checkpointed", FAILED: "failed"}

DEFAULT_LOCK_TIMEOUT_MS = 10_000
_LIBRARY = "libcuda.so.1"
_SYMBOLS = (
    "cuInit",
    "cuGetErrorString",
    "cuDriverGetVersion",
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),  # 0: no timeout
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    _fields_ = [
        ("gpuPairs", ctypes.c_void_p),  # CUcheckpointGpuPair*: remap GPUs by UUID; NULL: same GPUs
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * 52),
    ]


class CUcheckpointUnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


_lock = threading.Lock()  # one driver checkpoint operation at a time from this worker


@functools.cache
def _driver() -> ctypes.CDLL | None:
    """libcuda with the checkpoint API and ``cuInit(0)`` done, or ``None`` (no driver, or too old)."""
    try:
        lib = ctypes.CDLL(_LIBRARY)
    except OSError:
        return None
    if not all(hasattr(lib, name) for name in _SYMBOLS):
        return None
    lib.cuInit.argtypes = [ctypes.c_uint]
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuDriverGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
    lib.cuCheckpointProcessGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.cuCheckpointProcessLock.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointLockArgs)]
    lib.cuCheckpointProcessCheckpoint.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointCheckpointArgs)]
    lib.cuCheckpointProcessRestore.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointRestoreArgs)]
    lib.cuCheckpointProcessUnlock.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointUnlockArgs)]
    for name in _SYMBOLS:
        getattr(lib, name).restype = ctypes.c_int
    if lib.cuInit(0) != 0:
        return None
    return lib


def available() -> bool:
    """Whether libcuda.so.1 loads, initialises and has the process checkpoint API."""
    return _driver() is not None


def _require() -> ctypes.CDLL:
    lib = _driver()
    if lib is None:
        raise GpuSnapshotError(
            "the CUDA driver's process checkpoint API is not available here (no libcuda.so.1, cuInit failed, "
            "or a driver older than r550 / CUDA 12.8)"
        )
    return lib


def error_string(code: int) -> str:
    lib = _driver()
    text = ctypes.c_char_p()
    if lib is not None and lib.cuGetErrorString(code, ctypes.byref(text)) == 0 and text.value:
        return f"{text.value.decode(errors='replace')} (CUresult {code})"
    return f"CUresult {code}"


def _call(what: str, pid: int, fn_name: str, *args: object) -> None:
    lib = _require()
    with _lock:
        code = getattr(lib, fn_name)(pid, *args)
    if code != 0:
        raise GpuSnapshotError(f"{what} of CUDA process {pid} failed: {error_string(code)}")


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``580.159.04``), else the CUDA driver API version (``13000``)."""
    with contextlib.suppress(OSError), open("/proc/driver/nvidia/version") as f:
        for word in f.readline().split():
            if word[:1].isdigit() and word.count(".") >= 1:
                return word
    lib = _driver()
    if lib is not None:
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return str(version.value)
    return None


def state(pid: int) -> int:
    """The ``CUprocessState`` of ``pid``; raises :class:`GpuSnapshotError` when it has no CUDA state."""
    lib = _require()
    value = ctypes.c_int(-1)
    with _lock:
        code = lib.cuCheckpointProcessGetState(pid, ctypes.byref(value))
    if code != 0:
        raise GpuSnapshotError(f"cannot read the CUDA state of process {pid}: {error_string(code)}")
    return value.value


def lock(pid: int, timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> None:
    """Block ``pid``'s further CUDA calls once its submitted work is done (``0``: wait without limit)."""
    _call("locking", pid, "cuCheckpointProcessLock", ctypes.byref(CUcheckpointLockArgs(timeoutMs=timeout_ms)))


def checkpoint(pid: int) -> None:
    """Move a locked process's device memory into its host memory and release its GPUs."""
    _call("checkpointing", pid, "cuCheckpointProcessCheckpoint", ctypes.byref(CUcheckpointCheckpointArgs()))


def restore(pid: int) -> None:
    """Put a checkpointed process's memory back on the (same) GPUs; it stays locked."""
    _call("restoring", pid, "cuCheckpointProcessRestore", ctypes.byref(CUcheckpointRestoreArgs()))


def unlock(pid: int) -> None:
    """Let a locked (restored) process make CUDA calls again."""
    _call("unlocking", pid, "cuCheckpointProcessUnlock", ctypes.byref(CUcheckpointUnlockArgs()))


def _maps_libcuda(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any("libcuda.so" in line for line in f)
    except OSError:
        return False


def cuda_pids(pids: Iterable[int]) -> list[int]:
    """Which of ``pids`` hold CUDA state: the driver reports a state for them or, where the driver's
    checkpoint API is missing, they map libcuda."""
    if available():
        found = []
        for pid in pids:
            with contextlib.suppress(GpuSnapshotError):
                state(pid)
                found.append(pid)
        return found
    return [pid for pid in pids if _maps_libcuda(pid)]


def suspend(pids: Iterable[int], timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS) -> list[int]:
    """Lock and checkpoint every CUDA process among ``pids``; return those suspended (maybe none).

    On any failure what was done is undone (checkpointed processes restored, locked ones unlocked) and
    :class:`GpuSnapshotError` is raised, leaving every process running on its GPU as before.
    """
    pids = [pid for pid in pids if pid != os.getpid()]
    targets = cuda_pids(pids)
    if not targets:
        return []
    _require()  # processes map libcuda but the API is missing: refuse rather than dump a live context
    locked: list[int] = []
    checkpointed: list[int] = []
    try:
        for pid in targets:
            lock(pid, timeout_ms)
            locked.append(pid)
        for pid in targets:
            checkpoint(pid)
            checkpointed.append(pid)
    except GpuSnapshotError:
        for pid in checkpointed:
            with contextlib.suppress(GpuSnapshotError):
                restore(pid)
        for pid in locked:
            with contextlib.suppress(GpuSnapshotError):
                unlock(pid)
        raise
    return targets


def resume(pids: Iterable[int]) -> list[int]:
    """Restore and unlock every checkpointed (or locked) CUDA process among ``pids``; return them.

    Raises :class:`GpuSnapshotError` at the first failure (a restored copy that cannot get its GPU state
    back is useless; the caller kills it).
    """
    pids = [pid for pid in pids if pid != os.getpid()]
    if not available():
        if any(_maps_libcuda(pid) for pid in pids):
            _require()
        return []
    resumed = []
    for pid in pids:
        try:
            current = state(pid)
        except GpuSnapshotError:
            continue  # no CUDA state: nothing to resume
        if current == CHECKPOINTED:
            restore(pid)
            current = LOCKED
        if current == LOCKED:
            unlock(pid)
            resumed.append(pid)
        elif current != RUNNING:
            raise GpuSnapshotError(f"CUDA process {pid} is {STATE_NAMES.get(current, current)}; cannot resume it")
    return resumed
