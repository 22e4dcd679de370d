"""Snapshots in S3-compatible object storage, so that an agent can restore a snapshot another machine made.

Layout in the bucket (under an optional prefix):

- ``chunks/<sha256>``: a piece of a snapshot's file, at most :data:`CHUNK_BYTES` long, named by the SHA-256 of
  its bytes. Content addressing makes a push idempotent and lets snapshots that share bytes share chunks.
- ``snapshots/<id>.json``: the snapshot's manifest as the store wrote it, plus each file's size and chunks in
  order, and its writable layer as a tar (with xattrs: overlayfs keeps whiteouts and opaque marks there).
  Written after every chunk, so a snapshot is visible only once it is whole.
- ``keys/<snapshot key>.json``: which snapshot serves a snapshot key (``server/snapshots.py``), written last. The
  key covers the code, the image, the configuration and the host fingerprint, so an agent that computes the same
  key can restore that snapshot, and one of another fingerprint class never finds it.

A fetch refuses a snapshot made on another host fingerprint before it downloads anything, downloads the chunks
in parallel into a temporary folder of the local store, checks every chunk against its name, and publishes the
snapshot with a rename, as a local dump is published: a crash mid-fetch leaves nothing that looks like a snapshot.
A chunk missing from the bucket is a :class:`SnapshotCorruptError` that names it; the caller boots cold.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from warmboot import config
from warmboot.errors import InvalidOptionError, SnapshotCorruptError, SnapshotError, SnapshotNotFoundError
from warmboot.worker import snapshot_files
from warmboot.worker.snapshot import MANIFEST, UPPER_COPY, Snapshot, SnapshotStore

#: 8 MiB: big enough that a 340 MB snapshot is ~45 requests, small enough to fetch in parallel.
CHUNK_BYTES = 8 << 20
#: Chunks moved at once each way.
PARALLEL = 8
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0  #: per read of a response (an 8 MiB chunk arrives well within it on any working link)
_UPPER_TAR = "rootfs-upper.tar"


class ObjectStore(Protocol):
    """The few object-storage operations snapshots need (an S3 bucket: :class:`S3Bucket`)."""

    def exists(self, key: str) -> bool: ...

    def put(self, key: str, data: bytes) -> None: ...

    def get(self, key: str) -> bytes:
        """The object's bytes; raises :class:`KeyError` when there is no such object."""
        ...


@dataclass(frozen=True)
class S3Settings:
    """Where snapshots go: an S3-compatible endpoint, its credentials and a bucket (and a key prefix)."""

    endpoint: str  #: host:port
    access_key: str
    secret_key: str
    bucket: str
    prefix: str = ""
    secure: bool = True  #: https; False only for a store on loopback or in a private network


def settings_from_env() -> S3Settings | None:
    """Object storage for snapshots, from ``WARMBOOT_S3_*`` (None when ``WARMBOOT_S3_ENDPOINT`` is unset).

    ``WARMBOOT_S3_ENDPOINT`` is ``https://host:port`` (or ``http://`` for a store on loopback or a private
    network; a bare ``host:port`` means https), ``WARMBOOT_S3_BUCKET`` (default ``warmboot``),
    ``WARMBOOT_S3_PREFIX``, ``WARMBOOT_S3_ACCESS_KEY`` and ``WARMBOOT_S3_SECRET_KEY`` or, better,
    ``WARMBOOT_S3_ACCESS_KEY_FILE`` and ``WARMBOOT_S3_SECRET_KEY_FILE`` (files holding them: Kubernetes secrets
    mounted as files).
    """
    endpoint = os.environ.get("WARMBOOT_S3_ENDPOINT", "").strip()
    if not endpoint:
        return None
    secure = not endpoint.startswith("http://")
    endpoint = endpoint.removeprefix("http://").removeprefix("https://").rstrip("/")
    access = config.value_or_file("WARMBOOT_S3_ACCESS_KEY")
    secret = config.value_or_file("WARMBOOT_S3_SECRET_KEY")
    if not access or not secret:
        missing = "WARMBOOT_S3_ACCESS_KEY" if not access else "WARMBOOT_S3_SECRET_KEY"
        raise InvalidOptionError(
            f"WARMBOOT_S3_ENDPOINT is set but {missing} (or {missing}_FILE) is not: set both credentials"
        )
    bucket = os.environ.get("WARMBOOT_S3_BUCKET", "warmboot").strip()
    return S3Settings(endpoint, access, secret, bucket, os.environ.get("WARMBOOT_S3_PREFIX", ""), secure)


