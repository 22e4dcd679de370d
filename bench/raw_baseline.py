"""The raw baseline of `make bench`: W2's own snapshot restored and called with no platform around it.

From the very snapshot the server made (its images under ``$WARMBOOT_HOME/snapshots``), in this process:
``SnapshotStore.restore`` (CRIU restore on a fresh overlay root and network namespace, the engine's checks), then
the runtime's START and one call written straight onto the copy's control pipes, timed to the call's result. No
SDK, no server, no pool or launcher, no cgroups, no outbound network: what a restore costs at the engine's
level, against which `make bench` puts warmboot's `.remote()` as a ratio.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from warmboot.runtime import wire
from warmboot.worker.container import Container
from warmboot.worker.snapshot import Snapshot, SnapshotStore

TIMEOUT_S = 120.0


def _next(channel: Any, kind: type, deadline: float) -> Any:
    while True:
        message = wire.recv_message(channel, max(0.1, deadline - time.monotonic()))
        if isinstance(message, kind):
            return message
        if isinstance(message, wire.InitError):
            raise RuntimeError(f"the restored copy failed at START: {message.traceback}")


@dataclass
class RawRun:
    """One restore and call: seconds from the restore's start to the call's result, the result, CRIU's share, and
    what ``on_result`` returned."""

    seconds: float
    value: Any
    criu_ms: float
    extra: Any = None


def restore_and_call(
    store: SnapshotStore,
    snapshot: Snapshot,
    method: str | None,
    kwargs: dict[str, Any],
    *,
    on_ready: Callable[[Container], None] | None = None,
    on_result: Callable[[Container], Any] | None = None,
) -> RawRun:
    """Restore a copy of ``snapshot``, START it, call ``method(**kwargs)`` on its pipes, and kill it.

    ``on_ready`` runs between READY and the call, ``on_result`` after the result and before the kill (the
    technique bench measures the call's working set with them); neither is timed apart.
    """
    run_dir = Path(tempfile.mkdtemp(prefix="raw-restore-", dir="/var/tmp"))
    shutil.rmtree(run_dir)  # the store makes it (a fresh run directory, as for every restore)
    started = time.perf_counter()
    copy = store.restore(snapshot, run_dir)
    extra = None
    try:
        deadline = time.monotonic() + TIMEOUT_S
        wire.send_message(copy.channels.control_in, wire.Start(container_id="raw-baseline", env={}, reseed=True))
        _next(copy.channels.control_out, wire.Ready, deadline)
        if on_ready is not None:
            on_ready(copy)
        args = cloudpickle.dumps(((), kwargs))
        wire.send_message(copy.channels.control_in, wire.CallInput(call_id="raw-1", args=args, method=method))
        result = _next(copy.channels.control_out, wire.Result, deadline)
        seconds = time.perf_counter() - started
        if on_result is not None:
            extra = on_result(copy)
    finally:
        copy.kill()
    if not result.ok:
        raise RuntimeError(f"the restored copy's call failed: {result.message}")
    return RawRun(seconds, cloudpickle.loads(result.value), copy.timings.get("criu_restore_ms", 0.0), extra)
