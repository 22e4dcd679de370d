"""Local files in images: where ``add_local_*`` steps put which path, and those paths hashed and copied.

A step's cache key holds the content hash of every local file it copies (:func:`hash_source`), so editing one
rebuilds that step; :func:`copy_source` copies the same selection, less the ``ignore`` patterns.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmboot.errors import InvalidOptionError

#: Where ``add_local_python_source`` puts modules (as Modal does); it goes on the image's PYTHONPATH.
PYTHON_SOURCE_ROOT = "/root"


@dataclass(frozen=True)
class LocalMount:
    """A local file or directory that containers see at ``remote`` (``copy=False``): copied at deploy, not built."""

    local: str  #: absolute host path
    remote: str  #: absolute path inside the container
    ignore: tuple[str, ...] = ()  #: glob patterns of paths (relative to ``local``) left out


def mounts_of(step: dict[str, Any]) -> list[LocalMount]:
    """Where an ``add_local_*`` step puts which local path."""
    op = step["op"]
    ignore = tuple(step.get("ignore", ()))
    if op == "add_local_python_source":
        mounts = []
        for name, path in step["modules"].items():
            rel = "/".join(name.split("."))
            remote = f"{PYTHON_SOURCE_ROOT}/{rel}" + (".py" if Path(path).is_file() else "")
            mounts.append(LocalMount(path, remote, ignore))
        return mounts
    return [LocalMount(step["local"], os.path.normpath(step["remote"]), ignore)]


def _ignored(rel: str, patterns: Sequence[str]) -> bool:
    """Whether ``rel`` (a POSIX path relative to the added directory) is left out: the last matching pattern
    decides, ``!pattern`` re-includes, and a pattern matching a directory covers what is under it."""
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if _matches(rel, pattern[1:] if negate else pattern):
            result = not negate
    return result


def _matches(rel: str, pattern: str) -> bool:
    pattern = pattern.strip("/")
    parts = rel.split("/")
    for end in range(1, len(parts) + 1):
        if fnmatch.fnmatchcase("/".join(parts[:end]), pattern):
            return True
        if pattern.startswith("**/") and any(
            fnmatch.fnmatchcase("/".join(parts[start:end]), pattern[3:]) for start in range(end)
        ):
            return True
    return False


def _walk(src: Path, ignore: Sequence[str]) -> Iterator[tuple[str, Path]]:
    """``(relative path, path)`` of what a copy of ``src`` takes, sorted, directories before their contents."""
    if not src.is_dir():
        yield "", src
        return
    for current, dirnames, filenames in os.walk(src):
        base = Path(current)
        rel_base = base.relative_to(src).as_posix()
        rel_base = "" if rel_base == "." else rel_base + "/"
        dirnames[:] = sorted(d for d in dirnames if not _ignored(rel_base + d, ignore))
        for name in sorted(dirnames + filenames):
            if name in filenames and _ignored(rel_base + name, ignore):
                continue
            yield rel_base + name, base / name


def hash_source(src: Path, ignore: Sequence[str], *, what: str) -> str:
    """The content hash of what a copy of ``src`` (file or directory, less ``ignore``) takes."""
    if not src.exists():
        raise InvalidOptionError(f"{what}: {src} does not exist")
    digest = hashlib.sha256()
    try:
        for rel, path in _walk(src, ignore):
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                digest.update(f"\0l {rel} {os.readlink(path)}\0".encode())
            elif stat.S_ISDIR(st.st_mode):
                digest.update(f"\0d {rel} {st.st_mode & 0o7777:o}\0".encode())
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        content.update(chunk)
                digest.update(f"\0f {rel} {st.st_mode & 0o7777:o} {content.hexdigest()}\0".encode())
    except OSError as exc:
        raise InvalidOptionError(f"{what}: cannot read {src}: {exc}") from exc
    return digest.hexdigest()


def copy_source(src: Path, dst: Path, ignore: Sequence[str]) -> None:
    """Copy ``src`` (file or directory, less ``ignore``) to ``dst``: modes kept, owned by root, symlinks as such."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        dst.mkdir(exist_ok=True)
        os.chmod(dst, src.stat().st_mode & 0o7777)
    for rel, path in _walk(src, ignore):
        target = dst / rel if rel else dst
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            target.symlink_to(os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            target.mkdir(exist_ok=True)
            os.chmod(target, st.st_mode & 0o7777)
        elif stat.S_ISREG(st.st_mode):
            shutil.copyfile(path, target)
            os.chmod(target, st.st_mode & 0o7777)