class S3Bucket:
    """An :class:`ObjectStore` on one bucket of any S3-compatible server, through the MinIO client."""

    def __init__(self, settings: S3Settings):
        import minio  # the server side only: never imported in a container
        import urllib3

        self._errors = minio.error.S3Error
        # MinIO's client waits up to 5 minutes per request by default: a store that stops answering would hold a
        # container start (and its call) that long. Short deadlines, a few retries, a connection per parallel chunk.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
            maxsize=PARALLEL,
            cert_reqs="CERT_REQUIRED" if settings.secure else "CERT_NONE",
        )
        self._client = minio.Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key,
            secure=settings.secure,
            http_client=http,
        )
        self._transport_errors = (urllib3.exceptions.HTTPError, minio.error.MinioException)
        self._endpoint = settings.endpoint
        self._bucket = settings.bucket
        self._prefix = settings.prefix.strip("/") + "/" if settings.prefix.strip("/") else ""
        try:
            with self._unreachable_as_snapshot_error():
                if not self._client.bucket_exists(self._bucket):
                    self._client.make_bucket(self._bucket)
        except self._errors as exc:
            raise SnapshotError(
                f"object storage {settings.endpoint} refused bucket {self._bucket!r} ({exc.code}: {exc.message}); "
                "check the endpoint, the access key and its secret"
            ) from exc

    @contextlib.contextmanager
    def _unreachable_as_snapshot_error(self) -> Iterator[None]:
        """A store that cannot be reached (refused, timed out, a broken response) is a :class:`SnapshotError`,
        which callers handle: a fetch that fails boots cold, a push that fails is logged."""
        try:
            yield
        except self._errors:
            raise
        except self._transport_errors as exc:
            raise SnapshotError(f"object storage {self._endpoint} cannot be reached: {exc}") from exc

    def exists(self, key: str) -> bool:
        try:
            with self._unreachable_as_snapshot_error():
                self._client.stat_object(self._bucket, self._prefix + key)
        except self._errors as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                return False
            raise SnapshotError(f"object storage {self._endpoint} refused {key} ({exc.code}: {exc.message})") from exc
        return True

    def put(self, key: str, data: bytes) -> None:
        with self._unreachable_as_snapshot_error():
            self._client.put_object(self._bucket, self._prefix + key, io.BytesIO(data), len(data))

    def get(self, key: str) -> bytes:
        try:
            with self._unreachable_as_snapshot_error():
                response = self._client.get_object(self._bucket, self._prefix + key)
        except self._errors as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise KeyError(key) from None
            raise SnapshotError(f"object storage {self._endpoint} refused {key} ({exc.code}: {exc.message})") from exc
        try:
            with self._unreachable_as_snapshot_error():
                return response.read()
        finally:
            response.close()
            response.release_conn()


def _pointer_key(key: str) -> str:
    return f"keys/{key}.json"


def _manifest_key(snapshot_id: str) -> str:
    return f"snapshots/{snapshot_id}.json"


def _chunk_key(digest: str) -> str:
    return f"chunks/{digest}"


