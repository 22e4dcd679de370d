"""The read-only library every function container imports warmboot's runtime (and cloudpickle) from.

Containers run the *image's* interpreter, which has neither warmboot nor cloudpickle installed: a
content-addressed copy of both is made once under ``$WARMBOOT_HOME/runtime`` and put on the container's
PYTHONPATH, so images stay exactly what the user asked for.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import threading
from pathlib import Path

import cloudpickle

import warmboot


def _tree_digest(roots: list[Path]) -> str:
    digest = hashlib.sha256()
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_ensure_lock = threading.Lock()  # pools boot containers on many threads; they share one temporary name


@functools.cache
def ensure(home: Path) -> Path:
    """The directory to put on a container's PYTHONPATH (created on first use)."""
    with _ensure_lock:
        return _ensure(home)


def _sources() -> list[Path]:
    return [Path(warmboot.__file__).parent, Path(cloudpickle.__file__).parent]


def code_digest() -> str:
    """The digest of the warmboot (and cloudpickle) code on disk now: a running server compares its own."""
    return _tree_digest(_sources())


def _ensure(home: Path) -> Path:
    sources = _sources()
    target = home / "runtime" / _tree_digest(sources)
    if target.is_dir():
        return target
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for src in sources:
        shutil.copytree(src, tmp / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        os.rename(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target
