"""A real OCI registry: Debian's ``docker-registry`` (the CNCF distribution server, 2.8) with filesystem storage.

For tests and one-machine trials: on loopback by default, or on a cluster network's hub address inside the hub
namespace (``argv_prefix=net.hub.argv(())``, ``listen=f"{net.hub.address}:0"``, see :mod:`.netns`). It listens
on a port the kernel picks (port 0) and logs the address it got, so there is no race for a free port. An operator
points warmboot at their own registry instead.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import select
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from warmboot.devservices import processes

#: How long the registry may take to say it listens (it starts in well under a second here).
START_TIMEOUT_S = 20.0

#: ``GET /v2/`` (the registry API's version check) from a process: exit status 0 when it answers 200.
_API_PROBE = "import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1], timeout=5).status != 200)"


def registry_binary() -> str:
    """The ``docker-registry`` binary (``make setup`` installs Debian's docker-registry package)."""
    path = shutil.which("docker-registry")
    if path is None:
        raise FileNotFoundError("docker-registry is not installed: run `make setup` (apt-get install docker-registry)")
    return path


@dataclass
class RegistryServer:
    """A running ``docker-registry``."""

    host: str  #: ``IP:PORT`` it listens on
    storage: Path  #: its filesystem storage root
    process: subprocess.Popen[bytes]
    #: what it was started under (e.g. a namespace's ``nsenter``); :meth:`api_ok` asks from there too
    argv_prefix: tuple[str, ...] = field(default=())

    def api_ok(self) -> bool:
        """Whether ``GET /v2/`` answers 200 (the registry API's version check), asked from where it runs."""
        url = f"http://{self.host}/v2/"
        if self.argv_prefix:
            probe = [*self.argv_prefix, sys.executable, "-c", _API_PROBE, url]
            return subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False


@contextlib.contextmanager
def registry_server(
    workdir: Path, *, listen: str = "127.0.0.1:0", argv_prefix: Sequence[str] = ()
) -> Iterator[RegistryServer]:
    """Start ``docker-registry`` with its config and storage under ``workdir`` on ``listen`` (``IP:PORT``; port 0
    picks a free one), run under ``argv_prefix`` if given; wait until it listens and answers; stop it after.

    The storage stays in ``workdir`` (the caller's folder) when the block ends.
    """
    binary = registry_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    config = workdir / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        "  delete:\n    enabled: true\n"
        "  maintenance:\n    uploadpurging:\n      enabled: false\n"
        f"http:\n  addr: {listen}\n  secret: {secrets.token_hex(16)}\n"
    )
    prefix = tuple(argv_prefix)
    proc = subprocess.Popen(
        [*prefix, binary, "serve", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    stream = proc.stderr
    drain: threading.Thread | None = None
    try:
        host = _wait_listening(proc, START_TIMEOUT_S)
        # Keep reading its log so that a full pipe never blocks the registry.
        drain = threading.Thread(target=lambda: shutil.copyfileobj(stream, io.BytesIO()), daemon=True)
        drain.start()
        server = RegistryServer(host=host, storage=storage, process=proc, argv_prefix=prefix)
        if not server.api_ok():
            raise RuntimeError(f"docker-registry on {host} does not answer GET /v2/")
        yield server
    finally:
        processes.stop(proc, timeout=10)
        if drain is not None:
            drain.join(timeout=10)
        stream.close()


def _wait_listening(proc: subprocess.Popen[bytes], deadline_s: float) -> str:
    """Read the registry's log until it says ``listening on ADDR``; returns ADDR. Fails past the deadline."""
    assert proc.stderr is not None
    fd = proc.stderr.fileno()
    deadline = time.monotonic() + deadline_s
    seen = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"docker-registry did not start within {deadline_s}s:\n{seen.decode()[-2000:]}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            proc.wait()
            raise RuntimeError(f"docker-registry exited {proc.returncode}:\n{seen.decode()[-2000:]}")
        seen += chunk
        m = re.search(rb'msg="listening on ([^"\s]+:\d+)"', seen)
        if m:
            return m.group(1).decode()
