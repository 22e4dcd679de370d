"""The snapshot policy, case by case, without CRIU: the pure rules of server/snapshot_policy.py, and the registry
(server/snapshots.py) applying them to its table, on a SQLite database and a real SnapshotStore in tmp_path.

The store's snapshots here are directories written by hand (images and a manifest for this host), so that a
restore's checks run for real; the failures are exceptions of each class the launcher meets. The registry's
clock is a fake one, so back-offs are checked to the second without waiting. The same faults on a real server,
with real containers and CRIU, are in test_snapshot_faults.py.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import threading
import time
import types
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from warmboot.errors import (
    CheckpointError,
    ContainerBootError,
    ContainerCrashedError,
    ContainerError,
    GpuSnapshotError,
    ProtocolViolationError,
    RestoreError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotFileChangedError,
    SnapshotIncompatibleError,
    SnapshotNotFoundError,
)
from warmboot.server import snapshot_policy as policy
from warmboot.server import snapshots as registry_module
from warmboot.server.db import Database
from warmboot.server.snapshot_policy import Failure
from warmboot.server.snapshots import SnapshotRegistry
from warmboot.worker import host
from warmboot.worker.snapshot import FORMAT_VERSION, MANIFEST, Snapshot, SnapshotStore, _hash_file

KEY = "k" * 32
FIRST = policy.BACKOFF_FIRST_S
ENOSPC = CheckpointError(
    "CRIU dump of container 4242 failed (exit 1)",
    snapshot_id="0123456789abcdef",
    criu_errors=[
        "(criu/page-xfer.c:263) page-xfer: Unable to spice data: No space left on device",
        "(criu/cr-dump.c:2111) Dumping FAILED.",
    ],
)

# ----- the pure rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (SnapshotIncompatibleError("made on another host fingerprint"), Failure.INCOMPATIBLE),
        (SnapshotNotFoundError("no such snapshot"), Failure.MISSING),
        (SnapshotCorruptError("image pages-1.img does not match its checksum"), Failure.CORRUPT),
        (SnapshotFileChangedError("a file the snapshot needs was changed"), Failure.CORRUPT),
        (RestoreError("CRIU restore failed (exit 1)"), Failure.CORRUPT),
        (GpuSnapshotError("cuCheckpointProcessRestore failed"), Failure.CORRUPT),
        (ContainerCrashedError("the restored copy died before it was ready"), Failure.CORRUPT),
        (ProtocolViolationError("the restored copy wrote garbage"), Failure.CORRUPT),
        (ContainerError("START timed out"), Failure.TRANSIENT),
        (ContainerBootError("@enter(snap=False) raised"), Failure.TRANSIENT),
        (OSError(errno.EMFILE, "Too many open files"), Failure.TRANSIENT),
        (PermissionError(errno.EPERM, "Operation not permitted"), Failure.TRANSIENT),
        (TimeoutError("pipe"), Failure.TRANSIENT),
        (RuntimeError("something nobody expected"), Failure.CORRUPT),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.value,
)
def test_classify_restore(exc: BaseException, failure: Failure) -> None:
    assert policy.classify_restore(exc) is failure


@pytest.mark.parametrize(
    ("exc", "transient", "trouble"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), True, "No space left on device"),
        (PermissionError(errno.EPERM, "Operation not permitted"), True, None),  # any OSError: the host refused
        (FileNotFoundError(errno.ENOENT, "No such file or directory"), True, None),
        (ENOSPC, True, "No space left on device"),  # CRIU's lines, below the first line of the message
        (CheckpointError("dump", criu_errors=["(criu/x.c:1) Disk quota exceeded"]), True, "Disk quota exceeded"),
        (CheckpointError("dump", criu_errors=["(criu/x.c:1) read: Input/output error"]), True, "Input/output error"),
        (CheckpointError("mkdir: Read-only file system"), True, "Read-only file system"),
        (CheckpointError("dump", criu_errors=["(criu/sk-unix.c:1) Can't dump half of stream unix"]), False, None),
        (GpuSnapshotError("cuCheckpointProcessLock failed"), False, None),
        (RuntimeError("a bug"), False, None),
    ],
)  # fmt: skip
def test_creation_is_transient_when_the_os_refused(exc: BaseException, transient: bool, trouble: str | None) -> None:
    assert policy.creation_is_transient(exc) is transient
    assert policy.os_trouble(exc) == trouble


def test_backoff_doubles_up_to_its_ceiling() -> None:
    assert [policy.backoff_seconds(n) for n in (0, 1, 2, 3)] == [FIRST, FIRST, 2 * FIRST, 4 * FIRST]
    assert policy.backoff_seconds(64) == policy.BACKOFF_MAX_S


def test_decide_restore_for_each_class() -> None:
    assert policy.decide_restore(Failure.INCOMPATIBLE, 0) == policy.RestoreDecision(
        Failure.INCOMPATIBLE, delete=False, state="incompatible"
    )
    assert policy.decide_restore(Failure.CORRUPT, 0) == policy.RestoreDecision(Failure.CORRUPT, True, "broken")
    assert policy.decide_restore(Failure.MISSING, 0) == policy.RestoreDecision(Failure.MISSING, True, "missing")
    burst = policy.TRANSIENT_BURST
    decisions = [policy.decide_restore(Failure.TRANSIENT, n) for n in range(1, 2 * burst + 1)]
    assert all(not d.delete and d.state == "ok" for d in decisions), "a transient failure keeps the snapshot"
    assert [d.backoff_s for d in decisions] == [0.0] * (burst - 1) + [FIRST] + [0.0] * (burst - 1) + [2 * FIRST]


def test_may_recreate_counts_corrupt_and_missing_apart() -> None:
    assert policy.may_recreate("broken", 0, 0)
    assert not policy.may_recreate("broken", policy.MAX_RECREATIONS, 0)
    assert policy.may_recreate("broken", 0, policy.MAX_MISSING_RECREATIONS), "vanished ones don't use it up"
    for used in range(policy.MAX_MISSING_RECREATIONS):
        assert policy.may_recreate("missing", policy.MAX_RECREATIONS, used)
    assert not policy.may_recreate("missing", 0, policy.MAX_MISSING_RECREATIONS)
    for state in ("ok", "creating", "failed", "refused", "incompatible"):
        assert not policy.may_recreate(state, 0, 0), state


def test_backoff_is_read_from_the_environment_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        monkeypatch.setenv("WARMBOOT_SNAPSHOT_BACKOFF_S", "2.5")
        assert importlib.reload(policy).BACKOFF_FIRST_S == 2.5
        assert policy.backoff_seconds(2) == 5.0
        monkeypatch.delenv("WARMBOOT_SNAPSHOT_BACKOFF_S")
        assert importlib.reload(policy).BACKOFF_FIRST_S == 30.0, "the default"
    finally:
        monkeypatch.undo()
        importlib.reload(policy)
    assert policy.BACKOFF_FIRST_S == FIRST


# ----- the registry applying them ---------------------------------------------------------------------------


class Clock:
    """The registry's clock (``time.time``), moved by hand."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(registry_module, "time", types.SimpleNamespace(time=c.time))
    return c


