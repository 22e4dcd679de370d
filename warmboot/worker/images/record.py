"""Recording a built image in the OCI image layout ``<root>/oci``, named ``warmboot/<digest>``."""

from __future__ import annotations

import os
import secrets as tokens
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from warmboot.worker.images import debian, oci
from warmboot.worker.images.commands import Progress
from warmboot.worker.images.fsutil import flock

if TYPE_CHECKING:
    from warmboot.worker.images.build import BuiltImage


def record_image(root: Path, image: BuiltImage, descriptors: Mapping[Path, oci.LayerDescriptor], say: Progress) -> None:
    """Record ``image`` in the OCI image layout ``root/oci`` (named ``warmboot/<digest>``).

    Base layers live in the host-wide cache, shared by every home: their blobs are written once into a
    host-wide layout and hard-linked (or copied, across filesystems) into this one. ``descriptors`` holds the
    blobs of layers already in the layout (those of a pulled base); every other layer is tarred into it.
    """
    layout = oci.Layout(root / "oci")
    layout.ensure()
    shared_root = debian.cache_dir()
    recorded = []
    for layer in image.layers:
        desc = descriptors.get(layer)
        if desc is None and layer.is_relative_to(shared_root):
            shared = oci.Layout(shared_root / "oci")
            shared.ensure()
            with flock(shared_root / "oci.lock"):
                desc = shared.write_layer(layer)
            if not layout.has_blob(desc.digest):
                say(f"recording base layer {desc.digest[:19]} in {layout.path}")
                _link_or_copy(shared.blob_path(desc.digest), layout.blob_path(desc.digest))
        elif desc is None:
            desc = layout.write_layer(layer)
        recorded.append(desc)
    config = oci.ImageConfig(env=dict(image.env), workdir=image.workdir)
    layout.write_image(recorded, config, f"warmboot/{image.digest}")


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{tokens.token_hex(4)}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
