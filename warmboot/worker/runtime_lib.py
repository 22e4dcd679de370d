"""The runtime layer: the read-only top layer of every container's root filesystem.

It holds what warmboot itself puts in a container, so images stay exactly what the user asked for:

    __warmboot/lib/      what a container imports of warmboot (SDK, runtime), cloudpickle and a2wsgi (on PYTHONPATH)
    __warmboot/init      the static init that confines the container and runs its command (sandbox/init.c)
    __warmboot/seccomp.bpf   the seccomp filter the init loads
    dev/                 an opaque /dev with only the standard character devices (no host device is reachable)
    etc/resolv.conf, etc/hosts, etc/hostname   the container's network identity (slirp4netns' DNS)
    proc/ sys/ tmp/      mount points, for images that lack them

It is content-addressed (``$WARMBOOT_HOME/runtime/<digest>/``) and made once per digest.
"""

from __future__ import annotations

import compileall
import functools
import hashlib
import os
import shutil
import stat
import threading
from pathlib import Path

import a2wsgi
import cloudpickle

import warmboot
from warmboot.worker.sandbox import entry, seccomp

#: Bumped whenever the layer's layout changes (2: it holds bytecode compiled by the server's Python).
LAYOUT_VERSION = 2
LIB_DIR = "/__warmboot/lib"  #: inside the container
_STANDARD_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}
_ETC = {
    "resolv.conf": "nameserver 10.0.2.3\n",  # slirp4netns' DNS forwarder, the only resolver a container reaches
    "hosts": "127.0.0.1\tlocalhost warmboot\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "hostname": "warmboot\n",
}


#: What of warmboot a container imports: the SDK, the runtime and what they use. Only these go into the runtime
#: layer, so only a change to them makes new snapshot keys (the server, CLI and worker are not in a container).
CONTAINER_PARTS = (
    "__init__.py",
    "config.py",
    "errors.py",
    "exception.py",
    "functions.py",
    "validation.py",
    "sdk",
    "runtime",
)


def _files(root: Path, parts: tuple[str, ...] | None) -> list[Path]:
    """The ``.py`` files of the package at ``root`` (only ``parts`` of it when given), sorted."""
    tops = [root / p for p in parts] if parts is not None else [root]
    found: list[Path] = []
    for top in tops:
        found += [top] if top.is_file() else list(top.rglob("*.py"))
    return sorted(found)


def _tree_digest(sources: list[tuple[Path, tuple[str, ...] | None]], digest: hashlib._Hash) -> None:
    for root, parts in sources:
        for path in _files(root, parts):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())


_ensure_lock = threading.Lock()  # pools boot containers on many threads; they share one temporary name


@functools.cache
def ensure(home: Path) -> Path:
    """The runtime layer's directory (made on first use)."""
    with _ensure_lock:
        return _ensure(home)


def _sources(*, container_only: bool) -> list[tuple[Path, tuple[str, ...] | None]]:
    parts = CONTAINER_PARTS if container_only else None
    return [
        (Path(warmboot.__file__).parent, parts),
        (Path(cloudpickle.__file__).parent, None),
        (Path(a2wsgi.__file__).parent, None),  # @modal.wsgi_app's adapter, imported only by WSGI endpoints
    ]


def code_digest() -> str:
    """The digest of all of warmboot's (and cloudpickle's) code on disk now: a running server compares its own."""
    digest = hashlib.sha256()
    _tree_digest(_sources(container_only=False), digest)
    return digest.hexdigest()[:16]


def _layer_digest(init: bytes, bpf: bytes) -> str:
    digest = hashlib.sha256(f"warmboot-runtime-layer-v{LAYOUT_VERSION}\0".encode())
    _tree_digest(_sources(container_only=True), digest)
    digest.update(hashlib.sha256(init).digest())
    digest.update(hashlib.sha256(bpf).digest())
    return digest.hexdigest()[:16]


def _ensure(home: Path) -> Path:
    init = entry.init_binary().read_bytes()
    bpf = seccomp.export_bpf()
    target = home / "runtime" / _layer_digest(init, bpf)
    if target.is_dir():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lib = tmp / LIB_DIR.lstrip("/")
    for root, parts in _sources(container_only=True):
        for path in _files(root, parts):
            dest = lib / root.name / path.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
    # Bytecode, compiled once here: the layer is read-only, so a container would otherwise compile every module it
    # imports at each cold boot (about 30 ms of the SDK, runtime and cloudpickle here). It serves images whose
    # Python is this one's version (Debian bookworm's 3.11 for debian_slim()); others compile as before.
    compileall.compile_dir(str(lib), quiet=2, workers=1)
    _write(tmp / "__warmboot" / "init", init, 0o755)
    _write(tmp / "__warmboot" / "seccomp.bpf", bpf, 0o644)
    _make_dev(tmp / "dev")
    for name, text in _ETC.items():
        _write(tmp / "etc" / name, text.encode(), 0o644)
    for name, mode in (("proc", 0o555), ("sys", 0o555), ("tmp", 0o1777)):
        (tmp / name).mkdir(mode=mode)
        os.chmod(tmp / name, mode)
    try:
        os.rename(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def _make_dev(dev: Path) -> None:
    """An opaque /dev: the image's own /dev entries (device nodes included) are hidden under it."""
    dev.mkdir(mode=0o755)
    os.setxattr(dev, "trusted.overlay.opaque", b"y")
    for name, (major, minor) in _STANDARD_DEVICES.items():
        os.mknod(dev / name, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)
    (dev / "shm").mkdir(mode=0o1777)
    (dev / "pts").mkdir(mode=0o755)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1")):
        os.symlink(target, dev / name)
    os.symlink("/proc/self/fd/2", dev / "stderr")
