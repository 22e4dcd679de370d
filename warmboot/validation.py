"""Rules for what users name and configure, checked at decoration (in the SDK) and again at deploy (in the server).

Each check raises :class:`InvalidOptionError` naming the option, the value and what would be accepted, so a bad
input never reaches a container or half-deploys an app. Stdlib only: containers import the SDK.
"""

from __future__ import annotations

import math
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from warmboot.errors import InvalidOptionError

#: Modal's limits: a function's timeout lies between 1 second and 24 hours.
MIN_TIMEOUT_S, MAX_TIMEOUT_S = 1.0, 24 * 3600.0
MAX_NAME = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Where a volume may not be mounted, nor below: the image's system directories and warmboot's own.
SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
               "/usr", "/__warmboot")  # fmt: skip
#: Where a volume may not be mounted itself (below is fine: /root/.cache/huggingface is a common place):
#: /root holds the app's code, /tmp is the container's own tmpfs.
WHOLE_DIRS = ("/root", "/tmp", "/var", "/run", "/home")


def name(kind: str, value: Any) -> str:
    """An app, secret or volume name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit."""
    if not isinstance(value, str) or not value:
        raise InvalidOptionError(f"{kind} name must be a non-empty string, got {value!r}")
    if len(value) > MAX_NAME:
        raise InvalidOptionError(f"{kind} name {value[:20]!r}... has {len(value)} characters; at most {MAX_NAME}")
    if not _NAME.match(value):
        raise InvalidOptionError(
            f"{kind} name {value!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def timeout(option: str, value: Any, *, low: float = MIN_TIMEOUT_S, high: float = MAX_TIMEOUT_S) -> float:
    """A finite number of seconds within ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidOptionError(f"{option}= must be a finite number of seconds, got {value!r}")
    if not low <= value <= high:
        raise InvalidOptionError(f"{option}={value!r} is out of range: use {low:g} to {high:g} seconds")
    return float(value)


def environment(option: str, values: Any) -> dict[str, str]:
    """Environment variables: names as a shell accepts them, string values without NUL."""
    if not isinstance(values, Mapping):
        raise InvalidOptionError(f"{option} must be a dict of names to strings, got {type(values).__name__}")
    for key, value in values.items():
        if not isinstance(key, str) or not _ENV_KEY.match(key):
            raise InvalidOptionError(
                f"{option}: {key!r} is not a valid variable name (letters, digits and '_', not starting with a digit)"
            )
        if not isinstance(value, str):
            raise InvalidOptionError(f"{option}: the value of {key} must be a string, got {type(value).__name__}")
        if "\0" in value:
            raise InvalidOptionError(f"{option}: the value of {key} contains a NUL character, which no process can see")
    return dict(values)


def mount_point(option: str, path: Any) -> str:
    """An absolute, normalised path that is not ``/`` nor over the image's system directories."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidOptionError(f"{option}: mount point {path!r} must be an absolute path")
    normal = posixpath.normpath(path)
    if normal != path.rstrip("/") or normal == "/" or ".." in normal.split("/"):
        raise InvalidOptionError(f"{option}: mount point {path!r} must be a normalised path other than '/'")
    hidden = [d for d in SYSTEM_DIRS if normal == d or normal.startswith(d + "/")] or [
        d for d in WHOLE_DIRS if normal == d
    ]
    if hidden:
        raise InvalidOptionError(
            f"{option}: mount point {path!r} would hide the image's {hidden[0]}; mount it elsewhere, "
            "e.g. /data, /models or a directory under /root"
        )
    return normal
