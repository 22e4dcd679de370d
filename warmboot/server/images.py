"""What a deploy pins for its containers: the built image plus its local files, and the app's code layer."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmboot.worker import images


@dataclass(frozen=True)
class ResolvedImage:
    """A function's image at deploy: its layers, and its ``add_local_*`` files copied into layers of their own."""

    image: images.BuiltImage
    local_layers: tuple[Path, ...]  #: bottom first; above the image's layers

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image.to_json(), "local_layers": [str(p) for p in self.local_layers]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResolvedImage:
        return cls(images.BuiltImage.from_json(data["image"]), tuple(Path(p) for p in data["local_layers"]))


def resolve_image(
    spec: dict[str, Any],
    home: Path,
    *,
    progress: Callable[[str], None],
    secrets: Callable[[Sequence[Mapping[str, Any]]], dict[str, str]] | None = None,
) -> ResolvedImage:
    """Build (or find) the image ``spec`` describes and copy its local files: once per deploy.

    ``secrets`` turns a build step's ``secrets=`` (``Secret.to_spec()`` dicts) into its environment.
    """
    root = home / "images"
    image = images.build_image(spec, root=root, progress=progress, secrets=secrets)
    return ResolvedImage(image, images.materialize_local_mounts(image, root))


def code_layer(root: Path, filename: str, source: bytes, app_dir: str) -> Path:
    """A content-addressed layer holding the app file at ``app_dir`` (made once; concurrent deploys agree)."""
    layer = root / hashlib.sha256(source + filename.encode()).hexdigest()[:16]
    if layer.is_dir():
        return layer
    tmp = layer.with_name(f"{layer.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    target = tmp / app_dir.lstrip("/")
    target.mkdir(parents=True)
    (target / filename).write_bytes(source)
    os.chmod(target, 0o700)  # /root is root's own, as in the image
    with contextlib.suppress(OSError):  # another deploy of the same code made it first
        os.rename(tmp, layer)
    shutil.rmtree(tmp, ignore_errors=True)
    return layer