@pytest.fixture
def db(open_db: Callable[[], Database]) -> Database:
    """The registry's database: SQLite, then PostgreSQL (tests/db_helpers.py)."""
    return open_db()


@pytest.fixture
def reg(db: Database, tmp_path: Path, clock: Clock) -> SnapshotRegistry:
    return SnapshotRegistry(db, threading.Lock(), SnapshotStore(tmp_path / "snapshots"))


def _publish(store: SnapshotStore, size: int = 64 << 10) -> Snapshot:
    """A published snapshot as the store would hold it (a pages image and this host's manifest), without CRIU."""
    snapshot_id = uuid.uuid4().hex[:16]
    tmp = store.root / f".tmp-{snapshot_id}-{os.getpid()}-000000"
    tmp.mkdir(mode=0o700)
    (tmp / "pages-1.img").write_bytes(os.urandom(size))
    fp = host.fingerprint()
    manifest = {
        "format_version": FORMAT_VERSION,
        "id": snapshot_id,
        "created_at": time.time(),
        "criu_version": fp.criu_version,
        "kernel": fp.kernel,
        "cpu": {"model": fp.cpu_model, "flags_sha256": fp.cpu_flags_sha256, "id": fp.cpu},
        "channels": {},
        "files": {"pages-1.img": {"size": size, "xxh3_128": _hash_file(tmp / "pages-1.img")}},
        "total_bytes": size,
        "metadata": {"key": KEY},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    os.rename(tmp, store.root / snapshot_id)
    return store.get(snapshot_id)


def _make(reg: SnapshotRegistry) -> Snapshot:
    """A cold boot's turn to make the snapshot, and it succeeds."""
    assert reg.claim_creation(KEY, "app", "f")
    snap = _publish(reg.store)
    reg.created(KEY, snap, 0.5)
    return snap


def _state(reg: SnapshotRegistry) -> tuple[str, str | None]:
    record = reg.get(KEY)
    assert record is not None
    return record.state, record.reason


def _corrupt_error(reg: SnapshotRegistry, snap: Snapshot, tmp_path: Path) -> SnapshotCorruptError:
    """Truncate the pages image and try to restore it: the real store refuses it (and marks it broken)."""
    pages = snap.path / "pages-1.img"
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)
    with pytest.raises(SnapshotCorruptError, match="does not match its checksum") as caught:
        reg.store.restore(snap, tmp_path / "run")
    return caught.value


