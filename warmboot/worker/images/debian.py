"""``debian_slim`` bases: a minimal Debian root filesystem with Python, bootstrapped by mmdebstrap, cached host-wide.

A base depends only on the suite, the package list, the mirror and :data:`BASE_FORMAT`, never on a warmboot
home, so every home on this machine (tests make many) shares one copy under
``$WARMBOOT_CACHE/bases/`` (default ``/var/cache/warmboot``)::

    <key>.json   the base of a key (suite, packages, mirrors, format): its description and random ``id``,
                 written last (the marker of a complete base)
    <id>/        the root filesystem: an overlayfs lower layer, never changed once published
    <key>.lock   the ``flock`` serializing bootstraps of one key

The ``id`` changes whenever the base is bootstrapped again (a fresh machine, a deleted cache), and layers built
on top chain from it, so they are never reused on a base they were not built on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmboot.errors import HostSetupError, ImageBuildError
from warmboot.sdk.image import DEBIAN_PYTHON_SUITES, debian_suite
from warmboot.worker.images.commands import run_streaming
from warmboot.worker.images.fsutil import atomic_write, flock

#: Bumped whenever the bootstrap or the post-processing below changes.
BASE_FORMAT = 1
#: Packages of every base: Python with pip and venv, and TLS roots so pip and apt reach https mirrors.
PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"


@dataclass(frozen=True)
class DebianBase:
    """A bootstrapped base root filesystem."""

    id: str  #: random per bootstrap: what layers built on it chain from
    rootfs: Path
    python_version: str
    suite: str


def cache_dir() -> Path:
    """Where bases are kept: ``$WARMBOOT_CACHE`` or ``/var/cache/warmboot``."""
    return Path(os.environ.get("WARMBOOT_CACHE") or "/var/cache/warmboot")


def suite_for(python_version: str) -> str:
    """The Debian suite whose ``python3`` is ``python_version``; refuses versions this machine cannot build."""
    return debian_suite(python_version)


def host_mirrors() -> tuple[str, str]:
    """The Debian archive and security mirrors this host's apt uses (deb822 ``.sources`` or one-line lists)."""
    archive = security = None
    entries: list[tuple[str, list[str]]] = []  # (URI, suites)
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in path.read_text().split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith(("#", " ")):
                        name, _, value = line.partition(":")
                        fields[name.strip().lower()] = value.strip()
                if "deb" in fields.get("types", "").split():
                    for uri in fields.get("uris", "").split():
                        entries.append((uri, fields.get("suites", "").split()))
    lists = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in lists:
        with contextlib.suppress(OSError):
            for line in path.read_text().splitlines():
                words = line.split("#")[0].split()
                if words and words[0] == "deb":
                    words = [w for w in words[1:] if not (w.startswith("[") or w.endswith("]") or "=" in w)]
                    if len(words) >= 2:
                        entries.append((words[0], [words[1]]))
    for uri, suites in entries:
        uri = uri.rstrip("/")
        if security is None and any(s.endswith("-security") for s in suites) and "security" in uri:
            security = uri
        elif archive is None and uri.endswith("/debian") and any("-" not in s for s in suites):
            archive = uri
    return archive or DEFAULT_MIRROR, security or DEFAULT_SECURITY


def base_key(python_version: str) -> str:
    """The cache key of a base: suite, packages, mirrors and format."""
    suite = DEBIAN_PYTHON_SUITES[python_version]
    archive, security = host_mirrors()
    text = json.dumps([BASE_FORMAT, suite, PACKAGES, archive, security])
    return f"{suite}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def ensure_base(python_version: str, progress: Callable[[str], None], *, force: bool = False) -> DebianBase:
    """The cached base of ``python_version``, bootstrapped first if this machine has none (or ``force``).

    A forced bootstrap makes a new base beside the old one (images built before may still use the old one).
    """
    suite = suite_for(python_version)
    key = base_key(python_version)
    bases = cache_dir() / "bases"
    bases.mkdir(parents=True, exist_ok=True)
    pointer = bases / f"{key}.json"
    if not force and (found := _load(pointer)) is not None:
        return found
    with flock(bases / f"{key}.lock"):
        if not force and (found := _load(pointer)) is not None:  # built by another process while we waited
            return found
        base_id = secrets.token_hex(16)
        tmp = bases / f".tmp-{base_id}"
        try:
            meta = _bootstrap(python_version, suite, tmp, progress)
            os.rename(tmp, bases / base_id)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        meta["id"] = base_id
        atomic_write(pointer, json.dumps(meta, indent=2) + "\n")
        found = _load(pointer)
        assert found is not None
        return found


