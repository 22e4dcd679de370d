"""Memory snapshots: checkpoint a container with CRIU into a published snapshot, restore copies of it.

A snapshot is a directory ``<store>/<id>/`` holding CRIU's images and ``manifest.json``. It is written
under a temporary name, checksummed, fsynced and renamed into place, so a crash or a full disk mid-dump
never leaves anything that looks like a valid snapshot. Every restore checks the manifest against this
host's fingerprint and the images against their checksums *before* CRIU runs, then attaches fresh pipes
to the copy with CRIU's ``--inherit-fd``, so any number of copies can run at once, each on its own channels.
A snapshot that failed to restore for a reason of its own is marked broken and is never used again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from warmboot import config
from warmboot.errors import (
    CheckpointError,
    RestoreError,
    SnapshotCorruptError,
    SnapshotFileChangedError,
    SnapshotIncompatibleError,
    SnapshotNotFoundError,
)
from warmboot.worker import container as containers
from warmboot.worker import criu, host, snapshot_files
from warmboot.worker.sandbox import netns, rootfs

log = logging.getLogger("warmboot.snapshot")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BROKEN_MARK = "broken.json"
DUMP_LOG = "criu-dump.log"
_TMP_PREFIX = ".tmp-"
_CHUNK = 4 << 20

# CRIU log lines that mean "a file the snapshot refers to is not what it was at dump time".
_FILE_CHANGED = re.compile(
    r"\(criu/files-reg\.c:\d+\).*(has bad (size|mode|mtime)|Can't open file|No such file)|"
    r"Can't restore link remap|Can't open vma",
)


@dataclass(frozen=True)
class Snapshot:
    """A published snapshot: its id, its directory and its manifest."""

    id: str
    path: Path
    manifest: dict[str, Any]

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of the CRIU images (memory pages included, compressed where they are stored so)."""
        return int(self.manifest["total_bytes"])

    @property
    def memory_bytes(self) -> int:
        """Bytes of the CRIU images uncompressed: what a restore reads, and its copy in memory takes."""
        return snapshot_files.manifest_bytes(self.manifest)

    @property
    def rss_bytes(self) -> int | None:
        """The container's resident memory when it was dumped (``None`` for snapshots made before it was kept)."""
        value = self.manifest.get("rss_bytes")
        return int(value) if value is not None else None

    @property
    def pages_bytes(self) -> int:
        """Bytes of memory pages in the images."""
        return sum(f["size"] for name, f in self.manifest["files"].items() if name.startswith("pages-"))

    @property
    def created_at(self) -> float:
        return float(self.manifest["created_at"])

    def broken_reason(self) -> str | None:
        """Why this snapshot was marked broken, or ``None`` when it is usable."""
        try:
            return json.loads((self.path / BROKEN_MARK).read_text())["reason"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError):
            return "marked broken (unreadable mark)"


UPPER_COPY = "rootfs-upper"  #: the container's writable layer at dump time (see sandbox.rootfs)
_NETNS_KEY = "wb-netns"  #: CRIU's name for the container's network namespace, declared external