def test_one_creation_at_a_time_then_ok_and_usable(reg: SnapshotRegistry) -> None:
    assert reg.claim_creation(KEY, "app", "f")
    assert _state(reg) == ("creating", None)
    assert not reg.claim_creation(KEY, "app", "f"), "a second cold boot must not make it too"
    snap = _publish(reg.store)
    reg.created(KEY, snap, 0.5)
    assert _state(reg) == ("ok", None)
    assert reg.usable(KEY) == snap
    assert not reg.claim_creation(KEY, "app", "f")


def test_deleted_snapshot_is_reported_missing_and_made_again_without_the_corrupt_allowance(
    reg: SnapshotRegistry, tmp_path: Path
) -> None:
    told: list[tuple[str, BaseException, str]] = []
    snap = _make(reg)
    for made in range(policy.MAX_MISSING_RECREATIONS + 1):
        shutil.rmtree(snap.path)  # by hand
        assert reg.usable(KEY, on_failure=lambda *args: told.append(args)) is None
        snapshot_id, exc, verdict = told[-1]
        assert snapshot_id == snap.id and isinstance(exc, SnapshotNotFoundError) and verdict.startswith("missing")
        state, reason = _state(reg)
        assert state == "missing" and reason.startswith("missing: SnapshotNotFoundError"), reason
        assert reg.get(KEY).snapshot_id is None
        if made < policy.MAX_MISSING_RECREATIONS:
            assert reg.claim_creation(KEY, "app", "f")
            snap = _publish(reg.store)
            reg.created(KEY, snap, 0.5)
            if made == 0:  # a corrupt one is still made again: vanished ones have an allowance of their own
                reg.restore_failed(KEY, snap.id, _corrupt_error(reg, snap, tmp_path))
                assert _state(reg)[0] == "broken"
                assert reg.claim_creation(KEY, "app", "f")
                snap = _publish(reg.store)
                reg.created(KEY, snap, 0.5)
    assert not reg.claim_creation(KEY, "app", "f"), "vanished snapshots are made again a few times only"
    record = reg.get(KEY)
    assert (record.state, record.recreations, record.missing_recreations) == ("missing", 1, 3)
    assert len(told) == policy.MAX_MISSING_RECREATIONS + 1