def _bootstrap(python_version: str, suite: str, target: Path, progress: Callable[[str], None]) -> dict[str, Any]:
    if shutil.which("mmdebstrap") is None:
        raise HostSetupError("mmdebstrap is not installed (run `make setup`, or apt-get install mmdebstrap)")
    archive, security = host_mirrors()
    sources = [f"deb {archive} {suite} main", f"deb {archive} {suite}-updates main"]
    sources.append(f"deb {security} {suite}-security main")
    from warmboot.worker.images.hostcfg import apt_settings

    aptopts: list[str] = []
    for line in apt_settings().splitlines():
        aptopts += ["--aptopt", line]
    target.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        "mmdebstrap",
        "--variant=minbase",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(PACKAGES)}",
        *aptopts,
        suite,
        str(target),
        *sources,
    ]
    progress(f"Bootstrapping Debian {suite} (Python {python_version}) from {archive}")
    started = time.monotonic()
    status, tail = run_streaming(argv, progress)
    if status != 0:
        raise ImageBuildError(
            f"Image build failed at its base: `{' '.join(argv)}` exited with status {status}\n"
            f"Last {len(tail)} line(s) of its output:\n" + "\n".join(f"  {line}" for line in tail)
        )
    _finish_rootfs(target, python_version)
    meta = {
        "format": BASE_FORMAT,
        "suite": suite,
        "python_version": python_version,
        "packages": list(PACKAGES),
        "mirrors": [archive, security],
        "built_at": time.time(),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    progress(f"Bootstrapped Debian {suite} in {meta['build_seconds']} s")
    return meta


def _finish_rootfs(rootfs: Path, python_version: str) -> None:
    """Make the bootstrapped tree a Python image: pip usable as root, ``python``/``pip`` names, mount points."""
    python = rootfs / "usr" / "bin" / f"python{python_version}"
    if not python.exists():
        raise ImageBuildError(f"the Debian base for Python {python_version} has no {python.relative_to(rootfs)}")
    # Debian marks its Python "externally managed" (PEP 668); an image is ours to pip install into, as Modal's are.
    for marker in (rootfs / "usr" / "lib").glob("python3*/EXTERNALLY-MANAGED"):
        marker.unlink()
    local_bin = rootfs / "usr" / "local" / "bin"
    local_bin.mkdir(parents=True, exist_ok=True)
    for name, target in (("python", f"/usr/bin/python{python_version}"), ("pip", "/usr/bin/pip3")):
        link = local_bin / name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(target)
    # Mount points the build sandbox and containers bind onto: present in the base, so no layer gains them.
    resolv = rootfs / "etc" / "resolv.conf"
    if resolv.is_symlink():
        resolv.unlink()
    resolv.touch()
    for d in ("proc", "dev", "sys", "tmp", "root", "run"):
        (rootfs / d).mkdir(exist_ok=True)


def _load(pointer: Path) -> DebianBase | None:
    """The base a key's pointer file names, if it is complete and its root filesystem is still there."""
    try:
        meta = json.loads(pointer.read_text())
    except (OSError, ValueError):
        return None
    rootfs = pointer.parent / str(meta.get("id"))
    if meta.get("format") != BASE_FORMAT or not (rootfs / "usr").is_dir():
        return None  # a fresh machine, or a cache someone cleaned: bootstrap again
    return DebianBase(id=meta["id"], rootfs=rootfs, python_version=meta["python_version"], suite=meta["suite"])
