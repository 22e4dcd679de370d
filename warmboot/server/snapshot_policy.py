"""What a failed snapshot restore or creation means, and what to do about it: pure rules, no I/O.

``server.snapshots.SnapshotRegistry`` applies these decisions to its table; they live apart so the fast
tests can run every case without CRIU.

Failures of a *restore* fall in four classes:

- **incompatible**: the snapshot was made for another host fingerprint (CPU, kernel, CRIU). It is kept, for
  the hosts it fits; this host boots cold.
- **corrupt**: its images fail their checksums, its manifest is unreadable, CRIU cannot restore it, or the
  restored copy dies before it is ready. It is deleted and made again, at most once per function version.
- **missing**: its directory is gone (deleted by hand, a cleaned disk). Logged, and made again, at most
  :data:`MAX_MISSING_RECREATIONS` times per version, without using up the corrupt allowance.
- **transient**: the host hiccupped (a START timeout, an OS error setting up the copy). The snapshot stays;
  after :data:`TRANSIENT_BURST` such failures in a row it is left alone for a back-off that doubles each time.

Failures of a *creation* are transient when the OS refused (a full disk, an I/O error): a later cold boot
tries again after the back-off. Others (CRIU cannot dump what the container holds) are final for the version.

The first back-off is ``WARMBOOT_SNAPSHOT_BACKOFF_S`` seconds (read at import; default 30).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from enum import Enum

from warmboot.errors import (
    ContainerCrashedError,
    ContainerError,
    SnapshotError,
    SnapshotIncompatibleError,
    SnapshotNotFoundError,
)

MAX_RECREATIONS = 1  #: corrupt snapshots made again per version
MAX_MISSING_RECREATIONS = 3  #: vanished snapshots made again per version
TRANSIENT_BURST = 3  #: transient failures in a row before backing off
BACKOFF_FIRST_S = float(os.environ.get("WARMBOOT_SNAPSHOT_BACKOFF_S", "30"))
BACKOFF_MAX_S = 600.0

_OS_TROUBLE = re.compile(r"No space left on device|Disk quota exceeded|Input/output error|Read-only file system")


class Failure(Enum):
    INCOMPATIBLE = "incompatible"
    CORRUPT = "corrupt"
    MISSING = "missing"
    TRANSIENT = "transient"


def classify_restore(exc: BaseException) -> Failure:
    """The class of a failed restore (see the module docstring)."""
    if isinstance(exc, SnapshotIncompatibleError):
        return Failure.INCOMPATIBLE
    if isinstance(exc, SnapshotNotFoundError):
        return Failure.MISSING
    if isinstance(exc, SnapshotError | ContainerCrashedError):
        return Failure.CORRUPT
    if isinstance(exc, OSError | ContainerError):
        return Failure.TRANSIENT
    return Failure.CORRUPT


def os_trouble(exc: BaseException) -> str | None:
    """What the OS refused with ("No space left on device", ...), where ``exc``'s message (CRIU's lines included)
    says so."""
    match = _OS_TROUBLE.search(str(exc))
    return match.group(0) if match else None


def creation_is_transient(exc: BaseException) -> bool:
    """Whether a failed creation may succeed later (the OS refused), rather than never for this version."""
    if isinstance(exc, OSError):
        return True  # a full disk, a vanished directory, an I/O error: the host, not the function
    return os_trouble(exc) is not None


def backoff_seconds(bursts: int) -> float:
    """The back-off after the ``bursts``-th burst of transient failures (1, 2, ...)."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, bursts - 1))


@dataclass(frozen=True)
class RestoreDecision:
    """What to do with a key's snapshot after a failed restore."""

    failure: Failure
    delete: bool  #: delete the snapshot's files
    state: str  #: the key's new state
    backoff_s: float = 0.0  #: leave the snapshot alone this long (transient bursts)


def decide_restore(failure: Failure, transient_in_a_row: int) -> RestoreDecision:
    """``transient_in_a_row`` counts this failure too when it is transient."""
    if failure is Failure.INCOMPATIBLE:
        return RestoreDecision(failure, delete=False, state="incompatible")
    if failure is Failure.TRANSIENT:
        bursts, rest = divmod(transient_in_a_row, TRANSIENT_BURST)
        backoff = backoff_seconds(bursts) if bursts and rest == 0 else 0.0
        return RestoreDecision(failure, delete=False, state="ok", backoff_s=backoff)
    return RestoreDecision(failure, delete=True, state="missing" if failure is Failure.MISSING else "broken")


def may_recreate(state: str, recreations: int, missing_recreations: int) -> bool:
    """Whether a cold boot should make the snapshot again for a key in ``state``."""
    if state == "broken":
        return recreations < MAX_RECREATIONS
    if state == "missing":
        return missing_recreations < MAX_MISSING_RECREATIONS
    return False
