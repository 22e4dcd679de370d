"""Layers: an OCI layer tar and an overlayfs lower directory, each turned into the other, and looked into.

warmboot runs containers from *unpacked* layers, one directory per layer, stacked by overlayfs, and stores
them as OCI layer tars (:mod:`~warmboot.worker.images.oci`). The two forms of a layer differ only in how
deletions are written:

==================  =========================================  ===============================================
                    OCI layer tar                              overlayfs lower directory
==================  =========================================  ===============================================
deleted ``NAME``    empty file ``.wh.NAME``                    character device 0/0 named ``NAME``
opaque directory    empty file ``DIR/.wh..wh..opq``            xattr ``trusted.overlay.opaque=y`` on ``DIR``
==================  =========================================  ===============================================

The conversion between a layer tar and a lower directory is written here by hand, because no packaged tool does
it: umoci and skopeo unpack a whole image into one merged root filesystem (losing the layer boundaries that
overlayfs stacks), and containers/storage does it only inside its own store. GNU tar can write and read the
files but knows nothing of whiteouts, and Python's ``tarfile.extractall`` follows no rule we can audit for
hostile layers. So :func:`write_tar` and :func:`unpack_layer` walk the entries themselves, and
:func:`unpack_layer` refuses absolute paths, ``..``, paths through symlinks and device nodes.

:func:`lookup_path` and :func:`find_python` look into a stack of such directories without mounting it.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import logging
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from warmboot.errors import ImageBuildError

log = logging.getLogger("warmboot.images.layers")

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
#: Bumped when the tar or unpack format changes, so cached layer descriptors and layers are not reused.
FORMAT_VERSION = 1
_COPY_CHUNK = 1 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


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


def write_tar(layer_dir: Path, out: IO[bytes]) -> None:
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

#: PATH in images whose environment sets none (Docker's default): where :func:`find_python` looks then, and what
#: a container's init searches when the image sets none.
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