def test_corrupt_snapshot_is_refused_discarded_and_made_again_once(reg: SnapshotRegistry, tmp_path: Path) -> None:
    snap = _make(reg)
    exc = _corrupt_error(reg, snap, tmp_path)
    assert snap.broken_reason() is not None, "the store marks it broken before anybody can try it again"
    with pytest.raises(SnapshotCorruptError, match="marked broken"):
        reg.store.check(snap)
    verdict = reg.restore_failed(KEY, snap.id, exc)
    assert verdict.startswith("corrupt: discarded")
    assert not snap.path.exists()
    state, reason = _state(reg)
    assert state == "broken" and reason.startswith("corrupt: SnapshotCorruptError") and "checksum" in reason
    assert reg.usable(KEY) is None

    assert reg.claim_creation(KEY, "app", "f")
    again = _publish(reg.store)
    reg.created(KEY, again, 0.5)
    assert reg.usable(KEY) == again
    reg.restore_failed(KEY, again.id, _corrupt_error(reg, again, tmp_path))
    assert not again.path.exists()
    assert not reg.claim_creation(KEY, "app", "f"), "at most one recreation per version"
    assert reg.usable(KEY) is None
    assert reg.get(KEY).recreations == 1


def test_unreadable_manifest_is_corrupt(reg: SnapshotRegistry) -> None:
    snap = _make(reg)
    (snap.path / MANIFEST).write_text("{not json")
    told: list[str] = []
    assert reg.usable(KEY, on_failure=lambda _id, _exc, verdict: told.append(verdict)) is None
    assert told and told[0].startswith("corrupt")
    assert _state(reg)[0] == "broken" and not snap.path.exists()


def test_two_copies_failing_on_one_corrupt_snapshot_make_it_again_once(reg: SnapshotRegistry, tmp_path: Path) -> None:
    snap = _make(reg)
    first, second = reg.usable(KEY), reg.usable(KEY)  # two cold starts at once got the same snapshot
    assert first == second == snap
    exc = _corrupt_error(reg, snap, tmp_path)
    reg.restore_failed(KEY, snap.id, exc)
    assert reg.claim_creation(KEY, "app", "f")  # the first one's cold boot makes it again
    reg.restore_failed(KEY, snap.id, exc)  # the second one's failure arrives late
    assert _state(reg)[0] == "creating", "a stale failure must not touch the key's new state"
    assert not reg.claim_creation(KEY, "app", "f")
    reg.created(KEY, _publish(reg.store), 0.5)
    assert reg.get(KEY).recreations == 1 and _state(reg)[0] == "ok"


def test_incompatible_snapshot_is_kept_and_not_remade(reg: SnapshotRegistry) -> None:
    snap = _make(reg)
    verdict = reg.restore_failed(
        KEY, snap.id, SnapshotIncompatibleError("kernel 6.1 vs here 6.18", snapshot_id=snap.id)
    )
    assert verdict.startswith("incompatible")
    assert snap.path.is_dir(), "kept, for the hosts it fits"
    state, reason = _state(reg)
    assert state == "incompatible" and "kernel 6.1" in reason
    assert reg.get(KEY).snapshot_id == snap.id
    assert reg.usable(KEY) is None
    assert not reg.claim_creation(KEY, "app", "f")


def test_transient_restore_failures_keep_the_snapshot_and_back_off_in_bursts(
    reg: SnapshotRegistry, clock: Clock
) -> None:
    snap = _make(reg)
    for _ in range(policy.TRANSIENT_BURST - 1):
        assert reg.restore_failed(KEY, snap.id, ContainerError("START timed out")) == "transient: the snapshot is kept"
        assert reg.usable(KEY) == snap
    verdict = reg.restore_failed(KEY, snap.id, OSError(errno.EMFILE, "Too many open files"))
    assert verdict == f"transient, {policy.TRANSIENT_BURST} in a row: backing off for {FIRST:.0f} s"
    assert snap.path.is_dir() and _state(reg)[0] == "ok"
    assert reg.usable(KEY) is None, "backed off"
    clock.now += FIRST - 1
    assert reg.usable(KEY) is None
    clock.now += 1
    assert reg.usable(KEY) == snap
    reg.restored(KEY, 80.0)
    assert reg.get(KEY).transient_failures == 0, "a good restore ends the run of failures"
    assert reg.restore_failed(KEY, "replaced0000000", ContainerError("x")).endswith("replaced meanwhile")


