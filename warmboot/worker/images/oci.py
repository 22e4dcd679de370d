"""The OCI image layout on disk: blobs, manifests, configs and ``index.json``, and the descriptors of layers.

warmboot keeps every image in one OCI image layout (``<root>/oci``: ``oci-layout``, ``index.json``,
``blobs/sha256/``) so that a registry can later serve it, and runs containers from *unpacked* layers: one
directory per layer, stacked by overlayfs. :meth:`Layout.write_layer` tars such a directory into a layer blob
(the conversion is :mod:`~warmboot.worker.images.layers`'); :mod:`~warmboot.worker.images.registry` pulls
images into a layout and :func:`~warmboot.worker.images.layers.unpack_layer` turns their blobs back into
directories.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.worker.images.fsutil import atomic_write, flock
from warmboot.worker.images.layers import FORMAT_VERSION, write_tar

MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
#: The index.json annotation that names an image in a layout (skopeo's ``oci:PATH:NAME`` uses it too).
REF_ANNOTATION = "org.opencontainers.image.ref.name"


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


# ----------------------------------------------------------------------------------------------------------------
# Small helpers


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest; ImageBuildError for any other algorithm or a malformed one."""
    algo, _, value = digest.partition(":")
    if algo != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ImageBuildError(f"unsupported or malformed digest {digest!r} (only sha256 is supported)")
    return value


def canonical_json(obj: Any) -> bytes:
    """``obj`` as compact JSON with sorted keys: the same object always gives the same bytes (and digest)."""
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


# ----------------------------------------------------------------------------------------------------------------
# The layout


class Layout:
    """An OCI image layout directory: ``oci-layout``, ``index.json`` and ``blobs/sha256/``.

    Writers of ``index.json`` (this class and skopeo, through :func:`~warmboot.worker.images.registry.pull_base`)
    hold an exclusive ``flock`` on ``<path>.index-lock``, readers a shared one; an ``flock`` belongs to one open
    file, so callers must not hold a lock on that same file around these calls (they would wait on themselves).
    Blobs are written to a temporary name and renamed to their digest, so a blob that exists is complete, and
    concurrent writers of one blob are harmless. The cache of :meth:`write_layer` lives beside the layout in
    ``<path>.cache/``, keeping the layout itself exactly what the OCI spec describes.
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
            atomic_write(self.path / "oci-layout", canonical_json({"imageLayoutVersion": "1.0.0"}))
        if not (self.path / "index.json").exists():
            with flock(self.lock_path):
                if not (self.path / "index.json").exists():
                    self._write_index({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []})

    def lock(self, *, shared: bool = False) -> contextlib.AbstractContextManager[None]:
        """The layout's ``index.json`` lock (exclusive for writers, shared for readers)."""
        return flock(self.lock_path, shared=shared)

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``sha256:<hex>`` lives (whether or not it exists)."""
        return self.path / "blobs" / "sha256" / digest_hex(digest)

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
            atomic_write(path, data)
        return digest

    def _read_index(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "index.json").read_text())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}

    def _write_index(self, index: dict[str, Any]) -> None:
        atomic_write(self.path / "index.json", json.dumps(index, indent=2).encode())

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
                write_tar(layer_dir, out)
            digest = "sha256:" + out.hash.hexdigest()
            os.replace(tmp, self.blob_path(digest))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        desc = LayerDescriptor(digest=digest, diff_id=digest, size=out.size, media_type=MEDIA_LAYER)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, canonical_json({"stamp": stamp, "descriptor": desc.to_json()}))
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
        config_blob = canonical_json(
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
        manifest_blob = canonical_json(manifest)
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
