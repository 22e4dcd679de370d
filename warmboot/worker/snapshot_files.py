"""A snapshot's page images: compressed with zstd on disk, kept uncompressed in memory for restores.

Process memory compresses well (the Embedder's 339 MB of pages become 71 MB at zstd level 1), so a snapshot
takes a fifth of the disk. CRIU cannot read compressed images, and decompressing costs about 0.3 s per
340 MB, more than a warm restore itself; so restores read an uncompressed copy kept in a tmpfs
(:class:`MemoryCache`), made once per snapshot: while the dump is packed (the pages pass through memory then
anyway), or on the first restore after the copy was evicted or the host rebooted.

The copies live on a tmpfs of warmboot's own, mounted with ``huge=within_size``: CRIU then copies the pages
out of 2 MB folios. Measured on W2, restores from a plain tmpfs (4 KB pages) took 216 ms, from the page cache of
a disk 192 ms, from this tmpfs 188 ms. The mount option is this mount's alone; no host-wide setting changes.

The copies obey a budget (``WARMBOOT_SNAPSHOT_CACHE_MB``, default a quarter of the host's memory) and the least
recently restored ones go first. A copy in use is pinned with a shared ``flock`` (several processes may restore
from one store: the server, benchmarks), so eviction never removes files under a running CRIU.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import xxhash
import zstandard

from warmboot.errors import InvalidOptionError, SnapshotCorruptError

#: Page images at least this big are stored compressed; smaller ones are not worth a second file format.
COMPRESS_MIN_BYTES = 1 << 20
SUFFIX = ".zst"
#: zstd level 1 on two threads: 340 MB in ~0.35 s here, to 21% of the size (level 3: 18%, but 0.42 s).
ZSTD_LEVEL = 1
_CHUNK = 4 << 20
_COMPLETE = ".complete"  #: written last into a cache entry: it is whole
_LOCK = ".lock"  #: shared-flocked while a restore reads the entry; eviction takes it exclusively
_TMP = ".tmp-"
_STORE_FILE = "store"  #: in each store's folder of the cache: the store it belongs to (for the sweep)
_TMPFS_FREE_MARGIN = 256 << 20  #: never fill the cache's tmpfs closer than this to full

log = logging.getLogger("warmboot.snapshot_files")


def stored_name(name: str, entry: dict[str, Any]) -> str:
    """The file name an image ``name`` has on disk (its compressed name where it is stored compressed)."""
    return entry.get("stored_name", name)


def is_packed(manifest: dict[str, Any]) -> bool:
    """Whether a snapshot has images stored compressed (and so restores through the memory cache)."""
    return any("stored_name" in f for f in manifest["files"].values())


class _HashingWriter:
    """A file that hashes what is written to it (the compressed stream's checksum, computed on the way)."""

    def __init__(self, f: Any):
        self._f = f
        self.digest = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def pack(path: Path, *, copy_to: Path | None = None) -> dict[str, Any]:
    """Compress image ``path`` into ``path + .zst`` and remove it; its manifest entry.

    In the same pass the raw bytes are hashed (the checksum restores verify) and, with ``copy_to``, written there
    too (the memory cache's copy, so the first restore needs no decompression).
    """
    raw_hash = xxhash.xxh3_128()
    dest = path.with_name(path.name + SUFFIX)
    compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=2)
    size = 0
    with open(path, "rb") as src, open(dest, "wb") as f:
        out = _HashingWriter(f)
        with contextlib.ExitStack() as stack:
            copy = stack.enter_context(open(copy_to, "wb")) if copy_to is not None else None
            if copy is not None:
                _preallocate(copy, os.fstat(src.fileno()).st_size)
            with compressor.stream_writer(out, closefd=False) as writer:  # ends the frame on exit
                while chunk := src.read(_CHUNK):
                    raw_hash.update(chunk)
                    size += len(chunk)
                    writer.write(chunk)
                    if copy is not None:
                        copy.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(dest, 0o600)
    path.unlink()
    return {
        "size": size,
        "xxh3_128": raw_hash.hexdigest(),
        "stored_name": dest.name,
        "stored_size": out.size,
        "stored_xxh3_128": out.digest.hexdigest(),
    }


def unpack(src: Path, dest: Path, entry: dict[str, Any], snapshot_id: str) -> None:
    """Decompress ``src`` into ``dest``, checking the result against the manifest's size and checksum."""
    digest = xxhash.xxh3_128()
    size = 0
    try:
        with open(src, "rb") as f, open(dest, "wb") as out:
            _preallocate(out, int(entry["size"]))
            reader = zstandard.ZstdDecompressor().stream_reader(f)
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except zstandard.ZstdError as exc:
        raise SnapshotCorruptError(f"image {src.name} does not decompress ({exc})", snapshot_id=snapshot_id) from exc
    if size != entry["size"] or digest.hexdigest() != entry["xxh3_128"]:
        raise SnapshotCorruptError(
            f"image {src.name} decompresses to other bytes than were dumped (size {size}, expected {entry['size']})",
            snapshot_id=snapshot_id,
        )


