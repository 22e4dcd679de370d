"""The build sandbox: one command run as root inside an image being built, its writes captured as a new layer.

``unshare --mount`` gives the command a private mount namespace, where an overlayfs of the parent layers
(read-only) and the new layer's directory (the upperdir) is mounted; bubblewrap then makes that the root,
with its own ``/proc``, a minimal ``/dev``, a private ``/tmp`` and PID/IPC/UTS namespaces, and the host's
network (as ``docker build`` has). The mount disappears with the namespace, whatever happens to the command.

The upperdir is then a valid overlayfs lower layer as it is: overlayfs writes deletions as whiteouts (0/0
character devices) and replaced directories as opaque ones (``trusted.overlay.opaque``). Redirects, metacopy
and the inode index are switched off so no layer depends on another's inode numbers or data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from warmboot.worker.images.commands import run_streaming
from warmboot.worker.images.layers import lookup_path

#: overlayfs options that keep each upperdir self-contained (see the module docstring). Containers mounting
#: the layers should use the same ones.
OVERLAY_OPTIONS = "redirect_dir=off,index=off,metacopy=off,xino=off"


@dataclass(frozen=True)
class Bind:
    """A host path bound read-only into the sandbox."""

    source: str
    target: str


@dataclass(frozen=True)
class Result:
    """How a sandboxed command ended."""

    status: int
    tail: tuple[str, ...]  #: its last output lines


def run(
    argv: Sequence[str],
    *,
    lowers: Sequence[Path],
    upper: Path,
    work: Path,
    merged: Path,
    env: Mapping[str, str],
    cwd: str,
    binds: Sequence[Bind] = (),
    on_line: Callable[[str], None] = lambda line: None,
) -> Result:
    """Run ``argv`` in the overlay of ``lowers`` (bottom first) and ``upper``; stream its output to ``on_line``.

    ``binds`` whose targets are under ``/tmp`` land in the sandbox's tmpfs; others that the image lacks get mount
    points created in ``upper``, which are removed again afterwards so the layer holds only the command's work.
    """
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    resolv = os.path.realpath("/etc/resolv.conf")
    all_binds = list(binds)
    if os.path.exists(resolv):
        all_binds.insert(0, Bind(resolv, "/etc/resolv.conf"))
    stubs = _missing_mount_points(lowers, upper, [b.target for b in all_binds], cwd)
    # lowerdir lists the top layer first
    options = f"lowerdir={':'.join(str(p) for p in reversed(lowers))},upperdir={upper},workdir={work},{OVERLAY_OPTIONS}"
    bwrap = [
        "bwrap",
        "--bind", str(merged), "/",
        "--proc", "/proc",
        "--dev", "/dev",
        "--perms", "1777", "--tmpfs", "/tmp",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts",
        "--die-with-parent",
        "--clearenv",
    ]  # fmt: skip
    for bind in all_binds:
        flag = "--ro-bind" if os.path.isdir(bind.source) or os.path.isfile(bind.source) else "--ro-bind-try"
        bwrap += [flag, bind.source, bind.target]
    for name, value in env.items():
        bwrap += ["--setenv", name, value]
    # bwrap's --chdir needs the directory: create it (as Docker's WORKDIR does) from inside the sandbox
    script = 'mkdir -p "$0" && cd "$0" && exec "$@"'
    bwrap += ["--", "/bin/sh", "-c", script, cwd, *argv]
    launcher = 'mount -t overlay overlay -o "$1" "$2" && shift 2 && exec "$@"'
    full = ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", launcher, "sh", options]
    full += [str(merged), *bwrap]

    try:
        status, tail = run_streaming(full, on_line)  # interrupted, it kills the step (the mount goes with it)
    finally:
        _remove_stubs(upper, stubs)
    return Result(status=status, tail=tuple(tail))


def _exists_in(layers: Sequence[Path], rel: str) -> bool:
    """Whether ``rel`` exists in the overlay of ``layers`` (bottom first): symlinks resolved inside the stack,
    never through the host's own files, and whiteouts and opaque directories honoured."""
    return lookup_path(layers, "/" + rel.strip("/")) is not None


def _missing_mount_points(lowers: Sequence[Path], upper: Path, targets: list[str], cwd: str) -> list[str]:
    """The paths bwrap will have to create in the image (mount points, their parents), deepest last."""
    stack = [*lowers, upper]
    missing: list[str] = []
    for target in targets:
        if target == "/tmp" or target.startswith("/tmp/"):
            continue  # lands in the sandbox's tmpfs
        parts = target.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            rel = "/".join(parts[:i])
            if rel not in missing and not _exists_in(stack, rel):
                missing.append(rel)
    del cwd  # the working directory is created on purpose and kept
    return missing


def _remove_stubs(upper: Path, stubs: list[str]) -> None:
    """Remove the mount points bwrap created in ``upper``: empty files and directories only, deepest first."""
    for rel in sorted(stubs, key=lambda r: r.count("/"), reverse=True):
        path = upper / rel
        with contextlib.suppress(OSError):
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                path.rmdir()  # fails (and stays) if the command put something in it
            elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                path.unlink()


def clean_layer(upper: Path) -> None:
    """Drop what a step leaves that no image needs: apt's package lists and caches, pip's and uv's caches.

    Only regular files the step wrote are removed (never whiteouts, which would bring back lower files).
    """
    for rel in ("var/lib/apt/lists", "var/cache/apt"):
        for current, _dirs, files in os.walk(upper / rel):
            for name in files:
                path = Path(current) / name
                if name != "lock" and stat.S_ISREG(path.lstat().st_mode):
                    path.unlink()
    cache = upper / "root" / ".cache"
    if cache.is_dir() and not cache.is_symlink():
        shutil.rmtree(cache, ignore_errors=True)
