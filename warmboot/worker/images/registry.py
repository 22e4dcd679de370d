"""Registry images: references parsed as docker does, pulled by skopeo into the OCI layout and unpacked.

Registry transfers are skopeo's (``skopeo copy docker://REF oci:LAYOUT:NAME``); each layer of a pulled image
is then unpacked once (:func:`~warmboot.worker.images.layers.unpack_layer`) into a directory shared by every
image that has it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from warmboot.errors import HostSetupError, ImageBuildError, InvalidOptionError
from warmboot.worker.images.commands import Progress, run_streaming
from warmboot.worker.images.fsutil import flock
from warmboot.worker.images.layers import unpack_layer
from warmboot.worker.images.oci import LayerDescriptor, Layout, digest_hex


@dataclass(frozen=True)
class PulledBase:
    """A registry image copied into the layout and unpacked into overlayfs lower directories."""

    layers: tuple[Path, ...]  #: unpacked layer directories, bottom first
    env: dict[str, str]  #: the image config's Env
    workdir: str  #: the image config's WorkingDir, ``/`` when it sets none
    digest: str  #: ``sha256:<hex>`` of the pulled manifest: the image, pinned
    ref_name: str = ""  #: the name of the image in the layout (the normalized reference)
    descriptors: tuple[LayerDescriptor, ...] = field(default=())  #: the layer blobs, bottom first


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
        # docker:// takes a tag or a digest, not both: a digest pins the image, so it wins.
        source = parsed.pinned(parsed.digest) if parsed.digest else str(parsed)
        rc, tail = copy_into_layout(source, layout, name, insecure=parsed.is_loopback, progress=progress, ref=ref)
        if rc != 0:
            raise ImageBuildError(
                f"could not pull {ref!r} ({parsed}): skopeo exited {rc}:\n"
                + "\n".join(f"  {line}" for line in tail)
                + "\nCheck the image name and tag, that the registry is reachable from this host, and for a private "
                "registry log in first with `skopeo login REGISTRY`."
            )
        manifest_digest = layout.manifest_digest(name)
    descriptors, config = layout.read_manifest(manifest_digest)
    layers = unpack_layers(layout, descriptors, root, progress)
    progress(f"[pull] {ref}: {parsed.pinned(manifest_digest)}, {len(layers)} layers")
    return PulledBase(
        layers=tuple(layers),
        env=dict(config.env),
        workdir=config.workdir or "/",
        digest=manifest_digest,
        ref_name=name,
        descriptors=tuple(descriptors),
    )


def copy_into_layout(
    source: str, layout: Layout, name: str, *, insecure: bool, progress: Progress, ref: str
) -> tuple[int, list[str]]:
    """``skopeo copy docker://SOURCE oci:LAYOUT:NAME`` (under the layout's lock: skopeo rewrites index.json);
    returns skopeo's exit status and its last lines. Raises HostSetupError when skopeo is missing."""
    skopeo = shutil.which("skopeo")
    if skopeo is None:
        raise HostSetupError(
            "pulling registry images needs skopeo: install it with `make setup` (apt-get install skopeo)"
        )
    argv = [skopeo, "copy", "--quiet=false", "--retry-times", "2"]
    if insecure:
        argv.append("--src-tls-verify=false")
    argv += [f"docker://{source}", f"oci:{layout.path}:{name}"]
    progress(f"[pull] {ref}")
    with layout.lock():
        return run_streaming(argv, progress, prefix="[pull] ", c_locale=True, skip_blank=True)


def unpack_layers(layout: Layout, descriptors: Sequence[LayerDescriptor], root: Path, progress: Progress) -> list[Path]:
    """Each layer of an image unpacked once into ``<root>/layers/oci-<diff_id hex>/``, shared by every image that
    has it (a lock per layer: concurrent pulls unpack it once); bottom first.

    overlayfs refuses one directory twice in a stack (ELOOP): a layer repeated within an image (two steps that
    changed nothing tar alike) gets a directory of its own, ``oci-<hex>-2``.
    """
    layers: list[Path] = []
    seen: dict[str, int] = {}
    for desc in descriptors:
        seen[desc.diff_id] = seen.get(desc.diff_id, 0) + 1
        suffix = "" if seen[desc.diff_id] == 1 else f"-{seen[desc.diff_id]}"
        dest = root / "layers" / f"oci-{digest_hex(desc.diff_id)}{suffix}"
        if not dest.exists():
            with flock(dest.with_name(f".{dest.name}.lock")):
                if not dest.exists():
                    progress(f"[pull] unpacking layer {desc.diff_id[:19]} ({desc.size / 1e6:.1f} MB)")
                    unpack_layer(layout.blob_path(desc.digest), dest, diff_id=desc.diff_id)
        layers.append(dest)
    return layers
