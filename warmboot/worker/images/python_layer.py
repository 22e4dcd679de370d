"""``add_python``: Debian's Python and its dependency closure as one layer, for registry images that lack one.

:func:`python_layer` builds the layer from Debian's Python packages, fetched with a private apt state
(:func:`apt_download`; the system's apt is never touched) and unpacked with ``dpkg -x``. What the packages'
maintainer scripts would have made (the CA bundle) is made here, and the tree is given merged-/usr's shape.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.sdk.image import DEBIAN_PYTHON_SUITES
from warmboot.worker.images.commands import Progress, run_streaming
from warmboot.worker.images.fsutil import flock
from warmboot.worker.images.layers import FORMAT_VERSION
from warmboot.worker.images.oci import canonical_json

#: Python versions that :func:`python_layer` can add, and the Debian suite whose default Python each is.
PYTHON_SUITES = DEBIAN_PYTHON_SUITES
_PYTHON_PACKAGES = ("python{v}", "python3", "python3-pip", "python3-venv", "ca-certificates")
_DEFAULT_MIRROR = "http://deb.debian.org/debian"
_DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
_DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
#: Top-level directories that Debian's merged-/usr layout turns into symlinks into /usr.
_MERGED_DIRS = ("bin", "sbin", "lib", "lib64")


def python_versions() -> list[str]:
    """The Python versions :func:`python_layer` can add."""
    return sorted(PYTHON_SUITES, key=lambda v: tuple(int(x) for x in v.split(".")))


def host_debian_mirrors() -> tuple[str, str]:
    """The Debian archive and security mirrors this host's apt uses (so builds behind a mirror keep working)."""
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") and path.is_file():
            with contextlib.suppress(OSError):
                texts.append(path.read_text())
    mirror = security = None
    for text in texts:
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            for url in re.findall(r"https?://\S+", line):
                url = url.rstrip("/")
                if url.endswith("/debian-security") and security is None:
                    security = url
                elif url.endswith("/debian") and mirror is None:
                    mirror = url
    return mirror or _DEFAULT_MIRROR, security or _DEFAULT_SECURITY_MIRROR


