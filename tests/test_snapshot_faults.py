"""Faults of the snapshot store, end to end: real server, real containers, real CRIU, real filesystem faults.

A snapshot directory deleted by hand, a corrupted pages image, a full disk during the dump (a small tmpfs under
the store), an OS refusal while publishing (an immutable or append-only store directory, a read-only bind mount
over it). Whatever happens to the store, the call is served (by a cold-booted container), the app's log says
what happened, ``warmboot snapshot list`` shows the key's state with its reason, and no key is left
``creating``. The policy itself (server/snapshot_policy.py) is tested case by case in test_snapshot_policy.py.

The servers here run with a one-second back-off (``WARMBOOT_SNAPSHOT_BACKOFF_S``) so that a creation the host
refused is retried by the next cold start once the fault is gone, without waiting the default 30 s.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from platform_helpers import SNAPSHOT_LIST_COLUMNS, Platform

BACKOFF_S = "1"
ENV = {"WARMBOOT_SNAPSHOT_BACKOFF_S": BACKOFF_S, "COLUMNS": "400"}  # a wide terminal: rich wraps no cell
CLI_COLUMNS = SNAPSHOT_LIST_COLUMNS

# Calls a function once in a fresh SDK process; prints the result as one JSON line.
_CALL = """
import json, warmboot
print(json.dumps(warmboot.Function.from_name({app!r}, {tag!r}).remote()))
"""
# The server's snapshot records as the API gives them (retry_at and the counters the CLI does not show).
_RECORDS = """
import json
from warmboot.sdk import client
print(json.dumps(client.request("snapshot_list")))
"""


@pytest.fixture(scope="module")
def platform() -> Iterator[Platform]:
    """A server of this module's own, with a short back-off (the session's server has the default)."""
    p = Platform(extra_env=ENV)
    p.start_server()
    yield p
    p.close()


# ----- helpers -----------------------------------------------------------------------------------------------


def _deploy(platform: Platform, prefix: str, body: str) -> tuple[str, Path]:
    """Deploy a new app (unique name) whose source is ``body`` after the App line; returns (name, path)."""
    app = f"{prefix}-{uuid.uuid4().hex[:8]}"
    source = f"import os\nimport warmboot as modal\n\napp = modal.App({app!r})\n" + textwrap.dedent(body)
    path = platform.write_app(app.replace("-", "_"), source)
    platform.cli("deploy", str(path))
    return app, path


_WHOAMI = """
BLOB = os.urandom({size})  # part of the snapshot

@app.function(enable_memory_snapshot=True)
def whoami():
    return {{"container": os.environ["WARMBOOT_CONTAINER_ID"], "blob": len(BLOB)}}
"""


def _call(platform: Platform, app: str, tag: str = "whoami") -> dict[str, Any]:
    proc = platform.python(_CALL.format(app=app, tag=tag), timeout=240)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _new_cold_start(platform: Platform, app: str, path: Path) -> None:
    """Leave the app with no container; an unchanged deploy keeps the code, hence the snapshot's key."""
    platform.cli("app", "stop", app)
    platform.cli("deploy", str(path))


def _lines(platform: Platform, app: str, needle: str) -> list[str]:
    return [line for line in platform.log_text(app).splitlines() if needle in line]


def _wait_lines(platform: Platform, app: str, needle: str, count: int, deadline_s: float = 30.0) -> list[str]:
    """The app log's lines holding ``needle``, once there are ``count`` of them (or the deadline passed)."""
    end = time.monotonic() + deadline_s
    while len(found := _lines(platform, app, needle)) < count and time.monotonic() < end:
        time.sleep(0.05)
    return found


def _records(platform: Platform, label: str) -> list[dict[str, Any]]:
    """The server's snapshot records of function ``label`` ("app.tag"), from its API."""
    rows = json.loads(platform.python(_RECORDS).stdout.strip().splitlines()[-1])
    return [r for r in rows if f"{r['app_name']}.{r['tag']}" == label]


def _cli_rows(platform: Platform) -> list[dict[str, str]]:
    """Every row of the real `warmboot snapshot list` (a cell wrapped onto more lines is joined again)."""
    out = platform.cli("snapshot", "list").stdout
    rows: list[dict[str, str]] = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) != len(CLI_COLUMNS):
            continue
        if cells[0] or not rows:
            rows.append(dict(zip(CLI_COLUMNS, cells, strict=True)))
        else:  # the same row, continued
            rows[-1] = {k: f"{v} {c}".strip() for (k, v), c in zip(rows[-1].items(), cells, strict=True)}
    return rows


