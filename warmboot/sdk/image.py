"""``Image``: an isolated Python environment for containers, described as a list of build steps.

The steps are plain data; the server builds them into a virtualenv, content-addressed by the steps (and the
hashes of local files they copy), and caches the result.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from warmboot.errors import InvalidOptionError

IN_CONTAINER_ENV = "WARMBOOT_IN_CONTAINER"


class Image:
    """A container image: a Python version plus pip installs, env vars, commands and local files.

    Example::

        image = warmboot.Image.debian_slim().pip_install("numpy").env({"MODE": "fast"})
    """

    def __init__(self, python_version: str, steps: tuple[dict[str, Any], ...] = ()):
        self.python_version = python_version
        self.steps = steps

    @classmethod
    def debian_slim(cls, python_version: str | None = None) -> Image:
        """A fresh Python environment (a virtualenv of that Python; default: the Python running this code)."""
        if python_version is None:
            python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        if not isinstance(python_version, str) or not python_version.replace(".", "").isdigit():
            raise InvalidOptionError(f"python_version must look like '3.11', got {python_version!r}")
        return cls(python_version)

    def _with(self, step: dict[str, Any]) -> Image:
        return Image(self.python_version, (*self.steps, step))

    def pip_install(self, *packages: str | list[str]) -> Image:
        """Install packages with pip (pip's own settings, find-links included, apply)."""
        flat = [p for item in packages for p in ([item] if isinstance(item, str) else item)]
        return self._with({"op": "pip_install", "packages": flat}) if flat else self

    def env(self, variables: dict[str, str]) -> Image:
        """Set environment variables in containers of this image."""
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in variables.items()):
            raise InvalidOptionError("Image.env() takes a dict of strings to strings")
        return self._with({"op": "env", "vars": dict(variables)})

    def run_commands(self, *commands: str) -> Image:
        """Run shell commands at build time, with the image's virtualenv first on PATH."""
        return self._with({"op": "run_commands", "commands": list(commands)})

    def add_local_python_source(self, *modules: str) -> Image:
        """Make local Python modules or packages (found on this machine's sys.path) importable in containers."""
        return self._with({"op": "add_local_python_source", "modules": list(modules)})

    def add_local_dir(self, local_path: str | os.PathLike[str], remote_path: str) -> Image:
        """Copy a local directory into the image, visible in containers at ``remote_path``."""
        if not str(remote_path).startswith("/"):
            raise InvalidOptionError(f"add_local_dir: remote_path must be absolute, got {remote_path!r}")
        return self._with({"op": "add_local_dir", "local": os.path.realpath(local_path), "remote": remote_path})

    @contextlib.contextmanager
    def imports(self) -> Iterator[None]:
        """Imports inside this block must succeed in the container; on the caller's machine they may fail."""
        try:
            yield
        except ImportError:
            if os.environ.get(IN_CONTAINER_ENV):
                raise

    def to_spec(self) -> dict[str, Any]:
        """The build description sent to the server, with local files resolved to absolute paths."""
        steps = []
        for step in self.steps:
            if step["op"] == "add_local_python_source":
                steps.append({"op": "add_local_python_source", "paths": _module_paths(step["modules"])})
            else:
                steps.append(step)
        return {"python_version": self.python_version, "steps": steps}

    def __repr__(self) -> str:
        return f"Image(python={self.python_version}, steps={[s['op'] for s in self.steps]})"


def _module_paths(modules: list[str]) -> dict[str, str]:
    """Where each local module lives: a package directory or a single ``.py`` file."""
    import importlib.util
    from pathlib import Path

    found = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            raise InvalidOptionError(f"add_local_python_source: cannot find a local module named {name!r}")
        origin = Path(spec.origin)
        found[name] = str(origin.parent if origin.name == "__init__.py" else origin)
    return found