def budget_from_env() -> int:
    """``WARMBOOT_SNAPSHOT_CACHE_MB`` in bytes (0: no copies kept), default a quarter of the host's memory."""
    raw = os.environ.get("WARMBOOT_SNAPSHOT_CACHE_MB", "").strip()
    if not raw:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    try:
        mb = int(raw)
    except ValueError:
        mb = -1
    if mb < 0:
        raise InvalidOptionError(
            f"WARMBOOT_SNAPSHOT_CACHE_MB={raw!r}: expected a whole number of MB (0 keeps no snapshot in memory)"
        )
    return mb << 20


def cache_root_from_env() -> Path:
    """``WARMBOOT_SNAPSHOT_CACHE_DIR``, default a folder of /dev/shm (a tmpfs: the copies are memory)."""
    return Path(os.environ.get("WARMBOOT_SNAPSHOT_CACHE_DIR") or "/dev/shm/warmboot-snapshot-cache")


class MemoryCache:
    """Uncompressed copies of one store's snapshots, in a tmpfs, within a byte budget shared by every store."""

    def __init__(self, store_root: Path, *, root: Path | None = None, budget: int | None = None):
        #: Only the configured root gets a tmpfs mounted on it: a root given here (tests) is used as it is.
        self._mount_tmpfs = root is None
        self.root = root if root is not None else cache_root_from_env()
        self.budget = budget if budget is not None else budget_from_env()
        key = hashlib.sha256(str(store_root.resolve()).encode()).hexdigest()[:16]
        self.dir = self.root / key
        self._store_root = store_root
        self._lock = threading.Lock()  #: one copy made at a time in this process (two restores, one miss)
        self._ready = False

    # ----- using a copy ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def images(self, snapshot_id: str, snapshot_dir: Path, manifest: dict[str, Any]) -> Iterator[Path]:
        """A folder holding every image of the snapshot uncompressed, pinned until the block ends.

        A cached copy when there is one; otherwise one is made (decompressed and checked), kept when the budget
        allows, else removed after the block. Raises :class:`SnapshotCorruptError` for an image that does not
        decompress to its checksum.
        """
        entry = self.dir / snapshot_id
        with self._lock:
            self._ensure_dirs()
            pinned = self._pin(entry, manifest)
            if pinned is None:
                keep = self._make_room(manifest_bytes(manifest), exclude=entry)
                staging = self.dir / f"{_TMP}{snapshot_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                try:
                    self._fill(staging, snapshot_id, snapshot_dir, manifest)
                    target = entry if keep else self.dir / f"{_TMP}once-{staging.name[len(_TMP) :]}"
                    if target == entry and entry.exists():
                        self._evict(entry)  # an unusable leftover (half evicted, or of an older snapshot)
                    try:
                        os.rename(staging, target)
                    except OSError:  # still there (in use by another process): use this copy once
                        target = self.dir / f"{_TMP}once-{staging.name[len(_TMP) :]}"
                        os.rename(staging, target)
                except BaseException:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                pinned = self._pin(target, manifest)
                assert pinned is not None
                entry = target
        lock_fd = pinned
        try:
            yield entry
        finally:
            os.close(lock_fd)
            if entry.name.startswith(_TMP):
                shutil.rmtree(entry, ignore_errors=True)

    def _pin(self, entry: Path, manifest: dict[str, Any]) -> int | None:
        """A shared lock on a whole, current copy (touched: it was used now), or ``None`` when there is none."""
        try:
            marker = json.loads((entry / _COMPLETE).read_text())
            fd = os.open(entry / _LOCK, os.O_RDONLY)
        except (OSError, ValueError):
            return None
        if marker.get("created_at") != manifest["created_at"]:  # a copy of another snapshot of that id
            os.close(fd)
            self.drop(entry.name)
            return None
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not (entry / _COMPLETE).exists():  # evicted between the read and the lock
            os.close(fd)
            return None
        os.utime(entry / _COMPLETE)
        return fd

    def _fill(self, staging: Path, snapshot_id: str, snapshot_dir: Path, manifest: dict[str, Any]) -> None:
        staging.mkdir(mode=0o700)
        for name, entry in manifest["files"].items():
            stored = snapshot_dir / stored_name(name, entry)
            if "stored_name" in entry:
                unpack(stored, staging / name, entry, snapshot_id)
            else:
                shutil.copyfile(stored, staging / name)
        self._seal(staging, manifest)

    @staticmethod
    def _seal(staging: Path, manifest: dict[str, Any]) -> None:
        (staging / _LOCK).touch()
        (staging / _COMPLETE).write_text(json.dumps({"id": manifest["id"], "created_at": manifest["created_at"]}))

    # ----- making a copy while the dump is packed -------------------------------------------------------------

    def staging_for(self, snapshot_id: str, expected_bytes: int) -> Path | None:
        """A folder to write a new snapshot's raw images into as they are packed, or ``None`` when the budget
        (after evicting older copies) has no room for ``expected_bytes``."""
        with self._lock:
            try:
                self._ensure_dirs()
                if not self._make_room(expected_bytes, exclude=None):
                    return None
                staging = self.dir / f"{_TMP}{snapshot_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
                staging.mkdir(mode=0o700)
            except OSError as exc:  # the snapshot does without a copy: its first restore makes one
                log.warning("no copy in memory of snapshot %s: %s", snapshot_id, exc)
                return None
            return staging

    def publish(self, staging: Path, manifest: dict[str, Any]) -> None:
        """Make ``staging`` (every image of the published snapshot ``manifest``, raw) its cached copy."""
        self._seal(staging, manifest)
        try:
            os.rename(staging, self.dir / manifest["id"])
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)

    # ----- eviction ---------------------------------------------------------------------------------------

    def drop(self, snapshot_id: str) -> None:
        """Remove a snapshot's copy (the snapshot was deleted), unless a restore is reading it right now."""
        self._evict(self.dir / snapshot_id)

    def _evict(self, entry: Path) -> bool:
        try:
            fd = os.open(entry / _LOCK, os.O_RDONLY)
        except OSError:
            shutil.rmtree(entry, ignore_errors=True)  # no lock file: half made by a process that died
            return not entry.exists()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False  # in use: kept
        try:
            (entry / _COMPLETE).unlink(missing_ok=True)  # a pin that raced us sees it gone
            doomed = entry.with_name(f"{_TMP}rm-{entry.name}-{uuid.uuid4().hex[:6]}")
            os.rename(entry, doomed)
        except OSError:
            return False
        finally:
            os.close(fd)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _make_room(self, wanted: int, *, exclude: Path | None) -> bool:
        """Evict the least recently used copies (of every store) until ``wanted`` more bytes fit; whether they do."""
        if wanted > self.budget:
            return False
        entries = []
        for store_dir in self.root.iterdir() if self.root.is_dir() else []:
            for entry in store_dir.iterdir() if store_dir.is_dir() else []:
                if entry.name.startswith(".") or entry == exclude:
                    continue
                with contextlib.suppress(OSError):
                    entries.append(((entry / _COMPLETE).stat().st_mtime, entry, tree_bytes(entry)))
        used = sum(size for _, _, size in entries)
        for _, entry, size in sorted(entries, key=lambda e: e[0]):
            if used + wanted <= self.budget:
                break
            if self._evict(entry):
                used -= size
        free = shutil.disk_usage(self.root).free - _TMPFS_FREE_MARGIN
        return used + wanted <= self.budget and wanted <= free

    def _ensure_dirs(self) -> None:
        """The root (a tmpfs mounted on it if need be) and this store's folder, made again if they went away (an
        operator cleaned /dev/shm); the first time, a sweep of what dead stores and processes left."""
        if self._ready and self.dir.is_dir():
            return
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._mount_tmpfs and not os.path.ismount(self.root):
            for old in self.root.iterdir():  # copies made before the mount would stay hidden under it, in memory
                shutil.rmtree(old, ignore_errors=True)
            _mount_huge_tmpfs(self.root)
        os.chmod(self.root, 0o700)  # copies of process memory: root only, like the store
        self.dir.mkdir(mode=0o700, exist_ok=True)
        (self.dir / _STORE_FILE).write_text(str(self._store_root.resolve()))
        self._sweep()
        self._ready = True

    def _sweep(self) -> None:
        """Remove the copies of stores that no longer exist (a test's temporary store, a removed home), and
        staging folders left by processes that died."""
        for store_dir in self.root.iterdir():
            try:
                owner = Path((store_dir / _STORE_FILE).read_text())
            except OSError:
                owner = None
            if owner is None or not owner.is_dir():
                if store_dir != self.dir:
                    shutil.rmtree(store_dir, ignore_errors=True)
                continue
            for entry in store_dir.glob(f"{_TMP}*"):
                owner_pid = entry.name.split("-")[-2]  # .tmp-[once-]ID-PID-RAND
                if not owner_pid.isdigit() or not pid_alive(int(owner_pid)):
                    shutil.rmtree(entry, ignore_errors=True)


def _mount_huge_tmpfs(path: Path) -> None:
    """Mount a tmpfs whose big files get huge pages on ``path``; where that fails, copies go to ``path`` as is."""
    for options in ("huge=within_size,mode=0700", "mode=0700"):  # a kernel without THP refuses huge=
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "warmboot-snapshot-cache", str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            return
    log.warning("could not mount a tmpfs on %s (%s); snapshot copies go to it as it is", path, done.stderr.strip())


def _preallocate(f: Any, size: int) -> None:
    """Set a big file's final size before writing it, so that the cache's tmpfs gives it huge pages
    (``huge=within_size`` allocates one only where the file already extends over all of it)."""
    if size >= COMPRESS_MIN_BYTES:
        os.ftruncate(f.fileno(), size)


def manifest_bytes(manifest: dict[str, Any]) -> int:
    """Bytes of a snapshot's images uncompressed: what its copy in memory takes."""
    return sum(int(f["size"]) for f in manifest["files"].values())


def tree_bytes(path: Path) -> int:
    """Bytes of the files directly in ``path``."""
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (the owner of a temporary folder, named after it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
