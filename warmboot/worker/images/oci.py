"""OCI images: an OCI image layout on disk, layers as overlayfs lower directories, registry pulls, ``add_python``.

warmboot keeps every image in one OCI image layout (``<root>/oci``: ``oci-layout``, ``index.json``,
``blobs/sha256/``) so that a registry can later serve it, and runs containers from *unpacked* layers: one
directory per layer, stacked by overlayfs. The two forms of a layer differ only in how deletions are written:

==================  =========================================  ===============================================
                    OCI layer tar                              overlayfs lower directory
==================  =========================================  ===============================================
deleted ``NAME``    empty file ``.wh.NAME``                    character device 0/0 named ``NAME``
opaque directory    empty file ``DIR/.wh..wh..opq``            xattr ``trusted.overlay.opaque=y`` on ``DIR``
==================  =========================================  ===============================================

Registry transfers are skopeo's (``skopeo copy docker://REF oci:LAYOUT:NAME``). The conversion between a layer
tar and a lower directory is written here by hand, because no packaged tool does it: umoci and skopeo unpack
a whole image into one merged root filesystem (losing the layer boundaries that overlayfs stacks), and
containers/storage does it only inside its own store. GNU tar can write and read the files but knows nothing of
whiteouts, and Python's ``tarfile.extractall`` follows no rule we can audit for hostile layers. So
:meth:`Layout.write_layer` and :func:`unpack_layer` walk the entries themselves, and :func:`unpack_layer`
refuses absolute paths, ``..``, paths through symlinks and device nodes.

``add_python`` (:func:`python_layer`) builds a layer from Debian's Python packages and their dependency
closure, fetched with a private apt state (the system's apt is never touched) and unpacked with ``dpkg -x``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from warmboot.errors import HostSetupError, ImageBuildError, InvalidOptionError
from warmboot.sdk.image import DEBIAN_PYTHON_SUITES

log = logging.getLogger("warmboot.images.oci")

Progress = Callable[[str], None]

MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
#: The index.json annotation that names an image in a layout (skopeo's ``oci:PATH:NAME`` uses it too).
REF_ANNOTATION = "org.opencontainers.image.ref.name"

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Bumped when the tar or unpack format changes, so cached layer descriptors and layers are not reused.
FORMAT_VERSION = 1
#: How many lines of a failing tool's output an error quotes.
TAIL_LINES = 20
_COPY_CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


# ----------------------------------------------------------------------------------------------------------------
# Data types


@dataclass(frozen=True)
class LayerDescriptor:
    """One layer blob of an OCI layout: its blob digest, uncompressed digest (``diff_id``), size and media type."""

    digest: str  #: ``sha256:<hex>`` of the blob as stored (compressed or not)
    diff_id: str  #: ``sha256:<hex>`` of the uncompressed tar (equal to ``digest`` for uncompressed layers)
    size: int  #: the blob's size in bytes
    media_type: str = MEDIA_LAYER

    def to_json(self) -> dict[str, Any]:
        """The JSON form kept in the layer cache."""
        return {"digest": self.digest, "diff_id": self.diff_id, "size": self.size, "media_type": self.media_type}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerDescriptor:
        """Inverse of :meth:`to_json`."""
        return cls(str(data["digest"]), str(data["diff_id"]), int(data["size"]), str(data["media_type"]))


@dataclass
class ImageConfig:
    """The part of an OCI image config that warmboot uses: environment, working directory, command."""

    env: dict[str, str]
    workdir: str
    cmd: list[str] | None = None


@dataclass(frozen=True)
class PulledBase:
    """A registry image copied into the layout and unpacked into overlayfs lower directories."""

    layers: tuple[Path, ...]  #: unpacked layer directories, bottom first
    env: dict[str, str]  #: the image config's Env
    workdir: str  #: the image config's WorkingDir, ``/`` when it sets none
    digest: str  #: ``sha256:<hex>`` of the pulled manifest: the image, pinned
    ref_name: str = ""  #: the name of the image in the layout (the normalized reference)
    descriptors: tuple[LayerDescriptor, ...] = field(default=())  #: the layer blobs, bottom first


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def _hex(digest: str) -> str:
    algo, _, value = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ImageBuildError(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return value


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _flock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an ``flock`` on ``path`` (created if missing) for the block: serializes threads and processes alike."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``out``."""

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.hash = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.hash.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what is read from ``src`` (the uncompressed tar, for its diff_id)."""

    def __init__(self, src: IO[bytes]):
        self.src = src
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.hash.update(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(_COPY_CHUNK):
            pass


# ----------------------------------------------------------------------------------------------------------------
# The layout


class Layout:
    """An OCI image layout directory: ``oci-layout``, ``index.json`` and ``blobs/sha256/``.

    Writers of ``index.json`` (this class and skopeo, through :func:`pull_base`) hold an exclusive ``flock`` on
    ``<path>.index-lock``, readers a shared one; an ``flock`` belongs to one open file, so callers must not hold
    a lock on that same file around these calls (they would wait on themselves). Blobs are written to a temporary
    name and renamed to their digest, so a blob that exists is complete, and concurrent writers of one blob are
    harmless. The cache of :meth:`write_layer` lives beside the layout in ``<path>.cache/``,
    keeping the layout itself exactly what the OCI spec describes.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".index-lock")
        self.cache_dir = self.path.with_name(self.path.name + ".cache")

    def __repr__(self) -> str:
        return f"Layout({str(self.path)!r})"

    # -- structure ------------------------------------------------------------------------------------------------

    def ensure(self) -> None:
        """Create the layout's skeleton if it is missing (idempotent)."""
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        if not (self.path / "oci-layout").exists():
            _atomic_write(self.path / "oci-layout", _canonical_json({"imageLayoutVersion": "1.0.0"}))
        if not (self.path / "index.json").exists():
            with _flock(self.lock_path):
                if not (self.path / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []})

    def lock(self, *, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """The layout's ``index.json`` lock (exclusive for writers, shared for readers)."""
        return _flock(self.lock_path, shared=shared)

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``sha256:<hex>`` lives (whether or not it exists)."""
        return self.path / "blobs" / "sha256" / _hex(digest)

    def has_blob(self, digest: str) -> bool:
        """Whether the blob is present."""
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str) -> bytes:
        """A blob's bytes (for small blobs: manifests and configs)."""
        try:
            return self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise ImageBuildError(
                f"OCI layout {self.path} lacks blob {digest}; pull or build the image again"
            ) from None

    def write_blob(self, data: bytes) -> str:
        """Store ``data`` as a blob and return its digest (free when the blob exists)."""
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = self.blob_path(digest)
        if not path.exists():
            self.ensure()
            _atomic_write(path, data)
        return digest

    def _read_index(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "index.json").read_text())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}

    def _write_index(self, index: dict[str, Any]) -> None:
        _atomic_write(self.path / "index.json", json.dumps(index, indent=2).encode())

    # -- layers ---------------------------------------------------------------------------------------------------

    def write_layer(self, layer_dir: Path) -> LayerDescriptor:
        """Tar ``layer_dir`` (an overlayfs lower/upper directory) into an uncompressed OCI layer blob.

        Whiteouts (character devices 0/0) become ``.wh.NAME`` files and opaque directories (xattr
        ``trusted.overlay.opaque=y``) get a ``.wh..wh..opq`` entry. Modes, owners, mtimes, symlinks, hardlinks and
        the ``user.*`` and ``security.capability`` xattrs are kept (as PAX ``SCHILY.xattr.*`` records); other
        device nodes, sockets and overlayfs' own xattrs are left out. Entries are sorted, so the same tree gives
        the same digest.

        Layer directories are immutable once made (they are content-addressed and renamed into place), so the
        descriptor is cached by the directory's path and identity (inode, ctime): writing an unchanged layer again
        costs one ``stat``.
        """
        layer_dir = Path(layer_dir).resolve()
        st = os.stat(layer_dir)
        if not stat.S_ISDIR(st.st_mode):
            raise ImageBuildError(f"layer {layer_dir} is not a directory")
        stamp = {"format": FORMAT_VERSION, "path": str(layer_dir), "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}
        cache_file = self.cache_dir / (hashlib.sha256(str(layer_dir).encode()).hexdigest() + ".json")
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
            cached = json.loads(cache_file.read_text())
            if cached["stamp"] == stamp:
                desc = LayerDescriptor.from_json(cached["descriptor"])
                if self.has_blob(desc.digest):
                    return desc
        self.ensure()
        blobs = self.path / "blobs" / "sha256"
        tmp = blobs / f".layer.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as raw:
                out = _HashingWriter(raw)
                _write_tar(layer_dir, out)
            digest = "sha256:" + out.hash.hexdigest()
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        desc = LayerDescriptor(digest=digest, diff_id=digest, size=out.size, media_type=MEDIA_LAYER)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_write(cache_file, _canonical_json({"stamp": stamp, "descriptor": desc.to_json()}))
        return desc

    # -- images ---------------------------------------------------------------------------------------------------

    def write_image(self, layers: Sequence[LayerDescriptor], config: ImageConfig, ref_name: str) -> str:
        """Write the config and manifest blobs for ``layers`` (bottom first) and name the image ``ref_name``.

        Every layer blob must already be in the layout. The ``index.json`` entry for ``ref_name`` (annotation
        ``org.opencontainers.image.ref.name``) is replaced under the layout's lock and written atomically.
        Returns the manifest digest (``sha256:<hex>``), which identifies the image.
        """
        _check_ref_name(ref_name)
        for layer in layers:
            if not self.has_blob(layer.digest):
                raise ImageBuildError(f"cannot write image {ref_name}: layer blob {layer.digest} is not in {self.path}")
        cfg: dict[str, Any] = {"Env": [f"{k}={v}" for k, v in config.env.items()], "WorkingDir": config.workdir}
        if config.cmd is not None:
            cfg["Cmd"] = list(config.cmd)
        config_blob = _canonical_json(
            {
                "architecture": _oci_arch(),
                "os": "linux",
                "config": cfg,
                "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            }
        )
        config_digest = self.write_blob(config_blob)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": len(config_blob)},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size} for layer in layers],
        }
        manifest_blob = _canonical_json(manifest)
        manifest_digest = self.write_blob(manifest_blob)
        with self.lock():
            index = self._read_index()
            entries = [
                m for m in index.get("manifests", []) if m.get("annotations", {}).get(REF_ANNOTATION) != ref_name
            ]
            entries.append(
                {
                    "mediaType": MEDIA_MANIFEST,
                    "digest": manifest_digest,
                    "size": len(manifest_blob),
                    "annotations": {REF_ANNOTATION: ref_name},
                }
            )
            index["manifests"] = entries
            index.setdefault("schemaVersion", 2)
            self._write_index(index)
        return manifest_digest

    def manifest_digest(self, ref_name: str) -> str:
        """The manifest digest that ``ref_name`` names in ``index.json``; ImageBuildError when it names none."""
        with self.lock(shared=True):
            index = self._read_index()
        for entry in index.get("manifests", []):
            if entry.get("annotations", {}).get(REF_ANNOTATION) == ref_name:
                return str(entry["digest"])
        raise ImageBuildError(f"no image named {ref_name!r} in the OCI layout {self.path}")

    def read_image(self, ref_name: str) -> tuple[list[LayerDescriptor], ImageConfig]:
        """The layers (bottom first) and config of the image named ``ref_name``."""
        return self.read_manifest(self.manifest_digest(ref_name))

    def read_manifest(self, manifest_digest: str) -> tuple[list[LayerDescriptor], ImageConfig]:
        """The layers (bottom first) and config of the image whose manifest is ``manifest_digest``."""
        manifest = json.loads(self.read_blob(manifest_digest))
        media = manifest.get("mediaType", MEDIA_MANIFEST)
        if media not in (MEDIA_MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"):
            raise ImageBuildError(f"manifest {manifest_digest} has unsupported media type {media!r}")
        config_json = json.loads(self.read_blob(manifest["config"]["digest"]))
        diff_ids = config_json.get("rootfs", {}).get("diff_ids", [])
        if len(diff_ids) != len(manifest["layers"]):
            raise ImageBuildError(
                f"image {manifest_digest}: config lists {len(diff_ids)} diff_ids for {len(manifest['layers'])} layers"
            )
        layers = [
            LayerDescriptor(
                digest=entry["digest"],
                diff_id=diff_id,
                size=int(entry["size"]),
                media_type=_oci_media_type(entry.get("mediaType", MEDIA_LAYER)),
            )
            for entry, diff_id in zip(manifest["layers"], diff_ids, strict=True)
        ]
        cfg = config_json.get("config") or {}
        env: dict[str, str] = {}
        for item in cfg.get("Env") or []:
            key, _, value = item.partition("=")
            env[key] = value
        cmd = cfg.get("Cmd")
        return layers, ImageConfig(env=env, workdir=cfg.get("WorkingDir") or "/", cmd=list(cmd) if cmd else None)


def _oci_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _oci_media_type(media: str) -> str:
    # Docker's schema-2 layer types are the same tars; name them the OCI way.
    return {
        "application/vnd.docker.image.rootfs.diff.tar.gzip": MEDIA_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar": MEDIA_LAYER,
    }.get(media, media)


# OCI image-layout ref.name grammar (image-spec annotations.md), which skopeo's oci: transport enforces too.
_REF_NAME_RE = re.compile(
    r"^[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*(?:/[A-Za-z0-9]+(?:(?:[-._:@+]|--)[A-Za-z0-9]+)*)*$"
)


def _check_ref_name(ref_name: str) -> None:
    if not _REF_NAME_RE.match(ref_name):
        raise InvalidOptionError(
            f"{ref_name!r} is not a valid OCI image name (letters and digits, separated by one of -._:@+/)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Writing layer tars


def _kept_xattrs(path: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        # overlayfs' own attributes describe this layer's place in a stack, not the file; trusted.* and
        # security.selinux belong to the host's policy. File capabilities and user attributes are content.
        if (name.startswith("user.") and not name.startswith("user.overlay.")) or name == "security.capability":
            with contextlib.suppress(OSError):
                out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _is_opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _tarinfo(name: str, st: os.stat_result, type_: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = type_
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = int(st.st_mtime)
    return info


def _write_tar(layer_dir: Path, out: IO[bytes]) -> None:
    """Stream ``layer_dir`` as a PAX tar into ``out``, converting overlayfs whiteouts to OCI ones."""
    root = str(layer_dir)
    hardlinks: dict[tuple[int, int], str] = {}
    # Stream mode ('w|') because the output is not seekable; surrogateescape keeps non-UTF-8 names and binary
    # xattr values byte-exact (tarfile then marks the PAX record hdrcharset=BINARY).
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape") as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            prefix = "" if rel_dir == "." else rel_dir + "/"
            for name in sorted(dirnames + filenames):
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                mode = st.st_mode
                arcname = prefix + name
                if stat.S_ISCHR(mode) and st.st_rdev == 0:
                    tar.addfile(_tarinfo(prefix + WHITEOUT_PREFIX + name, st, tarfile.REGTYPE))
                    continue
                if stat.S_ISDIR(mode):
                    info = _tarinfo(arcname, st, tarfile.DIRTYPE)
                elif stat.S_ISLNK(mode):
                    info = _tarinfo(arcname, st, tarfile.SYMTYPE)
                    info.linkname = os.readlink(path)
                elif stat.S_ISREG(mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in hardlinks:
                        info = _tarinfo(arcname, st, tarfile.LNKTYPE)
                        info.linkname = hardlinks[key]
                    else:
                        if st.st_nlink > 1:
                            hardlinks[key] = arcname
                        info = _tarinfo(arcname, st, tarfile.REGTYPE)
                        info.size = st.st_size
                elif stat.S_ISFIFO(mode):
                    info = _tarinfo(arcname, st, tarfile.FIFOTYPE)
                else:
                    # Device nodes and sockets: containers get their own minimal /dev, and unpack_layer refuses
                    # device nodes, so a layer never carries them.
                    log.warning("layer %s: leaving out %s (device node or socket)", layer_dir, arcname)
                    continue
                xattrs = _kept_xattrs(path)
                if xattrs:
                    info.pax_headers = {
                        f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in xattrs.items()
                    }
                if info.type == tarfile.REGTYPE:
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                if info.type == tarfile.DIRTYPE and _is_opaque(path):
                    tar.addfile(_tarinfo(arcname + "/" + OPAQUE_MARKER, st, tarfile.REGTYPE))
            # os.walk lists symlinks to directories among dirnames but does not descend into them: fine.


# ----------------------------------------------------------------------------------------------------------------
# Unpacking layer tars


@contextlib.contextmanager
def _open_layer_stream(blob: Path) -> Iterator[IO[bytes]]:
    """The uncompressed tar stream of a layer blob (plain tar, gzip or zstd, told apart by their magic bytes)."""
    with open(blob, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                yield gz  # type: ignore[misc]
            return
        if magic != _ZSTD_MAGIC:
            yield f
            return
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError:
            zstandard = None
        if zstandard is not None:
            with zstandard.ZstdDecompressor().stream_reader(f) as reader:
                yield reader
            return
        zstd = shutil.which("zstd")
        if zstd is None:
            raise ImageBuildError(
                f"layer {blob.name} is zstd-compressed and this host cannot decompress it: install the 'zstd' "
                "package (apt-get install zstd) or the Python package 'zstandard'"
            )
        proc = subprocess.Popen([zstd, "-dcq", str(blob)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            _, err = proc.communicate()
            # zstd sees a broken pipe when the tar ended early on an error raised above: only report real failures.
            if proc.returncode not in (0, None) and not err.strip().endswith(b"Broken pipe"):
                log.debug("zstd -d %s exited %s: %s", blob, proc.returncode, err.decode(errors="replace"))


def _safe_parts(name: str, blob: Path) -> list[str]:
    """The path components of a tar member name, refusing absolute paths and ``..``."""
    if name.startswith("/"):
        raise ImageBuildError(f"layer {blob.name} holds an absolute path {name!r}; refusing to unpack it")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageBuildError(f"layer {blob.name} holds a path that escapes its root: {name!r}; refusing to unpack it")
    return parts


class _Unpacker:
    """Writes tar members below ``root``, never following a symlink and never leaving ``root``."""

    def __init__(self, root: Path, blob: Path):
        self.root = root
        self.blob = blob
        self.known_dirs: set[tuple[str, ...]] = {()}
        self.dir_times: list[tuple[str, int]] = []

    def path(self, parts: Sequence[str]) -> str:
        return os.path.join(self.root, *parts)

    def parent_ready(self, parts: Sequence[str], *, create: bool) -> None:
        """Make sure every ancestor of ``parts`` is a real directory (not a symlink), creating missing ones."""
        for i in range(1, len(parts)):
            key = tuple(parts[:i])
            if key in self.known_dirs:
                continue
            path = self.path(key)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise ImageBuildError(
                        f"layer {self.blob.name}: hardlink source {'/'.join(parts)!r} is missing"
                    ) from None
                os.mkdir(path, 0o755)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise ImageBuildError(
                        f"layer {self.blob.name}: {'/'.join(parts)!r} lies below {'/'.join(key)!r}, which is not a "
                        "directory (a symlink?); refusing to unpack it"
                    )
            self.known_dirs.add(key)

    def clear(self, parts: Sequence[str], *, keep_dir: bool) -> bool:
        """Remove what is at ``parts`` (a later tar entry replaces an earlier one). True when a dir was kept."""
        path = self.path(parts)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)
            return False
        if keep_dir:
            return True
        shutil.rmtree(path)
        # Forget the removed directories (rare: only when an entry replaces a directory, so the scan is cheap).
        prefix = tuple(parts)
        self.known_dirs = {k for k in self.known_dirs if k[: len(prefix)] != prefix}
        return False

    def member(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = _safe_parts(m.name, self.blob)
        if not parts:
            return  # the layer's root entry ("./"): the overlay's root takes its attributes from the upper dir
        base = parts[-1]
        if base == OPAQUE_MARKER:
            dir_parts = parts[:-1]
            self.parent_ready([*dir_parts, "x"], create=True)
            os.setxattr(self.path(dir_parts) if dir_parts else str(self.root), OPAQUE_XATTR, b"y")
            return
        if base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):
            return  # other AUFS metadata (.wh..wh.plnk etc.) has no overlayfs meaning
        if base.startswith(WHITEOUT_PREFIX):
            target_parts = [*parts[:-1], base[len(WHITEOUT_PREFIX) :]]
            if target_parts[-1] in ("", ".", ".."):
                raise ImageBuildError(f"layer {self.blob.name}: malformed whiteout {m.name!r}")
            self.parent_ready(target_parts, create=True)
            path = self.path(target_parts)
            self.clear(target_parts, keep_dir=False)
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
            return
        self.parent_ready(parts, create=True)
        path = self.path(parts)
        if m.isdir():
            if not self.clear(parts, keep_dir=True):
                os.mkdir(path, 0o700)
            self.known_dirs.add(tuple(parts))
        else:
            self.clear(parts, keep_dir=False)
            if m.isreg():
                src = tar.extractfile(m)
                assert src is not None
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                with os.fdopen(fd, "wb") as dst:
                    shutil.copyfileobj(src, dst, _COPY_CHUNK)
            elif m.issym():
                # The target is not checked: it is resolved inside the container's root, and nothing here follows it.
                os.symlink(m.linkname, path)
            elif m.islnk():
                src_parts = _safe_parts(m.linkname, self.blob)
                if not src_parts:
                    raise ImageBuildError(f"layer {self.blob.name}: hardlink {m.name!r} to the layer's root")
                self.parent_ready(src_parts, create=False)
                try:
                    if stat.S_ISDIR(os.lstat(self.path(src_parts)).st_mode):
                        raise ImageBuildError(f"layer {self.blob.name}: hardlink {m.name!r} to a directory")
                    os.link(self.path(src_parts), path, follow_symlinks=False)
                except FileNotFoundError:
                    raise ImageBuildError(
                        f"layer {self.blob.name}: hardlink {m.name!r} names {m.linkname!r}, which the layer lacks"
                    ) from None
                return  # a hardlink shares its source's inode and attributes
            elif m.isfifo():
                os.mkfifo(path, 0o600)
            elif m.ischr() or m.isblk():
                raise ImageBuildError(
                    f"layer {self.blob.name} holds a device node {m.name!r}; refusing it (containers get their own "
                    "minimal /dev, and a device node in an image is a way out of the container)"
                )
            else:
                raise ImageBuildError(f"layer {self.blob.name}: entry {m.name!r} has unsupported tar type {m.type!r}")
        os.chown(path, m.uid, m.gid, follow_symlinks=False)
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)  # after chown, which clears set-id bits
        for key, value in m.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            xname = key[len("SCHILY.xattr.") :]
            # Only content attributes: a layer must not set overlayfs' trusted.overlay.* (redirects, metacopy)
            # or any other trusted.*/security.* attribute of the host's policy.
            if (xname.startswith("user.") and not xname.startswith("user.overlay.")) or xname == "security.capability":
                with contextlib.suppress(OSError):
                    os.setxattr(path, xname, value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
        if m.isdir():
            self.dir_times.append((path, int(m.mtime)))
        else:
            os.utime(path, (m.mtime, m.mtime), follow_symlinks=False)

    def finish(self) -> None:
        # Directory mtimes last, deepest first: creating entries inside a directory changes its mtime.
        for path, mtime in sorted(self.dir_times, key=lambda t: t[0].count("/"), reverse=True):
            with contextlib.suppress(FileNotFoundError):  # replaced by a later entry
                os.utime(path, (mtime, mtime), follow_symlinks=False)


def unpack_layer(blob: Path, dest: Path, *, diff_id: str | None = None) -> None:
    """Unpack a layer blob (tar, gzip or zstd, detected by magic) into ``dest``, an overlayfs lower directory.

    ``.wh.NAME`` becomes a character device 0/0 named ``NAME``; ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y``
    on its directory. Absolute paths, ``..`` components, paths through a symlink, hardlinks outside the layer and
    device nodes other than whiteouts are refused with :class:`ImageBuildError`. When ``diff_id`` is given, the
    uncompressed stream must hash to it.

    Atomic: the layer is unpacked into a temporary sibling directory and renamed to ``dest``. When ``dest`` exists
    already (a finished unpack, possibly by a concurrent caller) nothing is done. Must run as root (whiteouts are
    device nodes, owners are the layer's).
    """
    blob, dest = Path(blob), Path(dest)
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(tmp, 0o755)
    try:
        with _open_layer_stream(blob) as stream:
            reader = _HashingReader(stream)
            unpacker = _Unpacker(tmp, blob)
            try:
                with tarfile.open(fileobj=reader, mode="r|", errors="surrogateescape") as tar:  # type: ignore[call-overload]
                    for member in tar:
                        unpacker.member(tar, member)
            except tarfile.TarError as e:
                raise ImageBuildError(f"layer {blob.name} is not a readable tar: {e}") from e
            reader.drain()  # the diff_id covers the end-of-archive padding too
        unpacker.finish()
        if diff_id is not None and "sha256:" + reader.hash.hexdigest() != diff_id:
            raise ImageBuildError(
                f"layer {blob.name} unpacks to sha256:{reader.hash.hexdigest()}, not its diff_id {diff_id}: the blob "
                "is corrupt; delete it and pull the image again"
            )
        try:
            os.rename(tmp, dest)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            shutil.rmtree(tmp)  # a concurrent unpack of the same layer won the rename
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Looking into a stack of layers without mounting it

#: Where :func:`find_python` looks when the image's env sets no PATH (Docker's default PATH).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_SYMLINKS = 40


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _top_entry(layers: Sequence[Path], parts: Sequence[str]) -> Path | None:
    """The host path of the entry ``parts`` in the overlay of ``layers`` (bottom first), or None where it is absent.

    The caller has resolved every ancestor to a directory of the merged view, so a layer only hides the ones below
    it where an ancestor is a non-directory (a whiteout or a file) or an opaque directory.
    """
    for layer in reversed(layers):
        hidden_below = False
        for k in range(1, len(parts)):
            try:
                st = os.lstat(layer.joinpath(*parts[:k]))
            except FileNotFoundError:
                break
            if not stat.S_ISDIR(st.st_mode):
                return None
            if _is_opaque(str(layer.joinpath(*parts[:k]))):
                hidden_below = True
        path = layer.joinpath(*parts)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if hidden_below:
                return None
            continue
        return None if _is_whiteout(st) else path
    return None


def lookup_path(layers: Sequence[Path], path: str) -> Path | None:
    """Where the container path ``path`` lives on the host, in the overlay of ``layers`` (bottom first).

    Follows symlinks as the container would (absolute targets from the stack's root), honours whiteouts and
    opaque directories, and returns the host path of the final entry, or None when it does not exist. For
    inspecting an image at build time (is there a Python, which one) without mounting anything.
    """
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        comp = parts.pop(0)
        if comp == "..":
            if resolved:
                resolved.pop()
            continue
        hit = _top_entry(layers, [*resolved, comp])
        if hit is None:
            return None
        if stat.S_ISLNK(os.lstat(hit).st_mode):
            hops += 1
            if hops > _MAX_SYMLINKS:
                return None
            target = os.readlink(hit)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(comp)
        if parts and not hit.is_dir():
            return None
    return _top_entry(layers, resolved) if resolved else (layers[-1] if layers else None)


def find_python(layers: Sequence[Path], env: dict[str, str] | None = None) -> str | None:
    """The container path of the first ``python3`` or ``python`` on the image's PATH, or None when it has none."""
    search = (env or {}).get("PATH") or DEFAULT_PATH
    for directory in search.split(":"):
        if not directory.startswith("/"):
            continue
        for name in ("python3", "python"):
            candidate = f"{directory.rstrip('/')}/{name}"
            host = lookup_path(layers, candidate)
            if host is not None and host.is_file() and os.stat(host).st_mode & 0o111:
                return candidate
    return None


# ----------------------------------------------------------------------------------------------------------------
# Registry pulls


@dataclass(frozen=True)
class ImageRef:
    """A parsed registry reference: ``registry/repository[:tag][@digest]`` with Docker's defaults applied."""

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @classmethod
    def parse(cls, ref: str) -> ImageRef:
        """Parse ``ref`` the way docker does (``debian`` is ``docker.io/library/debian:latest``)."""
        text = ref.strip()
        if not text or any(c.isspace() for c in text):
            raise InvalidOptionError(f"{ref!r} is not an image reference (expected e.g. 'debian:bookworm-slim')")
        name, _, digest = text.partition("@")
        first, sep, rest = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, rest
        else:
            registry, path = "docker.io", name
        tag = None
        last_slash = path.rfind("/")
        colon = path.rfind(":")
        if colon > last_slash:
            path, tag = path[:colon], path[colon + 1 :]
        if registry == "docker.io" and "/" not in path:
            path = "library/" + path
        if not re.fullmatch(r"[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*", path):
            raise InvalidOptionError(
                f"{ref!r}: repository {path!r} is not a valid image name (lower case, digits, ._-/)"
            )
        if tag is not None and not re.fullmatch(r"[\w][\w.-]{0,127}", tag):
            raise InvalidOptionError(f"{ref!r}: {tag!r} is not a valid tag")
        if digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise InvalidOptionError(f"{ref!r}: {digest!r} is not a sha256 digest (sha256:<64 hex digits>)")
        if not digest and tag is None:
            tag = "latest"
        return cls(registry=registry, repository=path, tag=tag, digest=digest or None)

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def host(self) -> str:
        """The registry's host name or address, without port or brackets."""
        if self.registry.startswith("["):
            return self.registry[1 : self.registry.index("]")]
        return self.registry.rsplit(":", 1)[0] if self.registry.count(":") == 1 else self.registry

    @property
    def is_loopback(self) -> bool:
        """Whether the registry runs on this host's loopback (where plain HTTP is the norm and TLS is not checked)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def pinned(self, digest: str) -> str:
        """This reference pinned to ``digest`` (``registry/repo@sha256:...``)."""
        return f"{self.registry}/{self.repository}@{digest}"


def _layout_name(ref: ImageRef) -> str:
    # The normalized reference is a valid OCI ref.name except for IPv6 brackets; map those to something valid.
    name = str(ref).replace("[", "").replace("]", "")
    return re.sub(r"[^A-Za-z0-9._:@+/-]", "-", name)


def _run_streaming(argv: list[str], progress: Progress, prefix: str) -> tuple[int, list[str]]:
    """Run ``argv`` with stdout+stderr merged, passing each line to ``progress``; returns (rc, last lines)."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env={**os.environ, "LC_ALL": "C"},
    )
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                progress(f"{prefix}{line}")
    return proc.wait(), list(tail)


def pull_base(ref: str, *, root: Path, progress: Progress) -> PulledBase:
    """Pull ``ref`` from its registry into the layout ``<root>/oci`` and unpack its layers for overlayfs.

    skopeo copies the image (for this host's platform) as ``oci:<root>/oci:<normalized ref>``; its progress lines
    go to ``progress``. Blobs already in the layout are not fetched again, and a reference pinned by digest
    that is already present needs no registry at all. Registries on loopback (127.0.0.0/8, localhost, ::1) are
    reached without TLS verification, as local test registries serve plain HTTP; every other registry must
    present a valid certificate. Credentials are skopeo's own (``skopeo login``).

    Each layer is unpacked once into ``<root>/layers/oci-<diff_id hex>/``, shared by every image that has it.
    Returns the layer directories (bottom first), the config's environment and working directory, and the
    manifest digest that pins the image. A missing image or unreachable registry raises :class:`ImageBuildError`
    quoting skopeo.
    """
    parsed = ImageRef.parse(ref)
    root = Path(root)
    layout = Layout(root / "oci")
    layout.ensure()
    name = _layout_name(parsed)
    manifest_digest: str | None = None
    if parsed.digest is not None:
        with contextlib.suppress(ImageBuildError):
            if layout.manifest_digest(name) == parsed.digest and layout.has_blob(parsed.digest):
                manifest_digest = parsed.digest
                progress(f"[pull] {ref}: already present as {parsed.digest}")
    if manifest_digest is None:
        skopeo = shutil.which("skopeo")
        if skopeo is None:
            raise HostSetupError(
                "pulling registry images needs skopeo: install it with `make setup` (apt-get install skopeo)"
            )
        argv = [skopeo, "copy", "--quiet=false", "--retry-times", "2"]
        if parsed.is_loopback:
            argv.append("--src-tls-verify=false")
        # docker:// takes a tag or a digest, not both: a digest pins the image, so it wins.
        source = parsed.pinned(parsed.digest) if parsed.digest else str(parsed)
        argv += [f"docker://{source}", f"oci:{layout.path}:{name}"]
        progress(f"[pull] {ref}")
        with layout.lock():  # skopeo rewrites index.json
            rc, tail = _run_streaming(argv, progress, "[pull] ")
        if rc != 0:
            raise ImageBuildError(
                f"could not pull {ref!r} ({parsed}): skopeo exited {rc}:\n"
                + "\n".join(f"  {line}" for line in tail)
                + "\nCheck the image name and tag, that the registry is reachable from this host, and for a private "
                "registry log in first with `skopeo login REGISTRY`."
            )
        manifest_digest = layout.manifest_digest(name)
    descriptors, config = layout.read_manifest(manifest_digest)
    layers: list[Path] = []
    for desc in descriptors:
        dest = root / "layers" / f"oci-{_hex(desc.diff_id)}"
        if not dest.exists():
            with _flock(dest.with_name(f".{dest.name}.lock")):
                if not dest.exists():
                    progress(f"[pull] unpacking layer {desc.diff_id[:19]} ({desc.size / 1e6:.1f} MB)")
                    unpack_layer(layout.blob_path(desc.digest), dest, diff_id=desc.diff_id)
        layers.append(dest)
    progress(f"[pull] {ref}: {parsed.pinned(manifest_digest)}, {len(layers)} layers")
    return PulledBase(
        layers=tuple(layers),
        env=dict(config.env),
        workdir=config.workdir or "/",
        digest=manifest_digest,
        ref_name=name,
        descriptors=tuple(descriptors),
    )


# ----------------------------------------------------------------------------------------------------------------
# add_python: Debian's Python as a layer

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
        rc, tail = _run_streaming(argv, progress, "[python] ")
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
    key = hashlib.sha256(_canonical_json({"format": FORMAT_VERSION, "suite": suite, "packages": packages})).hexdigest()
    layers = Path(root) / "layers"
    dest = layers / f"python-{version}-{key[:16]}"
    if dest.exists():
        return dest
    layers.mkdir(parents=True, exist_ok=True)
    with _flock(layers / f".{dest.name}.lock"):
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
