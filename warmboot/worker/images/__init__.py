"""Images: root filesystems built from Debian packages (or pulled from a registry), stored as layers.

- :mod:`~warmboot.worker.images.build`: :func:`build_image` turns ``Image.to_spec()`` into a stack of cached
  layers (one per step), :func:`materialize_local_mounts` copies ``add_local_*`` files at deploy.
- :mod:`~warmboot.worker.images.spec`: specs checked and normalized, steps described;
  :mod:`~warmboot.worker.images.local_files`: ``add_local_*`` paths hashed and copied;
  :mod:`~warmboot.worker.images.record`: each built image recorded in the OCI layout.
- :mod:`~warmboot.worker.images.debian`: ``debian_slim`` bases, bootstrapped by mmdebstrap, cached host-wide.
- :mod:`~warmboot.worker.images.sandbox`: the build sandbox (overlayfs + bubblewrap) that runs each step.
- :mod:`~warmboot.worker.images.hostcfg`: the host's pip/uv/apt settings, passed into builds.
- :mod:`~warmboot.worker.images.oci`: the OCI image layout (blobs, manifests, ``index.json``) images are recorded in.
- :mod:`~warmboot.worker.images.layers`: layer tars <-> overlayfs lower directories, and lookups into a stack of them.
- :mod:`~warmboot.worker.images.registry`: registry references, and pulls (skopeo) into the layout.
- :mod:`~warmboot.worker.images.python_layer`: ``add_python``, Debian's Python as a layer for registry images.
- :mod:`~warmboot.worker.images.fsutil`, :mod:`~warmboot.worker.images.commands`: the ``flock``, atomic writes
  and streamed host commands the modules above share.
"""

from __future__ import annotations

from warmboot.errors import ImageBuildError
from warmboot.sdk.image import python_versions
from warmboot.worker.images.build import (
    BuiltImage,
    build_image,
    image_digest,
    materialize_local_mounts,
)
from warmboot.worker.images.local_files import LocalMount
from warmboot.worker.images.sandbox import OVERLAY_OPTIONS

__all__ = [
    "OVERLAY_OPTIONS",
    "BuiltImage",
    "ImageBuildError",
    "LocalMount",
    "build_image",
    "image_digest",
    "materialize_local_mounts",
    "python_versions",
]