def _hash_file(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _site(
    snapshot: Snapshot, layers: Sequence[Path] | None, mounts: Sequence[containers.BindMount] | None
) -> tuple[list[Path], dict[str, dict[str, str]]]:
    """The image layers and external mounts (CRIU key -> target, source) a restore uses on this host."""
    made_with = [Path(p) for p in snapshot.manifest.get("layers", [])]
    external = {k: dict(v) for k, v in snapshot.manifest.get("external_mounts", {}).items()}
    if layers is not None:
        if len(layers) != len(made_with):
            raise SnapshotIncompatibleError(
                f"its image has {len(layers)} layers here, {len(made_with)} when it was made; make a new snapshot",
                snapshot_id=snapshot.id,
            )
        made_with = list(layers)
    for mount in mounts or ():
        for entry in external.values():
            if entry["target"] == mount.target:
                entry["source"] = mount.source
    return made_with, external


def _cpu_ms(pids: list[int]) -> float:
    """CPU time these processes (all their threads) have used so far, from the scheduler's own accounting."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError), open(f"{task.path}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total / 1e6


def _rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes together (anonymous and file pages they have mapped)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class SnapshotStore:
    """Published snapshots under one directory (default ``$WARMBOOT_HOME/snapshots``), readable by root only."""

    def __init__(self, root: Path | None = None, *, cache: snapshot_files.MemoryCache | None = None):
        self.root = Path(root) if root is not None else config.snapshots_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        #: Uncompressed copies of the snapshots in memory, which restores read (worker/snapshot_files.py).
        self.cache = cache if cache is not None else snapshot_files.MemoryCache(self.root)
        self._verified: set[tuple[object, ...]] = set()  # image file versions whose checksum matched
        self._logs = self.root / ".logs"
        self._logs.mkdir(exist_ok=True)
        self._remove_stale_partials()

    # ----- listing -----------------------------------------------------------------------------------

    def get(self, snapshot_id: str) -> Snapshot:
        """The published snapshot ``snapshot_id``; raises :class:`SnapshotNotFoundError` or, for an
        unreadable manifest, :class:`SnapshotCorruptError`."""
        path = self._path(snapshot_id)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise SnapshotCorruptError(f"manifest unreadable ({exc})", snapshot_id=snapshot_id) from exc
        return Snapshot(snapshot_id, path, manifest)

    def _path(self, snapshot_id: str) -> Path:
        """The directory of published snapshot ``snapshot_id``; raises :class:`SnapshotNotFoundError`."""
        if not snapshot_id or snapshot_id.startswith(".") or "/" in snapshot_id:
            raise SnapshotNotFoundError("not a snapshot id", snapshot_id=snapshot_id)
        path = self.root / snapshot_id
        if not path.is_dir():
            raise SnapshotNotFoundError(f"no such snapshot in {self.root}", snapshot_id=snapshot_id)
        return path

    def list(self) -> list[Snapshot]:
        """Every published snapshot, oldest first (partial or unreadable ones are skipped)."""
        found = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            with contextlib.suppress(SnapshotCorruptError, SnapshotNotFoundError):
                found.append(self.get(entry.name))
        return sorted(found, key=lambda s: s.created_at)

    def delete(self, snapshot_id: str) -> None:
        """Remove a snapshot, a corrupt one too. Renamed away first, so a concurrent restore never sees half of it."""
        path = self._path(snapshot_id)  # not get(): an unreadable manifest must not keep its images on disk
        doomed = self.root / f"{_TMP_PREFIX}rm-{snapshot_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        self.cache.drop(snapshot_id)

    def mark_broken(self, snapshot: Snapshot, reason: str) -> None:
        """Record that ``snapshot`` must never be restored again, and why."""
        mark = snapshot.path / BROKEN_MARK
        with contextlib.suppress(FileNotFoundError):  # deleted meanwhile: nothing left to use twice
            mark.write_text(json.dumps({"reason": reason, "at": time.time()}))
            log.warning("snapshot %s marked broken: %s", snapshot.id, reason.splitlines()[0])

    def _remove_stale_partials(self) -> None:
        """Delete temporary directories left by checkpoints whose process died (crash, kill, power loss)."""
        for entry in self.root.glob(f"{_TMP_PREFIX}*"):
            owner = entry.name.rsplit("-", 2)[-2] if entry.name.count("-") >= 3 else ""
            if not owner.isdigit() or not snapshot_files.pid_alive(int(owner)):
                shutil.rmtree(entry, ignore_errors=True)

    # ----- checkpoint --------------------------------------------------------------------------------

    def checkpoint(
        self,
        target: containers.Container,
        *,
        snapshot_id: str | None = None,
        leave_running: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> Snapshot:
        """Dump ``target``'s process tree with CRIU and publish it as a snapshot.

        With ``leave_running`` the container goes on afterwards; otherwise CRIU kills it once dumped.
        Raises :class:`CheckpointError` (with CRIU's error lines) and publishes nothing on failure.
        """
        snapshot_id = snapshot_id or uuid.uuid4().hex[:16]
        final = self.root / snapshot_id
        if final.exists():
            raise CheckpointError("a snapshot with this id already exists", snapshot_id=snapshot_id)
        tmp = self.root / f"{_TMP_PREFIX}{snapshot_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # removed by hand since start: make it again
        tmp.mkdir(mode=0o700)
        started = time.monotonic()
        staging = None
        try:
            rss = _rss_bytes(target.pids())
            # The container's network namespace has only loopback until START: there is no traffic to lock, and
            # nothing in it to save: it is external, and each restore gets a fresh one (sandbox/netns.py).
            args = ["dump", "-t", str(target.pid), "-D", str(tmp), "-W", str(tmp), "--network-lock", "skip"]
            args += ["--external", f"net[{netns.inode(target.pid)}]:{_NETNS_KEY}"]
            # Volumes are the only host directories in a container: CRIU binds them back from the host.
            external = {f"wb-vol-{i}": {"target": m.target, "source": m.source} for i, m in enumerate(target.mounts)}
            for key, mount in external.items():
                args += ["--external", f"mnt[{mount['target']}]:{key}"]
            # A container that goes on is left *stopped* until its writable layer is copied: the copy must
            # hold the files as they were when its memory was dumped, not what it wrote a moment later.
            if leave_running:
                args.append("--leave-stopped")
            result = criu.run(args, log_path=tmp / DUMP_LOG)
            if result.returncode != 0:
                raise CheckpointError(
                    f"CRIU dump of container {target.pid} failed (exit {result.returncode})",
                    snapshot_id=snapshot_id,
                    criu_errors=result.errors,
                )
            dump_s = time.monotonic() - started
            try:
                if target.run_dir is not None:
                    rootfs.save_upper(target.run_dir, tmp / UPPER_COPY)
            finally:
                if leave_running:
                    target.resume()
            # The pages pass through memory once more as they are packed: the copy restores read is made then.
            staging = self.cache.staging_for(snapshot_id, snapshot_files.tree_bytes(tmp))
            manifest = self._write_manifest(tmp, target, snapshot_id, dump_s, metadata or {}, external, staging, rss)
            os.rename(tmp, final)
            _fsync_path(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        if staging is not None:
            self.cache.publish(staging, manifest)
        snap = Snapshot(snapshot_id, final, manifest)
        log.info(
            "snapshot %s created in %.2f s (%.0f MB)",
            snapshot_id,
            time.monotonic() - started,
            snap.size_bytes / 1e6,
        )
        return snap

    def _write_manifest(
        self,
        tmp: Path,
        target: containers.Container,
        snapshot_id: str,
        dump_s: float,
        metadata: dict[str, Any],
        external: dict[str, dict[str, str]],
        cache_copy: Path | None,
        rss: int,
    ) -> dict[str, Any]:
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(tmp.iterdir()):
            if path.name == UPPER_COPY:  # its modes are the container's (its root's too): the store is 0700
                continue
            if path.name == DUMP_LOG:
                os.chmod(path, 0o600)
                continue
            os.chmod(path, 0o600)  # images hold process memory, secrets included
            copy_to = cache_copy / path.name if cache_copy is not None else None
            if path.name.startswith("pages-") and path.stat().st_size >= snapshot_files.COMPRESS_MIN_BYTES:
                files[path.name] = snapshot_files.pack(path, copy_to=copy_to)  # fsynced
                continue
            files[path.name] = {"size": path.stat().st_size, "xxh3_128": _hash_file(path)}
            if copy_to is not None:
                shutil.copyfile(path, copy_to)
            _fsync_path(path)
        fp = host.fingerprint()
        manifest = {
            "format_version": FORMAT_VERSION,
            "id": snapshot_id,
            "created_at": time.time(),
            "dump_seconds": round(dump_s, 4),
            "criu_version": fp.criu_version,
            "kernel": fp.kernel,
            "cpu": {"model": fp.cpu_model, "flags_sha256": fp.cpu_flags_sha256, "id": fp.cpu},
            "channels": target.pipe_ids,
            "external_mounts": external,
            "external_netns": _NETNS_KEY,
            "layers": [str(p) for p in target.layers],
            "files": files,
            "total_bytes": sum(f.get("stored_size", f["size"]) for f in files.values()),
            "rss_bytes": rss,
            "metadata": metadata,
        }
        manifest_path = tmp / MANIFEST
        with open(manifest_path, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(manifest_path, 0o600)
        _fsync_path(tmp)
        return manifest

    # ----- restore -----------------------------------------------------------------------------------

    def check(self, snapshot: Snapshot) -> None:
        """Refuse ``snapshot`` unless it is whole, unbroken and made on a host like this one."""
        m = snapshot.manifest
        if (reason := snapshot.broken_reason()) is not None:
            raise SnapshotCorruptError(f"snapshot is marked broken: {reason}", snapshot_id=snapshot.id)
        self.check_fingerprint(snapshot.id, m)
        for name, entry in m["files"].items():
            # A compressed image is checked as stored; its decompressed copy is checked when it is made.
            name = snapshot_files.stored_name(name, entry)
            size_wanted = entry.get("stored_size", entry["size"])
            hash_wanted = entry.get("stored_xxh3_128", entry["xxh3_128"])
            path = snapshot.path / name
            try:
                st = path.stat()
            except FileNotFoundError:
                raise SnapshotCorruptError(f"image {name} is missing", snapshot_id=snapshot.id) from None
            size = st.st_size
            # Hashing 340 MB costs ~50 ms of every restore, so each *version* of a file (inode, size, mtime,
            # ctime) is verified once per process: any write to the file, or a replacement, verifies it again.
            version = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, hash_wanted)
            if version in self._verified:
                continue
            if size != size_wanted or _hash_file(path) != hash_wanted:
                raise SnapshotCorruptError(
                    f"image {name} does not match its checksum (size {size}, expected {size_wanted})",
                    snapshot_id=snapshot.id,
                )
            self._verified.add(version)

    @staticmethod
    def check_fingerprint(snapshot_id: str, m: dict[str, Any]) -> None:
        """Refuse a manifest of another format, or made on another host fingerprint (CPU, kernel, CRIU)."""
        if m.get("format_version") != FORMAT_VERSION:
            raise SnapshotIncompatibleError(
                f"format version {m.get('format_version')} is not {FORMAT_VERSION}; make a new snapshot",
                snapshot_id=snapshot_id,
            )
        fp = host.fingerprint()
        theirs = m.get("cpu", {})
        mismatches = []
        if theirs.get("model") != fp.cpu_model or theirs.get("flags_sha256") != fp.cpu_flags_sha256:
            mismatches.append(f"CPU {theirs.get('model')!r} ({theirs.get('id')}) vs here {fp.cpu_model!r} ({fp.cpu})")
        if m.get("kernel") != fp.kernel:
            mismatches.append(f"kernel {m.get('kernel')} vs here {fp.kernel}")
        if m.get("criu_version") != fp.criu_version:
            mismatches.append(f"CRIU {m.get('criu_version')} vs here {fp.criu_version}")
        if mismatches:
            raise SnapshotIncompatibleError(
                "made on another host fingerprint (" + "; ".join(mismatches) + "); restore it on a matching "
                "worker or make a new snapshot here",
                snapshot_id=snapshot_id,
            )

    def adopt(self, folder: Path, snapshot_id: str) -> Snapshot:
        """Publish ``folder``, a whole snapshot made elsewhere (images, manifest, writable layer copy: fetched
        from object storage), as ``snapshot_id``: fsynced, then renamed into place. Already there (a concurrent
        fetch won): that one."""
        for path in folder.iterdir():
            if path.is_file():
                _fsync_path(path)
        _fsync_path(folder)
        try:
            os.rename(folder, self.root / snapshot_id)
        except OSError:
            if not (self.root / snapshot_id / MANIFEST).exists():
                raise
        else:
            _fsync_path(self.root)
        return self.get(snapshot_id)

    def restore(
        self,
        snapshot: Snapshot | str,
        run_dir: Path,
        *,
        cgroups: Sequence[Path] = (),
        layers: Sequence[Path] | None = None,
        mounts: Sequence[containers.BindMount] | None = None,
    ) -> containers.Container:
        """Restore a new copy of ``snapshot`` on fresh channels and return it, running.

        ``run_dir`` becomes the copy's run directory: a writable layer seeded from the snapshot's, on the
        snapshot's image layers. The copy's processes are born in ``cgroups`` (CRIU runs in them).

        ``layers`` and ``mounts``: where this host keeps the image layers and the volumes the snapshot was made
        with, for a snapshot made on another host or under another home (fetched from object storage); the
        same content, since the snapshot's key covers it. By default, the paths it was made with.

        Raises :class:`SnapshotIncompatibleError` or :class:`SnapshotCorruptError` before CRIU runs, and
        :class:`SnapshotFileChangedError` or :class:`RestoreError` (with CRIU's error lines) when CRIU fails.
        Corruption and CRIU failures mark the snapshot broken so it is never tried again.
        """
        if isinstance(snapshot, str):
            snapshot = self.get(snapshot)
        try:
            started = time.monotonic()
            self.check(snapshot)
            checked = time.monotonic()
        except SnapshotCorruptError as exc:
            if snapshot.broken_reason() is None:
                self.mark_broken(snapshot, str(exc))
            raise
        with self._images(snapshot) as images:
            unpacked = time.monotonic()
            copy = self._restore_from(snapshot, images, run_dir, cgroups, _site(snapshot, layers, mounts))
        copy.timings = {
            "check_ms": (checked - started) * 1000,
            "unpack_ms": (unpacked - checked) * 1000,
            **copy.timings,
        }
        return copy

    @contextlib.contextmanager
    def _images(self, snapshot: Snapshot) -> Iterator[Path]:
        """The folder CRIU reads the snapshot's images from: the snapshot's own, or where some are stored
        compressed, their uncompressed copy in memory (made now if there is none; worker/snapshot_files.py)."""
        if not snapshot_files.is_packed(snapshot.manifest):
            yield snapshot.path
            return
        with contextlib.ExitStack() as stack:
            try:
                images = stack.enter_context(self.cache.images(snapshot.id, snapshot.path, snapshot.manifest))
            except SnapshotCorruptError as exc:
                self.mark_broken(snapshot, str(exc))
                raise
            yield images

    def _restore_from(
        self,
        snapshot: Snapshot,
        images: Path,
        run_dir: Path,
        cgroups: Sequence[Path],
        site: tuple[list[Path], dict[str, dict[str, str]]],
    ) -> containers.Container:
        started = time.monotonic()
        containers.ensure_subreaper()
        self._logs.mkdir(parents=True, exist_ok=True)  # the store's root may have been cleaned out by hand
        layers, external = site
        rootfs.prepare(run_dir)
        rootfs.seed_upper(snapshot.path / UPPER_COPY, run_dir)
        root = rootfs.mount_root(layers, run_dir)
        pipes = containers.new_pipes()
        run_id = f"{snapshot.id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        log_path = self._logs / f"restore-{run_id}.log"
        pidfile = self._logs / f"restore-{run_id}.pid"
        args = [
            "restore",
            "-D",
            str(images),
            "-W",
            str(self._logs),
            "--restore-detached",
            "--root",
            str(root),
            "--pidfile",
            str(pidfile),
            # Don't recreate the original container's cgroups: the worker puts each copy in its own.
            "--manage-cgroups=ignore",
        ]
        for key, mount in external.items():
            args += ["--external", f"mnt[{key}]:{mount['source']}"]
        for role, old_pipe in snapshot.manifest["channels"].items():
            args += ["--inherit-fd", f"fd[{pipes.container_fds[role]}]:{old_pipe}"]
        passed = list(pipes.container_fds.values())
        netns_fd = None
        if key := snapshot.manifest.get("external_netns"):
            netns_fd = netns.fresh()
            args += ["--inherit-fd", f"fd[{netns_fd}]:{key}"]
            passed.append(netns_fd)
        try:
            prepared = time.monotonic()
            result = criu.run(args, log_path=log_path, pass_fds=tuple(passed), cgroups=cgroups)
            restored = time.monotonic()
        finally:
            pipes.close_container_ends()
            if netns_fd is not None:
                os.close(netns_fd)
            with contextlib.suppress(OSError):
                rootfs.detach(run_dir)
        if result.returncode != 0:
            pipes.channels.close()
            rootfs.remove(run_dir)
            error_cls = (
                SnapshotFileChangedError if any(_FILE_CHANGED.search(line) for line in result.errors) else RestoreError
            )
            what = (
                "a file the snapshot needs was changed or deleted since it was made"
                if error_cls is SnapshotFileChangedError
                else f"CRIU restore failed (exit {result.returncode})"
            )
            exc = error_cls(f"{what}; CRIU log: {log_path}", snapshot_id=snapshot.id, criu_errors=result.errors)
            self.mark_broken(snapshot, str(exc))
            raise exc
        try:
            pid = int(pidfile.read_text().strip())
        finally:
            pidfile.unlink(missing_ok=True)
            if criu.verbosity() < 4:  # kept at 4: a profile of where the restore's time went
                log_path.unlink(missing_ok=True)
        copy = containers.Container(
            pid,
            pipes.channels,
            snapshot.manifest["channels"],
            restored_from=snapshot.id,
            run_dir=run_dir,
            layers=layers,
            mounts=[containers.BindMount(m["source"], m["target"]) for m in external.values()],
        )
        copy.timings = {
            "mounts_ms": (prepared - started) * 1000,
            "criu_restore_ms": (restored - prepared) * 1000,
            # Of CRIU's time: what the restored processes spent restoring themselves. CRIU reports no phases, but
            # its forked tasks map their memory and load their pages themselves (W2: ~150 of ~170 ms; CRIU's
            # timestamped -v4 log puts the page reads alone at ~130 ms).
            "pages_ms": _cpu_ms(copy.pids()),
        }
        return copy
