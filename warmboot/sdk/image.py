"""``Image``: a container's root filesystem, described as a base plus a list of build steps (Modal's API).

The steps are plain data until :meth:`Image.to_spec` turns them into the JSON the server builds: local paths
resolved to absolute ones, ``pip_install_from_pyproject`` read into a package list, ``run_function``'s function
pickled by value. The server builds each step into one cached layer (``warmboot.worker.images``).

Imported inside containers too (app files build their images at import time), so module level stays stdlib
only and nothing here touches the disk until :meth:`Image.to_spec`, which only the deploying client calls.

Spec format (``format`` 2)::

    {"format": 2,
     "base": {"kind": "debian_slim", "python_version": "3.11"}
           | {"kind": "registry", "ref": "host:port/name:tag", "add_python": "3.11" | null, "force_build": false},
     "steps": [{"op": "apt_install", "packages": [...]}, ...]}

Every step has ``op`` and may have ``force_build`` (bool), ``env`` (dict, build-time only) and ``secrets``
(``Secret.to_spec()`` dicts, build-time only). The ops and their fields are listed in :data:`STEP_FIELDS`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from warmboot.errors import InvalidOptionError

IN_CONTAINER_ENV = "WARMBOOT_IN_CONTAINER"
SPEC_FORMAT = 2

#: Python versions ``Image.debian_slim`` can provide, and the Debian suite whose ``python3`` is that version.
DEBIAN_PYTHON_SUITES: dict[str, str] = {"3.11": "bookworm", "3.13": "trixie"}

#: The fields each step op takes besides the common ``op``, ``force_build``, ``env`` and ``secrets``.
STEP_FIELDS: dict[str, tuple[str, ...]] = {
    "apt_install": ("packages",),
    "pip_install": ("packages", "find_links", "index_url", "extra_index_url", "pre", "extra_options"),
    "uv_pip_install": (
        "packages",
        "requirements",
        "find_links",
        "index_url",
        "extra_index_url",
        "pre",
        "extra_options",
    ),
    "pip_install_from_requirements": ("path", "find_links", "index_url", "extra_index_url", "pre", "extra_options"),
    "run_commands": ("commands",),
    "run_function": ("name", "pickle", "python", "args_pickle"),
    "env": ("vars",),
    "workdir": ("path",),
    "add_local_file": ("local", "remote", "copy"),
    "add_local_dir": ("local", "remote", "copy", "ignore"),
    "add_local_python_source": ("modules", "copy", "ignore"),
}

#: ``add_local_python_source``'s default ``ignore``: everything but Python sources (as Modal's NON_PYTHON_FILES).
NON_PYTHON_FILES = ("**/*.pyc", "**/__pycache__")


def python_versions() -> list[str]:
    """The Python versions ``Image.debian_slim`` can build on this machine, oldest first.

    A version counts when this machine trusts its Debian suite's archive key (``debian-archive-keyring``
    ships one per release), which mmdebstrap needs to verify the packages.
    """
    keyrings = Path("/usr/share/keyrings")
    found = []
    for version, suite in DEBIAN_PYTHON_SUITES.items():
        if any(keyrings.glob(f"debian-archive-{suite}-*.gpg")):
            found.append(version)
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def debian_suite(python_version: str, available: Sequence[str] | None = None) -> str:
    """The Debian suite whose ``python3`` is ``python_version``, refusing versions this machine cannot build.

    ``available`` is :func:`python_versions` (computed when not given); the error lists it.
    """
    if available is None:
        available = python_versions()
    if python_version not in available:
        raise InvalidOptionError(
            f"Image.debian_slim: Python {python_version} is not available here "
            f"(available: {', '.join(available) or 'none'})"
        )
    return DEBIAN_PYTHON_SUITES[python_version]


def _in_container() -> bool:
    return bool(os.environ.get(IN_CONTAINER_ENV))


class Image:
    """A container image: a base root filesystem plus layers (apt and pip installs, commands, local files).

    Example::

        image = warmboot.Image.debian_slim().apt_install("libgomp1").pip_install("numpy").env({"MODE": "fast"})
    """

    def __init__(self, base: dict[str, Any], steps: tuple[dict[str, Any], ...] = ()):
        self.base = base
        self.steps = steps

    # -- bases

    @classmethod
    def debian_slim(cls, python_version: str | None = None, force_build: bool = False) -> Image:
        """A minimal Debian root filesystem with that Python (default: this Python's version if available).

        Raises :class:`InvalidOptionError` listing the versions this machine can provide.
        """
        if python_version is not None and not isinstance(python_version, str):
            raise InvalidOptionError(f"python_version must be a string such as '3.11', got {python_version!r}")
        if _in_container():  # the app file is imported again inside containers, where no image is built
            version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
            return cls({"kind": "debian_slim", "python_version": version})
        available = python_versions()
        if python_version is None:
            mine = f"{sys.version_info.major}.{sys.version_info.minor}"
            if not available:
                raise InvalidOptionError("Image.debian_slim: this machine can build no Debian Python base")
            python_version = mine if mine in available else available[-1]
        debian_suite(python_version, available)
        base: dict[str, Any] = {"kind": "debian_slim", "python_version": python_version}
        if force_build:
            base["force_build"] = True
        return cls(base)

    @classmethod
    def from_registry(cls, tag: str, *, add_python: str | None = None, force_build: bool = False) -> Image:
        """An image pulled from an OCI registry (``host:port/name:tag``), optionally with a standalone Python."""
        if not isinstance(tag, str) or not tag:
            raise InvalidOptionError(f"from_registry: tag must be a non-empty string, got {tag!r}")
        if add_python is not None and not isinstance(add_python, str):
            raise InvalidOptionError(f"from_registry: add_python must be a version string, got {add_python!r}")
        return cls({"kind": "registry", "ref": tag, "add_python": add_python, "force_build": bool(force_build)})

    # -- steps

    def _with(self, op: str, fields: dict[str, Any], *, force_build: bool = False, **common: Any) -> Image:
        step: dict[str, Any] = {"op": op, **fields}
        if force_build:
            step["force_build"] = True
        env = common.get("env")
        if env:
            _check_env(env, f"{op}(env=...)")
            step["env"] = dict(env)
        secrets = common.get("secrets")
        if secrets:
            step["secrets"] = list(secrets)  # Secret objects until to_spec
        return Image(self.base, (*self.steps, step))

    def _with_list(
        self, op: str, key: str, items: Sequence[str | list[str]], *, pip: tuple[Any, ...] = (), **common: Any
    ) -> Image:
        """A step ``op`` listing ``items`` (flattened) as ``key``, plus the pip options ``pip`` (the arguments of
        :func:`_pip_opts`) when given; no step at all, ``self``, when ``items`` is empty."""
        flat = _flatten(items, op)
        if not flat:
            return self
        fields = {key: flat, **(_pip_opts(*pip) if pip else {})}
        return self._with(op, fields, **common)

    def apt_install(
        self,
        *packages: str | list[str],
        force_build: bool = False,
        env: dict[str, str] | None = None,
        secrets: Sequence[Any] = (),
    ) -> Image:
        """Install Debian packages with apt-get (the image's apt sources; the host's apt proxy settings)."""
        return self._with_list("apt_install", "packages", packages, force_build=force_build, env=env, secrets=secrets)

    def pip_install(
        self,
        *packages: str | list[str],
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: dict[str, str] | None = None,
        secrets: Sequence[Any] = (),
    ) -> Image:
        """Install Python packages with pip (the host's pip settings apply, then these)."""
        pip = (find_links, index_url, extra_index_url, pre, extra_options)
        return self._with_list(
            "pip_install", "packages", packages, pip=pip, force_build=force_build, env=env, secrets=secrets
        )

    def uv_pip_install(
        self,
        *packages: str | list[str],
        requirements: list[str | os.PathLike[str]] | None = None,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: dict[str, str] | None = None,
        secrets: Sequence[Any] = (),
    ) -> Image:
        """Install Python packages with uv (the host's pip settings are translated to uv's)."""
        flat = _flatten(packages, "uv_pip_install")
        reqs = [os.path.realpath(p) for p in requirements or []]
        if not flat and not reqs:
            return self
        fields = {
            "packages": flat,
            "requirements": reqs,
            **_pip_opts(find_links, index_url, extra_index_url, pre, extra_options),
        }
        return self._with("uv_pip_install", fields, force_build=force_build, env=env, secrets=secrets)

    def pip_install_from_requirements(
        self,
        requirements_txt: str | os.PathLike[str],
        find_links: str | None = None,
        *,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: dict[str, str] | None = None,
        secrets: Sequence[Any] = (),
    ) -> Image:
        """``pip install -r requirements_txt`` (the file's contents are part of the layer's cache key)."""
        fields = {
            "path": os.path.realpath(requirements_txt),
            **_pip_opts(find_links, index_url, extra_index_url, pre, extra_options),
        }
        return self._with("pip_install_from_requirements", fields, force_build=force_build, env=env, secrets=secrets)

    def pip_install_from_pyproject(
        self,
        pyproject_toml: str | os.PathLike[str],
        optional_dependencies: list[str] | None = None,
        *,
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
        env: dict[str, str] | None = None,
        secrets: Sequence[Any] = (),
    ) -> Image:
        """pip install ``[project] dependencies`` of a pyproject.toml, plus the named optional-dependency groups."""
        fields = {
            "pyproject": os.path.realpath(pyproject_toml),
            "optional_dependencies": list(optional_dependencies or []),
            **_pip_opts(find_links, index_url, extra_index_url, pre, extra_options),
        }
        return self._with("pip_install", fields, force_build=force_build, env=env, secrets=secrets)

    def run_commands(
        self,
        *commands: str | list[str],
        force_build: bool = False,
        env: dict[str, str] | None = None,
        secrets: Sequence[Any] = (),
    ) -> Image:
        """Run shell commands (``/bin/sh -c``) as root in the image, with network, one layer for all of them."""
        return self._with_list("run_commands", "commands", commands, force_build=force_build, env=env, secrets=secrets)

    def run_function(
        self,
        raw_f: Callable[..., Any],
        *,
        secrets: Sequence[Any] = (),
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        force_build: bool = False,
        env: dict[str, str] | None = None,
    ) -> Image:
        """Run a Python function inside the image at build time; what it writes becomes a layer.

        The function is pickled by value (its module too), so it needs no import of your app file in the image;
        the image's Python must be the same minor version as yours.
        """
        if not callable(raw_f):
            raise InvalidOptionError(f"run_function takes a function, got {raw_f!r}")
        fields = {"function": raw_f, "args": tuple(args), "kwargs": dict(kwargs or {})}
        return self._with("run_function", fields, force_build=force_build, env=env, secrets=secrets)

    def env(self, vars: dict[str, str]) -> Image:
        """Set environment variables in the image (for later build steps and for containers)."""
        _check_env(vars, "Image.env()")
        return self._with("env", {"vars": dict(vars)})

    def workdir(self, path: str | os.PathLike[str]) -> Image:
        """The working directory of later build steps and of containers (created if missing)."""
        path = str(path)
        if not path.startswith("/"):
            raise InvalidOptionError(f"workdir: the path must be absolute, got {path!r}")
        return self._with("workdir", {"path": os.path.normpath(path)})

    def add_local_file(self, local_path: str | os.PathLike[str], remote_path: str, *, copy: bool = False) -> Image:
        """Put a local file at ``remote_path`` (a trailing ``/`` means: into that directory, same name).

        By default it is mounted at container start (edit it and redeploy, no rebuild); ``copy=True`` bakes
        it into a layer, so later steps can use it.
        """
        remote = _remote(remote_path, "add_local_file")
        if remote.endswith("/"):
            remote += Path(local_path).name
        fields = {"local": os.path.realpath(local_path), "remote": os.path.normpath(remote), "copy": bool(copy)}
        return self._with("add_local_file", fields)

    def add_local_dir(
        self,
        local_path: str | os.PathLike[str],
        remote_path: str,
        *,
        copy: bool = False,
        ignore: Sequence[str] = (),
    ) -> Image:
        """Put a local directory's contents at ``remote_path``; ``ignore`` takes glob patterns (``**`` allowed)
        matched against paths relative to the directory (a pattern starting with ``!`` re-includes)."""
        remote = os.path.normpath(_remote(remote_path, "add_local_dir"))
        if remote == "/":
            raise InvalidOptionError("add_local_dir: remote_path cannot be /")
        patterns = _patterns(ignore, "add_local_dir")
        fields = {"local": os.path.realpath(local_path), "remote": remote, "copy": bool(copy), "ignore": patterns}
        return self._with("add_local_dir", fields)

    def add_local_python_source(
        self, *modules: str, copy: bool = False, ignore: Sequence[str] = NON_PYTHON_FILES
    ) -> Image:
        """Make local Python modules or packages (found on this machine's sys.path) importable in containers.

        They are placed under ``/root`` (which goes on PYTHONPATH), mounted at start unless ``copy=True``.
        """
        for name in modules:
            if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
                raise InvalidOptionError(f"add_local_python_source: {name!r} is not a module name")
        fields = {"modules": list(modules), "copy": bool(copy), "ignore": _patterns(ignore, "add_local_python_source")}
        return self._with("add_local_python_source", fields)

    @contextlib.contextmanager
    def imports(self) -> Iterator[None]:
        """Imports inside this block must succeed in the container; on the caller's machine they may fail."""
        try:
            yield
        except ImportError:
            if _in_container():
                raise

    # -- the build description

    def to_spec(self) -> dict[str, Any]:
        """The build description sent to the server (JSON): local files resolved, functions pickled."""
        return {"format": SPEC_FORMAT, "base": dict(self.base), "steps": [_resolve(step) for step in self.steps]}

    def __repr__(self) -> str:
        base = self.base.get("python_version") if self.base["kind"] == "debian_slim" else self.base.get("ref")
        return f"Image({self.base['kind']} {base}, steps={[s['op'] for s in self.steps]})"


# ----- helpers ---------------------------------------------------------------------------------------------


def _flatten(items: Sequence[str | list[str]], what: str) -> list[str]:
    flat: list[str] = []
    for item in items:
        for value in [item] if isinstance(item, str) else item:
            if not isinstance(value, str):
                raise InvalidOptionError(f"{what}: expected strings, got {value!r}")
            flat.append(value)
    return flat


def _pip_opts(
    find_links: str | None, index_url: str | None, extra_index_url: str | None, pre: bool, extra_options: str
) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for name, value in (("find_links", find_links), ("index_url", index_url), ("extra_index_url", extra_index_url)):
        if value is not None:
            if not isinstance(value, str):
                raise InvalidOptionError(f"{name} must be a string, got {value!r}")
            opts[name] = value
    if pre:
        opts["pre"] = True
    if extra_options:
        if not isinstance(extra_options, str):
            raise InvalidOptionError(f"extra_options must be a string, got {extra_options!r}")
        opts["extra_options"] = extra_options
    return opts


def _check_env(env: Any, what: str) -> None:
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise InvalidOptionError(f"{what} takes a dict of strings to strings")


def _remote(remote_path: Any, what: str) -> str:
    remote = str(remote_path)
    if not remote.startswith("/"):
        raise InvalidOptionError(f"{what}: remote_path must be absolute, got {remote!r}")
    return remote


def _patterns(ignore: Any, what: str) -> list[str]:
    if callable(ignore) or isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore):
        raise InvalidOptionError(f"{what}: ignore takes a list of glob patterns, got {ignore!r}")
    return list(ignore)


def _resolve(step: dict[str, Any]) -> dict[str, Any]:
    """One step as JSON: secrets as their specs, modules as paths, pyproject read, functions pickled."""
    out = dict(step)
    if "secrets" in out:
        out["secrets"] = [s.to_spec() if hasattr(s, "to_spec") else s for s in out["secrets"]]
    op = out["op"]
    if op == "add_local_python_source":
        out["modules"] = _module_paths(out["modules"])
    elif op == "pip_install" and "pyproject" in out:
        path = out.pop("pyproject")
        out["packages"] = _pyproject_dependencies(path, out.pop("optional_dependencies"))
    elif op == "run_function":
        out.update(_pickle_function(out.pop("function"), out.pop("args"), out.pop("kwargs")))
    return out


def _module_paths(modules: list[str]) -> dict[str, str]:
    """Where each local module lives: a package directory or a single ``.py`` file."""
    import importlib.util

    found = {}
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            raise InvalidOptionError(f"add_local_python_source: cannot find a local module named {name!r}")
        origin = Path(spec.origin)
        found[name] = str(origin.parent if origin.name == "__init__.py" else origin)
    return found


def _pyproject_dependencies(path: str, groups: list[str]) -> list[str]:
    import tomllib

    try:
        with open(path, "rb") as f:
            project = tomllib.load(f).get("project", {})
    except (OSError, ValueError) as exc:
        raise InvalidOptionError(f"pip_install_from_pyproject: cannot read {path}: {exc}") from exc
    deps = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for group in groups:
        if group not in optional:
            raise InvalidOptionError(f"pip_install_from_pyproject: {path} has no optional dependency group {group!r}")
        deps += optional[group]
    return deps


def _pickle_function(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The function (its module by value, unless it is warmboot's own or installed) and its arguments, pickled."""
    import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    registered = False
    if module is not None and module.__name__ != "__main__" and not module.__name__.startswith("warmboot"):
        origin = getattr(module, "__file__", None) or ""
        if "site-packages" not in origin and "dist-packages" not in origin:
            with contextlib.suppress(ValueError):  # already registered
                cloudpickle.register_pickle_by_value(module)
                registered = True
    try:
        payload = cloudpickle.dumps(fn)
        args_payload = cloudpickle.dumps((tuple(args), dict(kwargs)))
    except Exception as exc:
        raise InvalidOptionError(f"run_function: cannot pickle {fn!r}: {exc}") from exc
    finally:
        if registered:
            cloudpickle.unregister_pickle_by_value(module)
    return {
        "name": getattr(fn, "__qualname__", repr(fn)),
        "pickle": base64.b64encode(payload).decode(),
        "args_pickle": base64.b64encode(args_payload).decode(),
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
