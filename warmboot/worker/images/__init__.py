"""Images: root filesystems built from Debian packages (or pulled from a registry), stored as layers.

- :mod:`~warmboot.worker.images.build`: :func:`build_image` turns ``Image.to_spec()`` into a stack of cached
  layers (one per step), :func:`materialize_local_mounts` copies ``add_local_*`` files at deploy.
- :mod:`~warmboot.worker.images.debian`: ``debian_slim`` bases, bootstrapped by mmdebstrap, cached host-wide.
- :mod:`~warmboot.worker.images.sandbox`: the build sandbox (overlayfs + bubblewrap) that runs each step.
- :mod:`~warmboot.worker.images.hostcfg`: the host's pip/uv/apt settings, passed into builds.
- :mod:`~warmboot.worker.images.oci`: the OCI image layout, layer tars, registry pulls and ``add_python``.
"""

from __future__ import annotations

from warmboot.errors import ImageBuildError
from warmboot.sdk.image import python_versions
from warmboot.worker.images.build import (
    BuiltImage,
    LocalMount,
    build_image,
    image_digest,
    materialize_local_mounts,
)
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
