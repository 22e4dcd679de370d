"""Page images compressed on disk and their uncompressed copies in memory (worker/snapshot_files.py).

The first tests run on byte buffers (no CRIU): packing, unpacking, checksums, the cache's budget, pins and sweep.
The last ones dump and restore real containers through the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import Running, ask

from warmboot.errors import InvalidOptionError, SnapshotCorruptError
from warmboot.worker import snapshot_files
from warmboot.worker.snapshot import SnapshotStore
from warmboot.worker.snapshot_files import MemoryCache

MB = 1 << 20


def _memory_like(size: int) -> bytes:
    """Bytes that compress about as process memory does: runs of zeros between random stretches."""
    chunk = os.urandom(4096) + bytes(3 * 4096)
    return (chunk * (size // len(chunk) + 1))[:size]


def _fake_snapshot(store_root: Path, snapshot_id: str, size: int = 2 * MB) -> tuple[Path, dict[str, Any]]:
    """A snapshot folder with one packed page image and one small image, and its manifest (as the store writes)."""
    folder = store_root / snapshot_id
    folder.mkdir(parents=True)
    (folder / "pages-1.img").write_bytes(_memory_like(size))
    (folder / "core-1.img").write_bytes(b"core")
    files = {"pages-1.img": snapshot_files.pack(folder / "pages-1.img")}
    core = (folder / "core-1.img").read_bytes()
    files["core-1.img"] = {"size": len(core), "xxh3_128": "not checked here"}
    return folder, {"id": snapshot_id, "created_at": 1.0, "files": files}


def _cache_with_one_snapshot(tmp_path: Path) -> tuple[MemoryCache, Path, dict[str, Any]]:
    """A store holding one snapshot "a", and a cache for it with room for 10 MB."""
    store = tmp_path / "store"
    folder, manifest = _fake_snapshot(store, "a")
    return MemoryCache(store, root=tmp_path / "cache", budget=10 * MB), folder, manifest


def test_pack_stores_a_smaller_file_and_unpack_gives_the_bytes_back(tmp_path: Path) -> None:
    data = _memory_like(3 * MB)
    raw = tmp_path / "pages-1.img"
    raw.write_bytes(data)
    entry = snapshot_files.pack(raw, copy_to=tmp_path / "copy.img")

    assert not raw.exists(), "the raw image is replaced by its compressed one"
    stored = tmp_path / entry["stored_name"]
    assert stored.name == "pages-1.img.zst" and stored.stat().st_size == entry["stored_size"]
    assert entry["size"] == len(data) and entry["stored_size"] < len(data) // 2
    assert (tmp_path / "copy.img").read_bytes() == data, "the copy made on the way is the raw image"
    snapshot_files.unpack(stored, tmp_path / "back.img", entry, "s1")
    assert (tmp_path / "back.img").read_bytes() == data


def test_unpack_refuses_other_bytes_and_a_broken_stream(tmp_path: Path) -> None:
    raw = tmp_path / "pages-1.img"
    raw.write_bytes(_memory_like(2 * MB))
    entry = snapshot_files.pack(raw)
    stored = tmp_path / entry["stored_name"]

    with pytest.raises(SnapshotCorruptError, match="decompresses to other bytes"):
        snapshot_files.unpack(stored, tmp_path / "out", {**entry, "xxh3_128": "0" * 32}, "s1")
    data = bytearray(stored.read_bytes())
    del data[len(data) // 2 :]  # a truncated stream
    stored.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError) as info:
        snapshot_files.unpack(stored, tmp_path / "out", entry, "s1")
    assert info.value.snapshot_id == "s1"


def test_a_copy_is_made_on_a_miss_kept_and_reused(tmp_path: Path) -> None:
    cache, folder, manifest = _cache_with_one_snapshot(tmp_path)

    with cache.images("a", folder, manifest) as images:
        assert images == cache.dir / "a"
        assert (images / "pages-1.img").stat().st_size == manifest["files"]["pages-1.img"]["size"]
        assert (images / "core-1.img").read_bytes() == b"core"
    (folder / "pages-1.img.zst").unlink()  # a second use reads the copy, not the disk
    with cache.images("a", folder, manifest) as images:
        assert (images / "pages-1.img").exists()


def test_without_budget_the_copy_lives_only_for_one_restore(tmp_path: Path) -> None:
    store = tmp_path / "store"
    folder, manifest = _fake_snapshot(store, "a")
    cache = MemoryCache(store, root=tmp_path / "cache", budget=0)
    with cache.images("a", folder, manifest) as images:
        assert (images / "pages-1.img").exists()
        once = images
    assert not once.exists()
    assert [p.name for p in cache.dir.iterdir() if not p.name.startswith(".")] == ["store"]


def test_least_recently_used_copies_are_evicted_to_fit_the_budget(tmp_path: Path) -> None:
    store = tmp_path / "store"
    snaps = {sid: _fake_snapshot(store, sid) for sid in "abc"}
    cache = MemoryCache(store, root=tmp_path / "cache", budget=5 * MB)  # room for two 2 MB copies
    for sid in ("a", "b"):
        with cache.images(sid, *snaps[sid]):
            pass
    os.utime(cache.dir / "b" / ".complete", (1, 1))  # b is now the least recently used
    with cache.images("c", *snaps["c"]):
        pass
    assert {p.name for p in cache.dir.iterdir() if not p.name.startswith(".")} == {"a", "c", "store"}


def test_a_copy_in_use_is_never_evicted(tmp_path: Path) -> None:
    cache, folder, manifest = _cache_with_one_snapshot(tmp_path)
    with cache.images("a", folder, manifest) as images:
        other = MemoryCache(tmp_path / "store", root=tmp_path / "cache", budget=10 * MB)  # as another process would
        other.drop("a")
        assert (images / "pages-1.img").exists(), "a restore reading the copy keeps it"
    cache.drop("a")
    assert not (cache.dir / "a").exists()


def test_a_copy_of_an_older_snapshot_of_the_same_id_is_not_used(tmp_path: Path) -> None:
    cache, folder, manifest = _cache_with_one_snapshot(tmp_path)
    with cache.images("a", folder, manifest):
        pass
    (cache.dir / "a" / "core-1.img").write_bytes(b"old!")
    newer = {**manifest, "created_at": 2.0}
    with cache.images("a", folder, newer) as images:
        assert (images / "core-1.img").read_bytes() == b"core"


def test_a_leftover_folder_in_the_copys_place_is_replaced(tmp_path: Path) -> None:
    cache, folder, manifest = _cache_with_one_snapshot(tmp_path)
    leftover = cache.dir / "a"
    leftover.mkdir(parents=True)
    (leftover / "pages-1.img").write_bytes(b"half")  # no .complete: an eviction cut short, say
    with cache.images("a", folder, manifest) as images:
        assert images == leftover
        assert (images / "pages-1.img").stat().st_size == manifest["files"]["pages-1.img"]["size"]


def test_the_cache_recovers_when_its_folder_is_removed_under_it(tmp_path: Path) -> None:
    cache, folder, manifest = _cache_with_one_snapshot(tmp_path)
    with cache.images("a", folder, manifest):
        pass
    shutil.rmtree(tmp_path / "cache")  # an operator cleaning /dev/shm, say
    assert cache.staging_for("b", MB) is not None
    with cache.images("a", folder, manifest) as images:
        assert (images / "pages-1.img").exists()


def test_a_cache_that_cannot_be_written_gives_no_staging_instead_of_failing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (tmp_path / "not-a-folder").write_text("")
    cache = MemoryCache(store, root=tmp_path / "not-a-folder", budget=10 * MB)
    assert cache.staging_for("a", MB) is None


def test_copies_of_stores_that_are_gone_are_swept(tmp_path: Path) -> None:
    gone = tmp_path / "gone-store"
    folder, manifest = _fake_snapshot(gone, "a")
    with MemoryCache(gone, root=tmp_path / "cache", budget=10 * MB).images("a", folder, manifest):
        pass
    stale = MemoryCache(gone, root=tmp_path / "cache").dir
    assert (stale / "a").is_dir()
    shutil.rmtree(gone)

    live = tmp_path / "store"
    folder, manifest = _fake_snapshot(live, "b")
    with MemoryCache(live, root=tmp_path / "cache", budget=10 * MB).images("b", folder, manifest):
        pass
    assert not stale.exists()


def test_budget_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMBOOT_SNAPSHOT_CACHE_MB", "lots")
    with pytest.raises(InvalidOptionError, match="WARMBOOT_SNAPSHOT_CACHE_MB"):
        snapshot_files.budget_from_env()
    monkeypatch.setenv("WARMBOOT_SNAPSHOT_CACHE_MB", "64")
    assert snapshot_files.budget_from_env() == 64 * MB


# ----- through the store, with real CRIU ------------------------------------------------------------------


def test_snapshot_pages_are_compressed_on_disk_and_restore_the_same_state(
    tmp_path: Path, store: SnapshotStore, running: Running
) -> None:
    original = running.start_stateful("--dict-size", "1000000")
    before = ask(original, "before")
    snap = store.checkpoint(original, leave_running=True)

    packed = {n: f for n, f in snap.manifest["files"].items() if "stored_name" in f}
    assert packed, snap.manifest["files"]
    for name, entry in packed.items():
        assert not (snap.path / name).exists() and (snap.path / entry["stored_name"]).exists()
    assert snap.size_bytes < snap.memory_bytes / 2
    assert snap.rss_bytes and snap.rss_bytes > snap.pages_bytes / 2
    assert (store.cache.dir / snap.id / ".complete").exists(), "the dump's copy is kept in memory"

    first = running.restore(store, snap)
    store.cache.drop(snap.id)  # evicted: the next restore decompresses from disk, and keeps that copy
    assert not (store.cache.dir / snap.id).exists()
    second = running.restore(store, snap)
    assert (store.cache.dir / snap.id / ".complete").exists()
    for copy in (first, second):
        after = ask(copy, "after")
        assert after["dict_digest"] == before["dict_digest"] and after["dict_len"] == before["dict_len"]


def test_a_corrupted_compressed_image_is_refused_and_marks_the_snapshot_broken(
    store: SnapshotStore, running: Running
) -> None:
    snap = store.checkpoint(running.start_stateful("--dict-size", "1000000"))
    [stored] = [snap.path / f["stored_name"] for f in snap.manifest["files"].values() if "stored_name" in f][:1]
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x40
    stored.write_bytes(bytes(data))
    with pytest.raises(SnapshotCorruptError, match=stored.name):
        running.restore(store, snap)
    assert "checksum" in json.loads((snap.path / "broken.json").read_text())["reason"]


def test_the_copies_live_on_a_tmpfs_of_their_own_with_huge_pages(store: SnapshotStore, running: Running) -> None:
    snap = store.checkpoint(running.start_stateful("--dict-size", "1000000"))
    root = store.cache.root
    assert root == snapshot_files.cache_root_from_env() and os.path.ismount(root)
    [line] = [ln.split() for ln in Path("/proc/self/mountinfo").read_text().splitlines() if ln.split()[4] == str(root)]
    fs_type, options = line[line.index("-") + 1], line[-1]
    assert fs_type == "tmpfs" and "huge=within_size" in options, line
    assert oct(os.stat(root).st_mode & 0o777) == "0o700"
    pages = max((store.cache.dir / snap.id).glob("pages-*.img"), key=lambda p: p.stat().st_size)
    assert pages.stat().st_size == snap.manifest["files"][pages.name]["size"]
