"""A container's root filesystem: an overlayfs of its image's layers plus a writable layer of its own.

Each container has a run directory on the host (``<home>/containers/<id>/``)::

    upper/   its writable layer (what it changes); a snapshot keeps a copy, and each restored copy starts
             from that copy
    work/    overlayfs' work directory
    root/    where the overlay is mounted: inside the container's mount namespace for a cold start, and on
             the host for the few milliseconds of a restore (CRIU takes it as ``--root``)

The directory is removed when the container ends. Lower layers are shared and never written.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from warmboot.errors import ContainerError
from warmboot.worker.images.layers import lookup_path

UPPER, WORK, ROOT = "upper", "work", "root"

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def overlay_options(layers: Sequence[Path], run_dir: Path) -> str:
    """The overlayfs mount options for these lower layers (bottom first) and this run directory."""
    if not layers:
        raise ContainerError("a container needs at least one image layer")
    paths = [str(p) for p in reversed(layers)]  # overlayfs lists the top layer first
    for path in [*paths, str(run_dir)]:
        if any(c in path for c in ",:\\"):
            raise ContainerError(f"layer path {path!r} contains ',' ':' or '\\', which overlayfs options cannot hold")
    return f"lowerdir={':'.join(paths)},upperdir={run_dir / UPPER},workdir={run_dir / WORK}"


def prepare(run_dir: Path, mount_points: Sequence[str] = (), layers: Sequence[Path] = ()) -> None:
    """Create the run directory, with the bind mounts' mount points already in the writable layer.

    Where the image lacks a mount point, it is made in the writable layer together with its ancestors, which
    keep the image's mode and owner as overlayfs' own copy-up would (a volume at /root/.cache/x must not make
    /root world-readable). Paths are looked up in the layer stack itself, never through the host's files.
    """
    shutil.rmtree(run_dir, ignore_errors=True)
    for name in (UPPER, WORK, ROOT):
        (run_dir / name).mkdir(parents=True, mode=0o700 if name != UPPER else 0o755)
    upper = run_dir / UPPER
    for target in mount_points:
        found = lookup_path(layers, target)
        if found is not None and found.is_dir():
            continue  # the image has it: overlayfs shows it, and the mount lands on it
        parts = Path(target.lstrip("/")).parts
        for depth in range(1, len(parts) + 1):
            rel = Path(*parts[:depth])
            here = upper / rel
            if here.is_dir():
                continue
            here.mkdir()
            original = lookup_path(layers, "/" + rel.as_posix())
            if original is not None and original.is_dir():
                st = original.stat()
                os.chmod(here, st.st_mode & 0o7777)
                os.chown(here, st.st_uid, st.st_gid)


def remove(run_dir: Path) -> None:
    """Remove a container's run directory (its overlay is gone with its mount namespace)."""
    with contextlib.suppress(OSError):
        detach(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)


def mount_root(layers: Sequence[Path], run_dir: Path) -> Path:
    """Mount the container's overlay at ``run_dir/root`` on the host (for CRIU's ``--root``) and return it.

    Done with mount(2) in this process rather than a mount(8) child: restores are the hot path.
    """
    target = run_dir / ROOT
    options = overlay_options(layers, run_dir).encode()
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, options) != 0:
        err = ctypes.get_errno()
        raise ContainerError(f"cannot mount the container's overlay root at {target}: {os.strerror(err)}")
    return target


def detach(run_dir: Path) -> None:
    """Lazily unmount ``run_dir/root`` on the host; the restored container keeps its own copy of the mount."""
    if _libc.umount2(str(run_dir / ROOT).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(run_dir / ROOT))


def save_upper(run_dir: Path, dest: Path) -> None:
    """Copy a container's writable layer (overlay whiteouts, xattrs and owners included) to ``dest``."""
    _copy_tree(run_dir / UPPER, dest)


def seed_upper(source: Path, run_dir: Path) -> None:
    """Start a restored copy's writable layer from a snapshot's saved one."""
    upper = run_dir / UPPER
    if source.is_dir() and any(source.iterdir()):
        shutil.rmtree(upper)
        _copy_tree(source, upper)


def _copy_tree(source: Path, dest: Path) -> None:
    # cp -a rather than shutil.copytree: overlayfs whiteouts are device nodes and opaque directories are
    # trusted.* xattrs, which cp preserves and copytree does not.
    proc = subprocess.run(["cp", "-a", str(source), str(dest)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ContainerError(f"cannot copy the writable layer {source} to {dest}: {proc.stderr.strip()}")


def remove_stale(containers_dir: Path, alive: set[str]) -> None:
    """Unmount and delete run directories whose container is gone (a worker that died mid-restore)."""
    if not containers_dir.is_dir():
        return
    for entry in containers_dir.iterdir():
        if entry.name not in alive:
            remove(entry)
