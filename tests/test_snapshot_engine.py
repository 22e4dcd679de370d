"""The snapshot engine against real CRIU and real processes: checkpoint, restore, and every way it refuses."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import Running, ask

from warmboot.errors import (
    CheckpointError,
    SnapshotCorruptError,
    SnapshotFileChangedError,
    SnapshotIncompatibleError,
)
from warmboot.worker import container as containers
from warmboot.worker.snapshot import MANIFEST, SnapshotStore


def test_restored_copy_keeps_a_large_dict(store: SnapshotStore, running: Running) -> None:
    original = running.start_stateful("--dict-size", "1000000")
    before = ask(original, "before")
    assert before["dict_len"] == 1_000_000

    snap = store.checkpoint(original)  # CRIU kills the original once dumped
    original.wait(timeout=10)

    copy = running.add(store.restore(snap))
    after = ask(copy, "after")
    assert after["dict_len"] == 1_000_000
    assert after["dict_digest"] == before["dict_digest"]
    assert after["pid_in_namespace"] == before["pid_in_namespace"], "CRIU restores the namespace's PIDs"
    assert copy.pid != original.pid
    assert copy.restored_from == snap.id


def test_checkpoint_can_leave_the_container_running(store: SnapshotStore, running: Running) -> None:
    original = running.start_stateful()
    store.checkpoint(original, leave_running=True)
    assert ask(original, "still there")["request"] == "still there"


def test_four_concurrent_restores_each_answer_on_their_own_channels(store: SnapshotStore, running: Running) -> None:
    snap = store.checkpoint(running.start_stateful("--dict-size", "50000"))
    with ThreadPoolExecutor(4) as pool:
        copies = [running.add(c) for c in pool.map(lambda _: store.restore(snap), range(4))]

    replies = {}
    with ThreadPoolExecutor(4) as pool:
        for c, reply in zip(copies, pool.map(lambda c: ask(c, f"token-{c.pid}"), copies), strict=True):
            replies[c.pid] = reply
    assert len(replies) == 4, "each copy has its own host PID"
    for pid, reply in replies.items():
        assert reply["request"] == f"token-{pid}", "a copy answered on another copy's channel"
        assert reply["dict_len"] == 50_000
    for c in copies:  # each copy ends on its own; the others go on
        c.kill()
        assert c.returncode == -signal.SIGKILL


def test_stdout_of_a_restored_copy_reaches_its_own_pipe(store: SnapshotStore, running: Running) -> None:
    spec = containers.ContainerSpec(
        argv=[
            sys.executable,
            "-S",
            "-c",
            "import os,sys\nr=os.fdopen(3,'rb',0)\nw=os.fdopen(4,'wb',0)\nw.write(b'ready\\n')\n"
            "for l in r:\n    print('out:'+l.decode().strip(), flush=True)\n"
            "    print('err:'+l.decode().strip(), file=sys.stderr, flush=True)\n    w.write(b'ok\\n')\n",
        ],
        private_tmp=False,  # the checkout's .venv may live under /tmp
    )
    original = running.add(containers.start(spec))
    assert original.channels.control_out.readline() == b"ready\n"
    snap = store.checkpoint(original)
    copy = running.add(store.restore(snap))
    copy.channels.control_in.write(b"x\n")
    assert copy.channels.control_out.readline() == b"ok\n"
    assert copy.channels.stdout.readline() == b"out:x\n"
    assert copy.channels.stderr.readline() == b"err:x\n"


def test_snapshot_has_manifest_and_is_root_only(store: SnapshotStore, running: Running) -> None:
    snap = store.checkpoint(running.start_stateful())
    m = json.loads((snap.path / MANIFEST).read_text())
    for key in (
        "format_version",
        "criu_version",
        "kernel",
        "cpu",
        "files",
        "channels",
        "created_at",
        "total_bytes",
    ):
        assert key in m
    assert set(m["channels"]) == {"control_in", "control_out", "stdout", "stderr"}
    assert any(name.startswith("pages-") for name in m["files"])
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    for path in snap.path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path.name} is readable by others"
    assert [s.id for s in store.list()] == [snap.id]


def test_changed_mapped_file_fails_with_typed_error(tmp_path: Path, store: SnapshotStore, running: Running) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "weights.bin").write_bytes(b"original weights" * 1000)
    mount = containers.BindMount(str(data), "/data")
    original = running.start_stateful("--map", "/data/weights.bin", mounts=(mount,))
    assert ask(original, "x")["mapped_head"] == "original weights"
    snap = store.checkpoint(original)

    (data / "weights.bin").write_bytes(b"changed!" * 10)  # a different size, as after a volume edit
    with pytest.raises(SnapshotFileChangedError) as info:
        store.restore(snap)
    assert info.value.snapshot_id == snap.id
    assert any("weights.bin" in line for line in info.value.criu_errors), info.value.criu_errors
    assert snap.broken_reason() is not None
    # Never used twice: even with the file put back, the broken snapshot is refused before CRIU runs.
    (data / "weights.bin").write_bytes(b"original weights" * 1000)
    with pytest.raises(SnapshotCorruptError, match="marked broken"):
        store.restore(snap)


def test_deleted_mapped_file_fails_with_typed_error(tmp_path: Path, store: SnapshotStore, running: Running) -> None:
    data = tmp_path / "vol"
    data.mkdir()
    (data / "model.bin").write_bytes(b"M" * 4096)
    original = running.start_stateful("--map", "/vol/model.bin", mounts=(containers.BindMount(str(data), "/vol"),))
    snap = store.checkpoint(original)
    (data / "model.bin").unlink()
    with pytest.raises(SnapshotFileChangedError) as info:
        store.restore(snap)
    assert info.value.criu_errors


def test_corrupted_page_image_is_refused(store: SnapshotStore, running: Running) -> None:
    snap = store.checkpoint(running.start_stateful())
    pages = next(p for p in snap.path.iterdir() if p.name.startswith("pages-"))
    with open(pages, "r+b") as f:
        f.seek(pages.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotCorruptError, match=pages.name) as info:
        store.restore(snap)
    assert info.value.snapshot_id == snap.id
    assert not list(store._logs.glob("restore-*.log")), "CRIU must not have run"


def test_other_cpu_fingerprint_is_refused_before_criu(store: SnapshotStore, running: Running) -> None:
    snap = store.checkpoint(running.start_stateful())
    manifest_path = snap.path / MANIFEST
    m = json.loads(manifest_path.read_text())
    m["cpu"]["model"] = "Some Other CPU @ 9.9GHz"
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(SnapshotIncompatibleError, match="Some Other CPU"):
        store.restore(snap.id)
    assert snap.broken_reason() is None, "a snapshot from another host is not broken, only elsewhere"


def _criu_dump_pids(target_pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dump" in argv and str(target_pid).encode() in argv:
            found.append(int(entry.name))
    return found


def test_dump_interrupted_half_way_publishes_nothing(store: SnapshotStore, running: Running) -> None:
    original = running.start_stateful("--fill-mb", "400")
    outcome: dict[str, BaseException] = {}

    def dump() -> None:
        try:
            store.checkpoint(original, snapshot_id="interrupted")
        except CheckpointError as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=dump)
    worker.start()
    killed = False
    deadline = time.monotonic() + 30
    while worker.is_alive() and time.monotonic() < deadline and not killed:
        partial = [p for d in store.root.glob(".tmp-interrupted-*") for p in d.glob("pages-*.img")]
        if partial and partial[0].stat().st_size > 0:
            for pid in _criu_dump_pids(original.pid):
                os.kill(pid, signal.SIGKILL)
                killed = True
        time.sleep(0.002)
    worker.join(60)
    assert killed, "the dump finished before it could be interrupted"
    assert isinstance(outcome.get("error"), CheckpointError)
    assert store.list() == []
    assert not (store.root / "interrupted").exists()
    assert not list(store.root.glob(".tmp-*")), "the partial dump was left behind"


def test_partial_dump_of_a_crashed_worker_is_cleaned_up(tmp_path: Path) -> None:
    """A worker killed mid-dump leaves a temporary directory; the next store opened there removes it."""
    root = tmp_path / "snaps"
    script = f"""