def test_full_disk_creation_fails_with_its_reason_and_is_retried_after_the_backoff(
    reg: SnapshotRegistry, clock: Clock
) -> None:
    assert reg.claim_creation(KEY, "app", "f")
    verdict = reg.creation_failed(KEY, ENOSPC)
    assert verdict == f"the host refused; a later cold boot retries in {FIRST:.0f} s"
    state, reason = _state(reg)
    assert state == "failed", "never left 'creating'"
    assert reason.startswith("No space left on device: CheckpointError: snapshot 0123456789abcdef"), reason
    assert reg.get(KEY).retry_at == clock.now + FIRST

    clock.now += FIRST - 0.5
    assert not reg.claim_creation(KEY, "app", "f"), "not before the back-off"
    clock.now += 0.5
    assert reg.claim_creation(KEY, "app", "f")
    assert _state(reg)[0] == "creating"
    verdict = reg.creation_failed(KEY, OSError(errno.ENOSPC, "No space left on device", "/s/.tmp-x"))
    assert verdict.endswith(f"retries in {2 * FIRST:.0f} s")
    assert reg.get(KEY).retry_at == clock.now + 2 * FIRST, "the back-off doubles"
    state, reason = _state(reg)
    assert state == "failed" and reason == "OSError: [Errno 28] No space left on device: '/s/.tmp-x'", reason

    clock.now += 2 * FIRST
    assert reg.claim_creation(KEY, "app", "f")
    snap = _publish(reg.store)
    reg.created(KEY, snap, 0.5)
    assert _state(reg) == ("ok", None)
    assert reg.usable(KEY) == snap


def test_failed_publish_is_transient(reg: SnapshotRegistry, clock: Clock) -> None:
    assert reg.claim_creation(KEY, "app", "f")
    exc = PermissionError(errno.EPERM, "Operation not permitted", "/s/.tmp-x", None, "/s/x")
    assert "retries" in reg.creation_failed(KEY, exc)
    assert _state(reg) == ("failed", "PermissionError: [Errno 1] Operation not permitted: '/s/.tmp-x' -> '/s/x'")
    clock.now += FIRST
    assert reg.claim_creation(KEY, "app", "f")


def test_final_creation_failure_is_not_retried(reg: SnapshotRegistry, clock: Clock) -> None:
    assert reg.claim_creation(KEY, "app", "f")
    exc = CheckpointError("dump failed", criu_errors=["(criu/sk-unix.c:1) Can't dump half of stream unix connection"])
    assert reg.creation_failed(KEY, exc) == "not retried for this version"
    assert _state(reg) == ("failed", "CheckpointError: dump failed")
    assert reg.get(KEY).retry_at is None
    clock.now += policy.BACKOFF_MAX_S * 10
    assert not reg.claim_creation(KEY, "app", "f")


@pytest.mark.parametrize(
    "exc",
    [ENOSPC, OSError(errno.EIO, "Input/output error"), CheckpointError("x"), KeyboardInterrupt(), SnapshotError("")],
    ids=lambda e: type(e).__name__,
)
def test_no_creation_failure_leaves_the_key_creating(reg: SnapshotRegistry, exc: BaseException) -> None:
    assert reg.claim_creation(KEY, "app", "f")
    reg.creation_failed(KEY, exc)
    state, reason = _state(reg)
    assert state == "failed" and type(exc).__name__ in reason, reason


def test_refused_key_is_not_tried_again(reg: SnapshotRegistry, clock: Clock) -> None:
    assert reg.claim_creation(KEY, "app", "f")
    reg.not_created(KEY, "refused", "open network connection(s) at the snapshot point: tcp 127.0.0.1:80")
    clock.now += policy.BACKOFF_MAX_S * 10
    assert not reg.claim_creation(KEY, "app", "f")
    assert _state(reg)[0] == "refused"


def test_a_creation_interrupted_by_a_server_restart_is_failed_and_retried(
    db: Database, tmp_path: Path, reg: SnapshotRegistry
) -> None:
    assert reg.claim_creation(KEY, "app", "f")
    after_restart = SnapshotRegistry(db, threading.Lock(), SnapshotStore(tmp_path / "snapshots"))
    assert _state(after_restart) == ("failed", "interrupted by a server restart")
    assert after_restart.claim_creation(KEY, "app", "f")
