"""The snapshot engine against real CRIU and real processes: checkpoint, restore, and every way it refuses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CHILDREN, STATEFUL, EngineImage, Running, ask

from warmboot.errors import (
    CheckpointError,
    HostSetupError,
    SnapshotCorruptError,
    SnapshotFileChangedError,
    SnapshotIncompatibleError,
)
from warmboot.worker import cgroups, criu
from warmboot.worker import container as containers
from warmboot.worker.sandbox import capabilities
from warmboot.worker.snapshot import MANIFEST, UPPER_COPY, SnapshotStore


def test_restored_copy_keeps_a_large_dict(store: SnapshotStore, running: Running) -> None:
    original = running.start_stateful("--dict-size", "1000000")
    before = ask(original, "before")
    assert before["dict_len"] == 1_000_000

    snap = store.checkpoint(original)  # CRIU kills the original once dumped
    original.wait(timeout=10)

    copy = running.restore(store, snap)
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
        copies = list(pool.map(lambda _: running.restore(store, snap), range(4)))

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
    original = running.start(
        [
            running.image.python,
            "-S",
            "-c",
            "import os,sys\nr=os.fdopen(3,'rb',0)\nw=os.fdopen(4,'wb',0)\nw.write(b'ready\\n')\n"
            "for l in r:\n    print('out:'+l.decode().strip(), flush=True)\n"
            "    print('err:'+l.decode().strip(), file=sys.stderr, flush=True)\n    w.write(b'ok\\n')\n",
        ]
    )
    assert original.channels.control_out.readline() == b"ready\n"
    snap = store.checkpoint(original)
    copy = running.restore(store, snap)
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
    assert stat.S_IMODE(os.stat(snap.path).st_mode) == 0o700
    for path in snap.path.iterdir():
        if path.name == UPPER_COPY:  # the container's writable layer keeps its modes: "/" is 0755 inside
            continue
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, f"{path.name} is readable by others"
    assert (snap.path / UPPER_COPY).is_dir()
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
        running.restore(store, snap)
    assert info.value.snapshot_id == snap.id
    assert any("weights.bin" in line for line in info.value.criu_errors), info.value.criu_errors
    assert snap.broken_reason() is not None
    # Never used twice: even with the file put back, the broken snapshot is refused before CRIU runs.
    (data / "weights.bin").write_bytes(b"original weights" * 1000)
    with pytest.raises(SnapshotCorruptError, match="marked broken"):
        running.restore(store, snap)


def test_deleted_mapped_file_fails_with_typed_error(tmp_path: Path, store: SnapshotStore, running: Running) -> None:
    data = tmp_path / "vol"
    data.mkdir()
    (data / "model.bin").write_bytes(b"M" * 4096)
    original = running.start_stateful("--map", "/vol/model.bin", mounts=(containers.BindMount(str(data), "/vol"),))
    snap = store.checkpoint(original)
    (data / "model.bin").unlink()
    with pytest.raises(SnapshotFileChangedError) as info:
        running.restore(store, snap)
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
        running.restore(store, snap)
    assert info.value.snapshot_id == snap.id
    assert not list(store._logs.glob("restore-*.log")), "CRIU must not have run"


def test_other_cpu_fingerprint_is_refused_before_criu(store: SnapshotStore, running: Running) -> None:
    snap = store.checkpoint(running.start_stateful())
    manifest_path = snap.path / MANIFEST
    m = json.loads(manifest_path.read_text())
    m["cpu"]["model"] = "Some Other CPU @ 9.9GHz"
    manifest_path.write_text(json.dumps(m))
    with pytest.raises(SnapshotIncompatibleError, match="Some Other CPU"):
        running.restore(store, snap.id)
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


def test_partial_dump_of_a_crashed_worker_is_cleaned_up(tmp_path: Path, engine_image: EngineImage) -> None:
    """A worker killed mid-dump leaves a temporary directory; the next store opened there removes it."""
    root = tmp_path / "snaps"
    script = f"""