class RemoteSnapshots:
    """Push published snapshots of a local store to object storage, and fetch them into another store."""

    def __init__(self, objects: ObjectStore, parallel: int = PARALLEL):
        self.objects = objects
        self.parallel = parallel

    # ----- push -------------------------------------------------------------------------------------------

    def push(self, snapshot: Snapshot) -> dict[str, Any]:
        """Upload ``snapshot``'s files as chunks (those already there are skipped), then its manifest.
        Returns the remote manifest."""
        files: dict[str, dict[str, Any]] = {}
        with ThreadPoolExecutor(self.parallel) as pool, tempfile.TemporaryDirectory(prefix="wb-push-") as tmp:
            upper = Path(tmp) / _UPPER_TAR
            _tar(snapshot.path / UPPER_COPY, upper)
            sources = {_UPPER_TAR: upper}
            for name, entry in snapshot.manifest["files"].items():
                stored = snapshot_files.stored_name(name, entry)
                sources[stored] = snapshot.path / stored
            for name, path in sources.items():
                files[name] = {"size": path.stat().st_size, "chunks": list(pool.map(self._put_chunk, _chunks(path)))}
        remote = {"snapshot": snapshot.manifest, "files": files, "chunk_bytes": CHUNK_BYTES}
        self.objects.put(_manifest_key(snapshot.id), json.dumps(remote, sort_keys=True).encode())
        return remote

    def _put_chunk(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        if not self.objects.exists(_chunk_key(digest)):
            self.objects.put(_chunk_key(digest), data)
        return digest

    def publish_key(self, key: str, snapshot_id: str) -> None:
        """Make ``snapshot_id`` (pushed) the snapshot that serves ``key`` for every agent."""
        self.objects.put(_pointer_key(key), json.dumps({"snapshot_id": snapshot_id}).encode())

    def find_key(self, key: str) -> str | None:
        """The snapshot that serves ``key`` in object storage, or None."""
        try:
            return str(json.loads(self.objects.get(_pointer_key(key)))["snapshot_id"])
        except KeyError:
            return None
        except (ValueError, TypeError) as exc:
            raise SnapshotCorruptError(f"the pointer of key {key} in object storage is unreadable ({exc})") from exc

    # ----- fetch ------------------------------------------------------------------------------------------

    def manifest(self, snapshot_id: str) -> dict[str, Any]:
        """The remote manifest of ``snapshot_id``; raises :class:`SnapshotNotFoundError` when it is not there."""
        try:
            return json.loads(self.objects.get(_manifest_key(snapshot_id)))
        except KeyError:
            raise SnapshotNotFoundError("not in object storage", snapshot_id=snapshot_id) from None
        except ValueError as exc:
            raise SnapshotCorruptError(f"its manifest in object storage is unreadable ({exc})",
                                       snapshot_id=snapshot_id) from exc  # fmt: skip

    def fetch(self, snapshot_id: str, store: SnapshotStore) -> Snapshot:
        """``snapshot_id`` in ``store``: already there, or downloaded and published into it.

        Raises :class:`SnapshotIncompatibleError` (made on another host fingerprint) before any chunk is read,
        :class:`SnapshotNotFoundError` when object storage does not have it, and :class:`SnapshotCorruptError`
        for a chunk that is missing or holds other bytes than its name says.
        """
        with contextlib.suppress(SnapshotNotFoundError):
            return store.get(snapshot_id)
        remote = self.manifest(snapshot_id)
        manifest = remote["snapshot"]
        store.check_fingerprint(snapshot_id, manifest)
        with _staging(store, snapshot_id) as tmp:
            with ThreadPoolExecutor(self.parallel) as pool:
                for name, entry in remote["files"].items():
                    self._assemble(pool, snapshot_id, name, entry, tmp / name)
            _untar(tmp / _UPPER_TAR, tmp / UPPER_COPY)
            (tmp / _UPPER_TAR).unlink()
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            for path in tmp.iterdir():
                if path.name != UPPER_COPY:
                    os.chmod(path, 0o600)  # images hold process memory, as in the store
            return store.adopt(tmp, snapshot_id)

    def _assemble(
        self, pool: ThreadPoolExecutor, snapshot_id: str, name: str, entry: dict[str, Any], dest: Path
    ) -> None:
        digests: list[str] = entry["chunks"]

        def fetch(index: int) -> None:
            digest = digests[index]
            try:
                data = self.objects.get(_chunk_key(digest))
            except KeyError:
                raise SnapshotCorruptError(
                    f"chunk {digest[:16]} of {name} is missing from object storage; make a new snapshot "
                    "(the next cold boot does)",
                    snapshot_id=snapshot_id,
                ) from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise SnapshotCorruptError(f"chunk {digest[:16]} of {name} holds other bytes than its name says",
                                           snapshot_id=snapshot_id)  # fmt: skip
            os.pwrite(fd, data, index * CHUNK_BYTES)

        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, int(entry["size"]))
            for future in [pool.submit(fetch, i) for i in range(len(digests))]:
                future.result()
        finally:
            os.close(fd)


def _chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while data := f.read(CHUNK_BYTES):
            yield data


@contextlib.contextmanager
def _staging(store: SnapshotStore, snapshot_id: str) -> Iterator[Path]:
    """A temporary folder in ``store`` (named as a dump's, so a crashed fetch's is swept the same way)."""
    tmp = store.root / f".tmp-{snapshot_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tar(folder: Path, dest: Path) -> None:
    """GNU tar, for what Python's tarfile cannot do: extended attributes (overlayfs whiteouts, opaque dirs)."""
    folder.mkdir(exist_ok=True)
    # Deterministic bytes for the same files (so its chunks are found again): sorted names, and no access or
    # change times, which the POSIX format that --xattrs needs would otherwise record.
    flags = ["--sort=name", "--pax-option=delete=atime,delete=ctime"]
    _run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", *flags, "-C", str(folder), "-cf", str(dest), "."])


def _untar(src: Path, folder: Path) -> None:
    folder.mkdir(mode=0o755)
    _run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-p", "-C", str(folder), "-xf", str(src)])


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SnapshotError(f"{' '.join(argv[:1])} failed: {done.stderr.strip()}")
