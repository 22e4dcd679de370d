"""A real OCI registry on loopback for tests, and a small Python-less base image pushed to it.

The registry is Debian's ``docker-registry`` (the CNCF distribution server, 2.8) with filesystem storage in a
temporary directory, listening on ``127.0.0.1`` on a port the kernel picks, started by the library
(warmboot/devservices/registry.py). Images are pushed with skopeo.

conftest.py (or a test module) imports the fixtures to use them::

    from registry_helpers import registry, registry_base_image  # noqa: F401  (pytest fixtures)

``registry_base_image.ref`` (``127.0.0.1:PORT/test/base:1``) is a busybox root filesystem without Python, for
``Image.from_registry(ref, add_python="3.11")``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from warmboot.devservices.registry import START_TIMEOUT_S, RegistryServer, registry_server
from warmboot.worker.images.oci import ImageConfig, Layout
from warmboot.worker.images.python_layer import apt_download

#: How long the registry may take to say it listens (it starts in well under a second here).
START_DEADLINE_S = START_TIMEOUT_S
#: Busybox applets the base image links, enough for tests' shell scripts.
APPLETS = ("sh", "cat", "ls", "echo", "test", "[", "stat", "mkdir", "rm", "touch", "id", "env", "readlink", "wc")


def _which(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (apt-get install {package}; `make setup` installs it)")
    return path


@dataclass
class Registry(RegistryServer):
    """A running ``docker-registry`` (warmboot/devservices/registry.py) that tests push images to."""

    def push(self, layout: Layout, ref_name: str, repo_tag: str, *, compress: str | None = None) -> str:
        """Copy the layout's image ``ref_name`` to ``<host>/<repo_tag>`` (optionally recompressed); returns the ref.

        skopeo runs where the registry runs (under its ``argv_prefix``, e.g. in a cluster network's hub)."""
        ref = f"{self.host}/{repo_tag}"
        argv = [*self.argv_prefix, _which("skopeo", "skopeo"), "copy", "--dest-tls-verify=false"]
        if compress:
            argv += ["--dest-compress", "--dest-compress-format", compress]
        argv += [f"oci:{layout.path}:{ref_name}", f"docker://{ref}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"skopeo push of {ref} failed:\n{proc.stdout}\n{proc.stderr}"
        return ref


@contextlib.contextmanager
def running_registry(
    workdir: Path, *, listen: str = "127.0.0.1:0", argv_prefix: Sequence[str] = ()
) -> Iterator[Registry]:
    """Start ``docker-registry`` with storage under ``workdir``; wait until it listens and answers; stop it after.

    Skips the test when docker-registry is not installed."""
    _which("docker-registry", "docker-registry")
    with registry_server(workdir, listen=listen, argv_prefix=argv_prefix) as server:
        yield Registry(**{f.name: getattr(server, f.name) for f in fields(server)})


@dataclass(frozen=True)
class BaseImage:
    """The test base image: its registry reference and the root filesystem it was made from."""

    ref: str  #: ``127.0.0.1:PORT/test/base:1``
    rootfs: Path
    layout: Layout  #: the OCI layout it was written into (ref name ``test/base:1``)


def make_busybox_rootfs(dest: Path, work: Path) -> Path:
    """A tiny merged-/usr root filesystem with a static busybox (from Debian's busybox-static) and no Python.

    Also holds ``/etc/hello`` and ``/opt/data/{a,b}``, which tests delete and hide in an upper layer.
    """
    debs = apt_download(["busybox-static"], "bookworm", work / "apt", lambda _line: None)
    (deb,) = [d for d in debs if d.name.startswith("busybox-static_")]
    unpacked = work / "deb"
    subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
    (busybox,) = [p for p in (unpacked / "bin/busybox", unpacked / "usr/bin/busybox") if p.is_file()]
    for d in ("usr/bin", "usr/sbin", "usr/lib", "etc", "root", "tmp", "proc", "dev", "opt/data"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    for name in ("bin", "sbin", "lib"):
        os.symlink(f"usr/{name}", dest / name)
    shutil.copy2(busybox, dest / "usr/bin/busybox")
    for applet in APPLETS:
        os.symlink("busybox", dest / "usr/bin" / applet)
    (dest / "etc/hello").write_text("hello from the base\n")
    (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (dest / "opt/data/a").write_text("a\n")
    (dest / "opt/data/b").write_text("b\n")
    os.chmod(dest / "tmp", 0o1777)
    return dest


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A ``docker-registry`` on 127.0.0.1 for the whole test session."""
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="session")
def registry_base_image(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> BaseImage:
    """A Python-less busybox image pushed to :func:`registry` as ``test/base:1``."""
    work = tmp_path_factory.mktemp("base-image")
    rootfs = make_busybox_rootfs(work / "rootfs", work)
    layout = Layout(work / "oci")
    layer = layout.write_layer(rootfs)
    layout.write_image([layer], ImageConfig(env={"PATH": "/usr/bin:/bin", "BASE": "1"}, workdir="/root"), "test/base:1")
    ref = registry.push(layout, "test/base:1", "test/base:1")
    return BaseImage(ref=ref, rootfs=rootfs, layout=layout)


def run_in_overlay(layers: list[Path], script: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Mount ``layers`` (bottom first) as an overlay in a private mount namespace and run ``script`` chrooted in it.

    A fresh upper/work directory makes the root writable; it and the mount vanish with the namespace.
    """
    scratch = Path(tempfile.mkdtemp(prefix="overlay-", dir="/var/tmp"))
    try:
        for d in ("upper", "work", "merged"):
            (scratch / d).mkdir()
        lower = ":".join(str(p) for p in reversed(layers))  # overlayfs lists the top layer first
        opts = f"lowerdir={lower},upperdir={scratch}/upper,workdir={scratch}/work"
        inner = 'mount -t overlay overlay -o "$1" "$2" && exec chroot "$2" /bin/sh -c "$3"'
        return subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                inner,
                "sh",
                opts,
                f"{scratch}/merged",
                script,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