import sys
sys.path[:0] = {sys.path!r}
from pathlib import Path
from conftest import EngineImage, Running
from warmboot.worker.snapshot import SnapshotStore
r = Running(EngineImage.from_json({engine_image.to_json()!r}), Path({str(tmp_path / "containers")!r}))
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
    running.restore(store, snap)  # verified and restored
    pages = next(p for p in snap.path.iterdir() if p.name.startswith("pages-"))
    data = bytearray(pages.read_bytes())
    data[len(data) // 3] ^= 0x01
    pages.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError, match=pages.name):
        running.restore(store, snap)


# ----- the container design: its own mount tree, its own writable layer, its sandbox kept by a restore -----


def _host_mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def _mount(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(argv)}: {proc.stderr.strip()}"


@pytest.fixture
def extra_host_mount(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted ext4 on the host: before containers had their own mount tree, it made every dump fail."""
    image, target = tmp_path / "extra.ext4", tmp_path / "extra"
    target.mkdir()
    _mount(["truncate", "-s", "16M", str(image)])
    _mount(["mkfs.ext4", "-q", str(image)])
    _mount(["mount", "-o", "loop", str(image), str(target)])  # the loop device is freed on unmount
    yield target
    _mount(["umount", str(target)])


@pytest.fixture
def tmpfs_home(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tmpfs of its own (a home on tmpfs used to fail every snapshot)."""
    target = tmp_path / "tmpfs-home"
    target.mkdir()
    _mount(["mount", "-t", "tmpfs", "-o", "size=512m,mode=0700", "tmpfs", str(target)])
    yield target
    _mount(["umount", str(target)])


def test_snapshots_work_with_an_extra_filesystem_mounted_on_the_host(
    extra_host_mount: Path, store: SnapshotStore, running: Running
) -> None:
    assert str(extra_host_mount) in _host_mount_points()
    volume = extra_host_mount / "volume"  # a volume on that filesystem too: CRIU binds it back as external
    volume.mkdir()
    (volume / "note.txt").write_text("at dump time")
    original = running.start_stateful("--dict-size", "20000", mounts=(containers.BindMount(str(volume), "/data"),))
    before = ask(original, "x")
    snap = store.checkpoint(original, leave_running=True)

    (volume / "note.txt").write_text("after the dump")  # a volume shows the host directory as it is now
    for c in (running.restore(store, snap), running.restore(store, snap)):
        assert ask(c, "x")["dict_digest"] == before["dict_digest"]
        assert ask(c, "read /data/note.txt")["result"] == "after the dump"
        assert ask(c, "write /data/from-copy.txt hello")["result"] is True
        assert (volume / "from-copy.txt").read_text() == "hello", "a volume is the host directory, not a copy"
        mounts = [m for m, _ in ask(c, "mounts")["result"]]
        assert "/data" in mounts
        assert str(extra_host_mount) not in mounts
    assert ask(original, "x")["dict_digest"] == before["dict_digest"]


def test_snapshot_store_and_run_dirs_on_a_tmpfs_of_their_own(tmpfs_home: Path, engine_image: EngineImage) -> None:
    store = SnapshotStore(tmpfs_home / "snapshots")
    running = Running(engine_image, tmpfs_home / "containers")
    try:
        original = running.start_stateful("--dict-size", "20000")
        ask(original, "write /root/kept.txt on-tmpfs")
        before = ask(original, "x")
        snap = store.checkpoint(original)
        original.wait(timeout=10)
        for c in (running.restore(store, snap), running.restore(store, snap)):
            assert ask(c, "x")["dict_digest"] == before["dict_digest"]
            assert ask(c, "read /root/kept.txt")["result"] == "on-tmpfs"
            assert c.run_dir is not None and c.run_dir.is_relative_to(tmpfs_home)
    finally:
        for c in running.all:  # before the tmpfs is unmounted
            with contextlib.suppress(OSError, TimeoutError):
                c.kill(timeout=10)


def test_each_restored_copy_has_its_own_writable_layer(store: SnapshotStore, running: Running) -> None:
    original = running.start_stateful()
    assert ask(original, "write /root/before.txt written-before-the-dump")["result"] is True
    assert ask(original, "remove /etc/debian_version")["result"] is True  # a whiteout in the writable layer
    snap = store.checkpoint(original, leave_running=True)
    assert ask(original, "write /root/late.txt after-the-dump")["result"] is True

    a, b = running.restore(store, snap), running.restore(store, snap)
    for c in (a, b):
        assert ask(c, "read /root/before.txt")["result"] == "written-before-the-dump"
        assert ask(c, "exists /etc/debian_version")["result"] is False, "a deleted image file came back"
        assert ask(c, "exists /root/late.txt")["result"] is False, "a copy saw the original's later write"

    ask(a, "write /root/before.txt changed-by-a")
    ask(a, "write /root/only-a.txt a")
    assert ask(a, "read /root/before.txt")["result"] == "changed-by-a"
    assert ask(b, "read /root/before.txt")["result"] == "written-before-the-dump"
    assert ask(b, "exists /root/only-a.txt")["result"] is False
    assert ask(original, "read /root/before.txt")["result"] == "written-before-the-dump"
    assert ask(original, "exists /root/only-a.txt")["result"] is False

    # The copy's writes land in its own run directory on the host, which goes when the copy ends.
    assert a.run_dir is not None and (a.run_dir / "upper" / "root" / "only-a.txt").read_text() == "a"
    a.kill()
    assert not a.run_dir.exists()
    assert ask(b, "read /root/before.txt")["result"] == "written-before-the-dump"


def test_restored_copies_keep_no_new_privs_seccomp_and_reduced_capabilities(
    store: SnapshotStore, running: Running
) -> None:
    original = running.start_stateful()
    snap = store.checkpoint(original, leave_running=True)
    allowed = capabilities.mask()
    forbidden = capabilities.mask(capabilities.FORBIDDEN + capabilities.DROPPED_FROM_DOCKER)
    copies = [running.restore(store, snap), running.restore(store, snap)]
    for label, c in (("original", original), ("copy 1", copies[0]), ("copy 2", copies[1])):
        status = ask(c, "status")["result"]
        assert status["NoNewPrivs"] == "1", (label, status)
        assert status["Seccomp"] == "2", (label, status)  # 2: a filter is loaded
        for mask in ("CapEff", "CapPrm", "CapBnd"):
            assert int(status[mask], 16) == allowed, (label, mask, status)
            assert int(status[mask], 16) & forbidden == 0, (label, mask, status)


def test_container_sees_no_host_file_and_no_host_mount(tmp_path: Path, store: SnapshotStore, running: Running) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("the host's")
    volume = tmp_path / "volume"
    volume.mkdir()
    original = running.start_stateful(mounts=(containers.BindMount(str(volume), "/data"),))
    snap = store.checkpoint(original, leave_running=True)
    copy = running.restore(store, snap)

    allowed = {"/", "/proc", "/sys", "/tmp", "/dev/shm", "/data"} | {f"/proc/{p}" for p in containers.READ_ONLY_PROC}
    host_only = _host_mount_points() - allowed
    assert host_only, "the host has mounts of its own to look for"
    for label, c in (("original", original), ("copy", copy)):
        assert c.run_dir is not None
        for path in (secret, tmp_path, store.root, c.run_dir, Path(sys.executable)):
            assert ask(c, f"exists {path}")["result"] is False, f"{label} sees the host's {path}"
        mounts = dict(ask(c, "mounts")["result"])
        assert set(mounts) <= allowed, f"{label} has mounts beyond its own: {set(mounts) - allowed}"
        assert not host_only & set(mounts)
        assert mounts["/"] == "overlay", f"{label}'s root is {mounts['/']}"


def test_files_mapped_from_the_image_and_the_writable_layer_are_there_after_a_restore(
    store: SnapshotStore, running: Running
) -> None:
    """CRIU reopens mapped files by path in the copy's root: an image layer's, and the seeded writable layer's."""
    original = running.start_stateful("--map", STATEFUL)  # a file of a read-only layer
    head = Path(CHILDREN, "stateful.py").read_bytes()[:16].decode()
    assert ask(original, f"write /root/weights.bin {'w' * 5000}")["result"] is True
    assert ask(original, "map /root/weights.bin")["more_mapped_heads"] == ["w" * 16]  # a writable-layer file
    snap = store.checkpoint(original, leave_running=True)
    for c in (running.restore(store, snap), running.restore(store, snap)):
        reply = ask(c, "x")
        assert reply["mapped_head"] == head
        assert reply["more_mapped_heads"] == ["w" * 16]


def test_volume_below_a_directory_the_image_has(running: Running, store: SnapshotStore, tmp_path: Path) -> None:
    """A volume at /root/.cache/... (a common place for model caches): its missing ancestors are made in the
    writable layer with the image's modes, so /root stays root's own; original and restored copy see the volume."""
    data = tmp_path / "cache"
    data.mkdir()
    (data / "weights.txt").write_text("cached")
    mount = containers.BindMount(str(data), "/root/.cache/models")
    original = running.start_stateful(mounts=(mount,))
    assert ask(original, "read /root/.cache/models/weights.txt")["result"] == "cached"
    image_root = os.stat(running.image.layers[0] / "root").st_mode & 0o777
    upper_root = (original.run_dir / "upper" / "root").stat().st_mode & 0o777
    assert upper_root == image_root == 0o700
    snap = store.checkpoint(original, leave_running=True)
    copy = running.restore(store, snap)
    assert ask(copy, "read /root/.cache/models/weights.txt")["result"] == "cached"


def test_a_restored_copy_is_born_in_its_cgroups_and_its_memory_is_charged_there(
    store: SnapshotStore, running: Running
) -> None:
    """cgroup v2 never moves what a process was charged: a copy moved after its restore would leave its pages
    charged to the restoring process's group, outside the container's memory limit."""
    original = running.start_stateful("--dict-size", "1000000")
    snap = store.checkpoint(original)
    name = f"test-born-{uuid.uuid4().hex[:8]}"
    groups = cgroups.create(name, cgroups.Limits.for_function(memory_mib=2048, cpu=None))
    try:
        copy = running.add(store.restore(snap, running.run_dir(), cgroups=groups.paths))
        assert ask(copy, "after")["dict_len"] == 1_000_000
        members = {int(p) for g in groups.paths for p in (g / "cgroup.procs").read_text().split()}
        assert set(copy.pids()) <= members
        assert groups.memory is not None
        usage = next(groups.memory / n for n in ("memory.current", "memory.usage_in_bytes")  # v2, v1
                     if (groups.memory / n).exists())  # fmt: skip
        charged = int(usage.read_text())
        assert charged >= snap.pages_bytes // 2, (charged, snap.pages_bytes)
        copy.kill(timeout=10)
    finally:
        groups.remove()


def test_criu_verbosity_is_checked_and_level_4_keeps_a_restores_timestamped_log(
    store: SnapshotStore, running: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WARMBOOT_CRIU_VERBOSITY", "loud")
    with pytest.raises(HostSetupError, match="WARMBOOT_CRIU_VERBOSITY"):
        criu.verbosity()
    monkeypatch.delenv("WARMBOOT_CRIU_VERBOSITY")
    snap = store.checkpoint(running.start_stateful())
    monkeypatch.setenv("WARMBOOT_CRIU_VERBOSITY", "4")
    running.restore(store, snap)
    [log] = list(store._logs.glob(f"restore-{snap.id}-*.log"))
    assert "Restore finished successfully" in log.read_text() and log.read_text().startswith("(")