def _cli_row(platform: Platform, label: str) -> dict[str, str]:
    rows = _cli_rows(platform)
    assert "creating" not in [r["state"] for r in rows], f"a key was left 'creating': {rows}"
    [row] = [r for r in rows if r["function"] == label]
    return row


def _published(platform: Platform, app: str, snapshots: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) of the published snapshots of ``app`` in the store."""
    found = []
    root = snapshots or platform.home / "snapshots"
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not entry.name.startswith(".") and (entry / "manifest.json").is_file():
            manifest = json.loads((entry / "manifest.json").read_text())
            if manifest.get("metadata", {}).get("app") == app:
                found.append((entry, manifest))
    return found


def _largest_pages(snap_dir: Path) -> Path:
    return max(snap_dir.glob("pages-*.img*"), key=lambda p: p.stat().st_size)


def _wait_past_retry(platform: Platform, label: str) -> None:
    """Wait out the back-off of a refused creation: until the time the server set in its record."""
    [record] = _records(platform, label)
    assert record["retry_at"] is not None, record
    assert record["retry_at"] - time.time() <= float(BACKOFF_S) * 4, "the back-off must be the configured one"
    while time.time() < record["retry_at"]:
        time.sleep(0.05)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


# ----- a snapshot directory deleted by hand -----------------------------------------------------------------


def test_deleted_snapshot_is_logged_missing_booted_cold_and_made_again(platform: Platform) -> None:
    app, path = _deploy(platform, "fault-missing", _WHOAMI.format(size=1 << 20))
    label = f"{app}.whoami"
    creating, created = f"Creating memory snapshot for {label}", "Snapshot created in"
    failed = f"Restore of {label} from memory snapshot"

    _call(platform, app)
    [(first_dir, manifest)] = _published(platform, app)
    key = manifest["metadata"]["key"]

    # Deleted by hand: the next cold start says so, boots cold, serves, and makes the snapshot again.
    _new_cold_start(platform, app, path)
    shutil.rmtree(first_dir)
    second = _call(platform, app)
    [missing] = _wait_lines(platform, app, failed, 1)
    assert f"memory snapshot {first_dir.name} failed (missing" in missing and "booting cold" in missing, missing
    assert "no such snapshot" in missing, missing
    assert _lines(platform, app, f"Container {second['container']} started for {label} (cold boot")
    assert len(_wait_lines(platform, app, creating, 2)) == 2
    assert len(_lines(platform, app, created)) == 2
    [(second_dir, second_manifest)] = _published(platform, app)
    assert second_dir != first_dir and second_manifest["metadata"]["key"] == key
    row = _cli_row(platform, label)
    assert (row["key"], row["state"], row["note"]) == (key[:12], "ok", ""), row
    [record] = _records(platform, label)
    assert (record["missing_recreations"], record["recreations"]) == (1, 0), record

    # The made-again snapshot restores.
    _new_cold_start(platform, app, path)
    third = _call(platform, app)
    assert _lines(platform, app, f"Restored {label} from memory snapshot in")
    assert _lines(platform, app, f"(container {third['container']}:")

    # A 'missing' recreation did not use up the one 'corrupt' recreation: a corrupted snapshot is made again.
    _new_cold_start(platform, app, path)
    pages = _largest_pages(second_dir)
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)
    _call(platform, app)
    assert "(corrupt" in _wait_lines(platform, app, failed, 2)[-1]
    assert len(_wait_lines(platform, app, creating, 3)) == 3, "the corrupt allowance must still be there"
    [record] = _records(platform, label)
    assert (record["state"], record["missing_recreations"], record["recreations"]) == ("ok", 1, 1), record

    # The whole store cleaned out (a cleaned disk), then the snapshot's directory again: made again each time,
    # up to the allowance for vanished snapshots; then the key stays 'missing' and the function boots cold.
    [(third_dir, _)] = _published(platform, app)
    for round_, doomed in enumerate([platform.home / "snapshots", None, None], start=3):
        _new_cold_start(platform, app, path)
        shutil.rmtree(doomed or _published(platform, app)[0][0])
        result = _call(platform, app)
        assert "(missing" in _wait_lines(platform, app, failed, round_)[-1]
        assert _lines(platform, app, f"Container {result['container']} started for {label} (cold boot")
    assert not third_dir.exists()
    assert len(_lines(platform, app, creating)) == 5, "3 vanished-snapshot recreations after the corrupt one"
    assert _published(platform, app) == []
    row = _cli_row(platform, label)
    assert row["state"] == "missing" and row["note"].startswith("missing: SnapshotNotFoundError"), row
    [record] = _records(platform, label)
    assert (record["missing_recreations"], record["recreations"]) == (3, 1), record


# ----- a corrupted pages image ------------------------------------------------------------------------------


def test_corrupted_snapshot_is_refused_served_cold_and_recreated_at_most_once(platform: Platform) -> None:
    app, path = _deploy(platform, "fault-corrupt", _WHOAMI.format(size=1 << 20))
    label = f"{app}.whoami"
    creating, failed = f"Creating memory snapshot for {label}", f"Restore of {label} from memory snapshot"

    _call(platform, app)
    [(first_dir, _)] = _published(platform, app)

    # Truncated: refused by its checksums before CRIU runs, discarded, the input served cold, made again once.
    _new_cold_start(platform, app, path)
    pages = _largest_pages(first_dir)
    with open(pages, "r+b") as f:
        f.truncate(pages.stat().st_size // 2)
    cold = _call(platform, app)
    [refusal] = _wait_lines(platform, app, failed, 1)
    assert f"snapshot {first_dir.name} failed (corrupt" in refusal and "booting cold" in refusal, refusal
    assert f"image {pages.name} does not match its checksum" in refusal, refusal
    assert _lines(platform, app, f"Container {cold['container']} started for {label} (cold boot")
    assert not first_dir.exists(), "a corrupted snapshot must be discarded"
    assert len(_wait_lines(platform, app, creating, 2)) == 2
    [(second_dir, _)] = _published(platform, app)
    assert _cli_row(platform, label)["state"] == "ok"

    # Overwritten in place (same size): refused again; this time it is not made again.
    _new_cold_start(platform, app, path)
    pages = _largest_pages(second_dir)
    with open(pages, "r+b") as f:
        f.seek(pages.stat().st_size // 2)
        f.write(b"\xa5" * 4096)
    cold = _call(platform, app)
    [_, refusal] = _wait_lines(platform, app, failed, 2)
    assert f"snapshot {second_dir.name} failed (corrupt" in refusal and "checksum" in refusal, refusal
    assert _lines(platform, app, f"Container {cold['container']} started for {label} (cold boot")
    assert not second_dir.exists() and _published(platform, app) == []
    row = _cli_row(platform, label)
    assert row["state"] == "broken" and "corrupt: SnapshotCorruptError" in row["note"], row
    assert "checksum" in _records(platform, label)[0]["reason"]

    # From now on: cold boots, no restore attempt, no snapshot.
    _new_cold_start(platform, app, path)
    cold = _call(platform, app)
    assert _lines(platform, app, f"Container {cold['container']} started for {label} (cold boot")
    assert len(_lines(platform, app, failed)) == 2, "a corrupted snapshot must never be tried twice"
    assert len(_lines(platform, app, creating)) == 2, "a corrupt snapshot is made again at most once per version"
    assert _lines(platform, app, "Restored ") == []
    assert _cli_row(platform, label)["state"] == "broken"


# ----- a full disk during the dump --------------------------------------------------------------------------


@pytest.fixture
def small_disk() -> Iterator[Platform]:
    """A platform whose store is a 2 MiB tmpfs, mounted before the server starts; unmounted afterwards."""
    p = Platform(extra_env=ENV)
    snapshots = p.home / "snapshots"
    snapshots.mkdir(mode=0o700)
    try:
        _run("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "warmboot-test-snapshots", str(snapshots))
        p.start_server()
        yield p
    finally:
        p.stop_server()
        if subprocess.run(["umount", str(snapshots)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(snapshots)], check=False)
        p.close()


def test_full_disk_during_dump_fails_the_snapshot_not_the_call(small_disk: Platform) -> None:
    platform = small_disk
    snapshots = platform.home / "snapshots"
    app, path = _deploy(platform, "fault-disk", _WHOAMI.format(size=8 << 20))  # 8 MB of pages > 2 MiB
    label = f"{app}.whoami"

    result = _call(platform, app)
    assert result["blob"] == 8 << 20
    assert _lines(platform, app, f"Container {result['container']} started for {label} (cold boot")
    [failure] = _lines(platform, app, f"Memory snapshot of {label} failed")
    assert f"(the host refused; a later cold boot retries in {BACKOFF_S} s)" in failure, failure
    assert "No space left on device" in platform.log_text(app), "CRIU's own error lines must be in the log"
    row = _cli_row(platform, label)
    assert row["state"] == "failed" and row["note"].startswith("No space left on device: CheckpointError"), row
    assert _published(platform, app) == []
    assert [e.name for e in snapshots.iterdir()] == [".logs"], "a failed dump must leave nothing behind"
    assert shutil.disk_usage(snapshots).used == 0

    # Room again; once the back-off is over, the next cold start makes the snapshot, and the one after restores.
    _run("mount", "-o", "remount,size=256m", str(snapshots))
    _wait_past_retry(platform, label)
    _new_cold_start(platform, app, path)
    _call(platform, app)
    assert len(_wait_lines(platform, app, f"Creating memory snapshot for {label}", 2)) == 2
    assert _lines(platform, app, "Snapshot created in")
    [(_, manifest)] = _published(platform, app)
    assert manifest["total_bytes"] > 2 << 20
    row = _cli_row(platform, label)
    assert (row["state"], row["note"]) == ("ok", ""), row
    assert row["size"] != "-"

    _new_cold_start(platform, app, path)
    restored = _call(platform, app)
    assert _lines(platform, app, f"(container {restored['container']}:")
    assert _cli_row(platform, label)["restores"] == "1"


# ----- an OS error while publishing -------------------------------------------------------------------------


def _chattr(flag: str) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    return (lambda d: _run("chattr", f"+{flag}", str(d))), (lambda d: _run("chattr", f"-{flag}", str(d)))


def _ro_bind(d: Path) -> None:
    _run("mount", "--bind", str(d), str(d))
    _run("mount", "-o", "remount,bind,ro", str(d))


# fault: (apply, undo, what the reason says). Immutable: the temporary directory cannot be made; append-only:
# it is made and CRIU dumps into it, but renaming it into place (publishing) fails; read-only: EROFS.
FAULTS: dict[str, tuple[Callable[[Path], None], Callable[[Path], None], str]] = {
    "immutable": (*_chattr("i"), "[Errno 1] Operation not permitted"),
    "append-only-rename": (*_chattr("a"), "[Errno 1] Operation not permitted"),
    "read-only-bind-mount": (_ro_bind, lambda d: _run("umount", str(d)), "[Errno 30] Read-only file system"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_os_error_while_publishing_fails_the_snapshot_not_the_call(platform: Platform, fault: str) -> None:
    apply, undo, expected = FAULTS[fault]
    snapshots = platform.home / "snapshots"
    app, path = _deploy(platform, f"fault-{fault.split('-')[0]}", _WHOAMI.format(size=1 << 20))
    label = f"{app}.whoami"
    before = {e.name for e in snapshots.iterdir()}

    apply(snapshots)
    try:
        result = _call(platform, app)
    finally:
        undo(snapshots)
    assert _lines(platform, app, f"Container {result['container']} started for {label} (cold boot")
    [failure] = _lines(platform, app, f"Memory snapshot of {label} failed")
    assert "(the host refused; a later cold boot retries in" in failure and expected in failure, failure
    if fault == "append-only-rename":  # the dump went through: the rename into place is what failed
        assert f"{snapshots}/.tmp-" in failure and f"' -> '{snapshots}/" in failure, failure
        leftovers = [e for e in snapshots.iterdir() if e.name not in before]
        assert all(e.name.startswith(".tmp-") and not any(e.iterdir()) for e in leftovers), leftovers
    else:
        assert {e.name for e in snapshots.iterdir()} == before
    assert _published(platform, app) == []
    row = _cli_row(platform, label)
    assert row["state"] == "failed" and expected in row["note"], row

    # The fault gone and the back-off over, the next cold start makes the snapshot.
    _wait_past_retry(platform, label)
    _new_cold_start(platform, app, path)
    _call(platform, app)
    assert len(_wait_lines(platform, app, f"Creating memory snapshot for {label}", 2)) == 2
    assert len(_published(platform, app)) == 1
    assert _cli_row(platform, label)["state"] == "ok"


def test_no_key_is_left_creating(platform: Platform) -> None:
    """After every fault above (the module's server): each key shows a settled state, failures their reason."""
    rows = _cli_rows(platform)
    assert all(r["state"] in {"ok", "missing", "broken", "failed"} for r in rows), rows
    assert all(r["note"] for r in rows if r["state"] != "ok"), rows
