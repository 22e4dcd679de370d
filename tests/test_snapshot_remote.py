"""Snapshots pushed to a real S3 server (SeaweedFS) and fetched into another store, as another agent would."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import minio
import pytest
from conftest import Running, ask
from s3_helpers import s3_server  # noqa: F401 - the session's S3 server

from warmboot.errors import SnapshotCorruptError, SnapshotError, SnapshotIncompatibleError, SnapshotNotFoundError
from warmboot.worker.snapshot import SnapshotStore
from warmboot.worker.snapshot_remote import RemoteSnapshots, S3Bucket, S3Settings


class Counting:
    """An object store that counts what goes through it (to show what a push or a fetch did, or did not, do)."""

    def __init__(self, inner: S3Bucket):
        self.inner = inner
        self.puts: list[str] = []
        self.gets: list[str] = []

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        self.gets.append(key)
        return self.inner.get(key)


def _client(s: S3Settings) -> minio.Minio:
    return minio.Minio(s.endpoint, s.access_key, s.secret_key, secure=False)


@pytest.fixture
def bucket(s3_server: S3Settings, request: pytest.FixtureRequest) -> S3Settings:  # noqa: F811
    """A bucket of its own for each test."""
    name = "t-" + request.node.name.replace("_", "-")[:50].strip("-").lower()
    return S3Settings(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, name, secure=False)


def test_a_snapshot_pushed_by_one_store_restores_from_another(
    tmp_path: Path, bucket: S3Settings, store: SnapshotStore, running: Running
) -> None:
    original = running.start_stateful("--dict-size", "1000000")
    before = ask(original, "before")
    snap = store.checkpoint(original)
    objects = Counting(S3Bucket(bucket))
    remote = RemoteSnapshots(objects)
    pushed = remote.push(snap)
    assert pushed["snapshot"]["id"] == snap.id and objects.puts[-1] == f"snapshots/{snap.id}.json"
    chunks = {d for f in pushed["files"].values() for d in f["chunks"]}
    assert len(chunks) >= 2

    objects.puts.clear()
    remote.push(snap)  # content-addressed: every chunk is already there
    assert objects.puts == [f"snapshots/{snap.id}.json"]

    other = SnapshotStore(tmp_path / "other-agent")
    fetched = remote.fetch(snap.id, other)
    assert fetched.path.parent == other.root and fetched.manifest == snap.manifest
    assert not list(other.root.glob(".tmp-*"))
    copy = running.restore(other, fetched)
    after = ask(copy, "after")
    assert (after["dict_len"], after["dict_digest"]) == (before["dict_len"], before["dict_digest"])
    objects.gets.clear()
    assert remote.fetch(snap.id, other).id == snap.id and objects.gets == [], "already local: nothing fetched"


def test_a_snapshot_of_another_fingerprint_is_refused_before_any_chunk_is_read(
    tmp_path: Path, bucket: S3Settings, store: SnapshotStore, running: Running
) -> None:
    snap = store.checkpoint(running.start_stateful())
    objects = Counting(S3Bucket(bucket))
    remote = RemoteSnapshots(objects)
    pushed = remote.push(snap)
    pushed["snapshot"]["cpu"]["model"] = "Another CPU @ 9.9GHz"  # as an agent of another class would have made
    objects.put(f"snapshots/{snap.id}.json", json.dumps(pushed).encode())
    objects.gets.clear()
    with pytest.raises(SnapshotIncompatibleError, match="Another CPU"):
        remote.fetch(snap.id, SnapshotStore(tmp_path / "other-agent"))
    assert objects.gets == [f"snapshots/{snap.id}.json"], "no chunk may be downloaded"


def test_a_missing_chunk_fails_the_fetch_by_name_and_publishes_nothing(
    tmp_path: Path, bucket: S3Settings, store: SnapshotStore, running: Running
) -> None:
    snap = store.checkpoint(running.start_stateful("--dict-size", "1000000"))
    remote = RemoteSnapshots(S3Bucket(bucket))
    pushed = remote.push(snap)
    digest = max(pushed["files"].values(), key=lambda f: f["size"])["chunks"][-1]
    _client(bucket).remove_object(bucket.bucket, f"chunks/{digest}")
    other = SnapshotStore(tmp_path / "other-agent")
    with pytest.raises(SnapshotCorruptError, match=f"chunk {digest[:16]} of .* is missing") as info:
        remote.fetch(snap.id, other)
    assert info.value.snapshot_id == snap.id
    assert list(other.root.iterdir()) == [other.root / ".logs"], "neither a snapshot nor a partial one is left"


def test_a_snapshot_not_in_the_bucket_and_wrong_credentials_are_clear_errors(
    tmp_path: Path, bucket: S3Settings
) -> None:
    with pytest.raises(SnapshotNotFoundError, match="not in object storage"):
        RemoteSnapshots(S3Bucket(bucket)).fetch("0123456789abcdef", SnapshotStore(tmp_path / "s"))
    wrong = S3Settings(bucket.endpoint, bucket.access_key, "wrong-secret", bucket.bucket, secure=False)
    with pytest.raises(SnapshotError, match=r"refused bucket .*access key"):
        S3Bucket(wrong)


def test_a_store_that_cannot_be_reached_is_a_snapshot_error_not_a_hang(bucket: S3Settings) -> None:
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SnapshotError, match="cannot be reached"):
        S3Bucket(S3Settings(f"127.0.0.1:{port}", bucket.access_key, bucket.secret_key, bucket.bucket, secure=False))