def apt_download(packages: Sequence[str], suite: str, work: Path, progress: Progress) -> list[Path]:
    """Download ``packages`` and their whole dependency closure from Debian ``suite`` into ``work/archives``.

    Uses a private apt state under ``work`` (sources, lists, an empty dpkg status, archives), so the closure is
    computed as for an empty system and the host's apt is never touched; signatures are checked against the host's
    Debian archive keyring. Returns the downloaded ``.deb`` files.
    """
    mirror, security = host_debian_mirrors()
    signed = f"[signed-by={_DEBIAN_KEYRING}] " if os.path.exists(_DEBIAN_KEYRING) else ""
    (work / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (work / "etc").mkdir(parents=True, exist_ok=True)
    sources = [f"deb {signed}{mirror} {suite} main", f"deb {signed}{mirror} {suite}-updates main"]
    sources.append(f"deb {signed}{security} {suite}-security main")
    (work / "etc" / "sources.list").write_text("\n".join(sources) + "\n")
    (work / "status").write_text("")
    opts = [
        "-o", f"Dir::Etc::SourceList={work}/etc/sources.list",
        "-o", f"Dir::Etc::SourceParts={work}/etc/none",
        "-o", f"Dir::State::Lists={work}/lists",
        "-o", f"Dir::State::status={work}/status",
        "-o", f"Dir::Cache={work}/cache",
        "-o", f"Dir::Cache::archives={work}/archives",
        "-o", "APT::Get::AllowUnauthenticated=false",
        "-o", "Debug::NoLocking=1",
        "-o", "APT::Sandbox::User=root",
        "-o", "Acquire::Languages=none",
    ]  # fmt: skip
    for argv in (
        ["apt-get", *opts, "-q", "update"],
        ["apt-get", *opts, "-q", "-y", "install", "--download-only", "--no-install-recommends", *packages],
    ):
        rc, tail = run_streaming(argv, progress, prefix="[python] ", c_locale=True, skip_blank=True)
        if rc != 0:
            raise ImageBuildError(
                f"could not download {' '.join(packages)} from Debian {suite} ({mirror}): "
                f"`apt-get {argv[-1] if argv[-1] == 'update' else 'install'}` exited {rc}:\n"
                + "\n".join(f"  {line}" for line in tail)
            )
    debs = sorted((work / "archives").glob("*.deb"))
    if not debs:
        raise ImageBuildError(f"apt downloaded no packages for {' '.join(packages)} from Debian {suite}")
    return debs


def _merge_usr(stage: Path) -> None:
    """Move /bin, /sbin, /lib, /lib64 into /usr and leave symlinks, as Debian's merged-/usr systems have them.

    Older packages still ship files under /lib; a real /lib directory in an upper layer would hide the base
    image's ``/lib -> usr/lib`` symlink (and pair the base's loader with another libc), so the layer must have
    exactly the base's shape. The symlinks are added even where the packages had no such directory, so that the
    layer also works on a base that lacks them (the dynamic loader is /lib64/ld-linux-x86-64.so.2).
    """
    for name in _MERGED_DIRS:
        top = stage / name
        usr = stage / "usr" / name
        if top.is_symlink():
            top.unlink()
        elif top.is_dir():
            usr.mkdir(parents=True, exist_ok=True)
            for dirpath, dirnames, filenames in os.walk(top):
                rel = Path(dirpath).relative_to(top)
                (usr / rel).mkdir(parents=True, exist_ok=True)
                for entry in dirnames + filenames:
                    src, dst = Path(dirpath) / entry, usr / rel / entry
                    if src.is_symlink() or not src.is_dir():
                        if dst.exists() or dst.is_symlink():
                            dst.unlink()
                        os.rename(src, dst)
            shutil.rmtree(top)
        os.symlink(f"usr/{name}", top)


def _ca_bundle(stage: Path) -> None:
    """Write /etc/ssl/certs/ca-certificates.crt, which ca-certificates' maintainer script would have made."""
    certs = sorted((stage / "usr" / "share" / "ca-certificates").rglob("*.crt"))
    if not certs:
        return
    out = stage / "etc" / "ssl" / "certs"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ca-certificates.crt").write_bytes(b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs))


def python_layer(version: str, *, root: Path, progress: Progress) -> Path:
    """A layer directory that adds Python ``version`` (with pip and venv) to an image that lacks it: ``add_python``.

    Built from Debian's own packages (``python3.11`` from bookworm, ``python3.13`` from trixie) and their whole
    dependency closure, downloaded with a private apt state (:func:`apt_download`) from the host's Debian mirror
    and unpacked with ``dpkg -x``; maintainer scripts do not run, so what they would make (the CA bundle) is made
    here. ``/usr/local/bin/python``, ``python3`` and ``pip`` point at it, and the EXTERNALLY-MANAGED marker is left
    out so ``pip install`` works system-wide as in Modal's images. The layer is merged-/usr shaped (see
    :func:`_merge_usr`) and carries its own glibc, so the base must be a glibc, merged-/usr system (Debian 12+,
    Ubuntu 22.04+) or have no /bin, /lib at all; it replaces the base's libc with its suite's.

    Cached in ``<root>/layers/python-<version>-<key>/`` (``key`` hashes the package set and this format), built
    once under an ``flock``; unknown versions raise :class:`InvalidOptionError` listing the available ones.
    """
    if version not in PYTHON_SUITES:
        raise InvalidOptionError(
            f"add_python={version!r} is not available here; available versions: {', '.join(python_versions())}"
        )
    suite = PYTHON_SUITES[version]
    packages = [p.format(v=version) for p in _PYTHON_PACKAGES]
    key = hashlib.sha256(canonical_json({"format": FORMAT_VERSION, "suite": suite, "packages": packages})).hexdigest()
    layers = Path(root) / "layers"
    dest = layers / f"python-{version}-{key[:16]}"
    if dest.exists():
        return dest
    layers.mkdir(parents=True, exist_ok=True)
    with flock(layers / f".{dest.name}.lock"):
        if dest.exists():
            return dest
        progress(f"[python] building Python {version} from Debian {suite} packages")
        with tempfile.TemporaryDirectory(prefix=f".{dest.name}.tmp-", dir=layers) as tmp:
            work = Path(tmp)
            debs = apt_download(packages, suite, work / "apt", progress)
            stage = work / "layer"
            stage.mkdir(mode=0o755)
            for deb in debs:
                proc = subprocess.run(["dpkg", "-x", str(deb), str(stage)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise ImageBuildError(f"dpkg -x {deb.name} failed: {proc.stderr.strip()}")
            progress(f"[python] unpacked {len(debs)} packages")
            _merge_usr(stage)
            _ca_bundle(stage)
            for doc in ("doc", "man", "info", "lintian"):
                shutil.rmtree(stage / "usr" / "share" / doc, ignore_errors=True)
            for marker in stage.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
                marker.unlink()
            if not (stage / "usr" / "bin" / f"python{version}").exists():
                raise ImageBuildError(f"Debian {suite}'s packages did not provide /usr/bin/python{version}")
            bindir = stage / "usr" / "local" / "bin"
            bindir.mkdir(parents=True, exist_ok=True)
            for link, target in (("python", f"/usr/bin/python{version}"), ("python3", f"/usr/bin/python{version}"),
                                 ("pip", "/usr/bin/pip3"), ("pip3", "/usr/bin/pip3")):  # fmt: skip
                os.symlink(target, bindir / link)
            os.rename(stage, dest)
    progress(f"[python] Python {version} layer ready: {dest.name}")
    return dest