import sys
sys.path[:0] = {sys.path!r}
from conftest import Running
from warmboot.worker.snapshot import SnapshotStore
r = Running()
c = r.start_stateful("--fill-mb", "400")
print("dumping", flush=True)
SnapshotStore({str(root)!r}).checkpoint(c, snapshot_id="crashed")
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    assert worker.stdout is not None
    assert worker.stdout.readline() == b"dumping\n"
    deadline = time.monotonic() + 30
    while not list(root.glob(".tmp-crashed-*/pages-*.img")) and time.monotonic() < deadline:
        time.sleep(0.002)
    worker.kill()  # the worker dies; its CRIU may finish on its own, but nothing renames the result
    worker.wait()
    assert not (root / "crashed").exists()
    assert SnapshotStore(root).list() == []
    # CRIU may still be writing into it for a moment; once it is gone, nothing stays.
    deadline = time.monotonic() + 30
    while list(root.glob(".tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
        SnapshotStore(root)
    assert not list(root.glob(".tmp-*"))


def test_corruption_after_a_good_restore_is_still_refused(store: SnapshotStore, running: Running) -> None:
    """Checksums are verified once per file version: a later write to an image is caught on the next restore."""
    snap = store.checkpoint(running.start_stateful())
    running.add(store.restore(snap))  # verified and restored
    pages = next(p for p in snap.path.iterdir() if p.name.startswith("pages-"))
    data = bytearray(pages.read_bytes())
    data[len(data) // 3] ^= 0x01
    pages.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError, match=pages.name):
        store.restore(snap)
