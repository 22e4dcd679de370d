"""Image specs: ``Image.to_spec()`` checked and brought to the current format, and each step described.

The format is :mod:`warmboot.sdk.image`'s (``format`` 2; format 1, a virtualenv of one Python, is read too).
:func:`normalize_spec` refuses what a build could not do (unknown ops or fields, missing local paths, Python
versions this machine cannot build) before anything runs; :func:`describe` is a step's progress header.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from warmboot.errors import InvalidOptionError
from warmboot.sdk.image import SPEC_FORMAT, STEP_FIELDS
from warmboot.worker.images import debian

_COMMON_FIELDS = ("op", "force_build", "env", "secrets")


def normalize_spec(spec: Any) -> dict[str, Any]:
    """``spec`` checked (raising :class:`InvalidOptionError` naming what is wrong), in the current format."""
    if not isinstance(spec, dict):
        raise InvalidOptionError(f"an image spec must be a dict (Image.to_spec()), got {spec!r}")
    if "format" not in spec and "python_version" in spec:  # format 1: a virtualenv of that Python
        spec = {"format": SPEC_FORMAT, "base": {"kind": "debian_slim", "python_version": spec["python_version"]},
                "steps": spec.get("steps", [])}  # fmt: skip
    if spec.get("format") != SPEC_FORMAT:
        raise InvalidOptionError(f"unsupported image spec format {spec.get('format')!r} (this server reads 2)")
    base = spec.get("base")
    if not isinstance(base, dict) or base.get("kind") not in ("debian_slim", "registry"):
        raise InvalidOptionError(f"image spec: base must be debian_slim or registry, got {base!r}")
    if base["kind"] == "debian_slim":
        debian.suite_for(str(base.get("python_version")))  # refuses versions this machine cannot build
    elif not isinstance(base.get("ref"), str) or not base["ref"]:
        raise InvalidOptionError(f"image spec: registry base needs a ref, got {base!r}")
    steps = spec.get("steps")
    if not isinstance(steps, list):
        raise InvalidOptionError("image spec: steps must be a list")
    for step in steps:
        op = step.get("op") if isinstance(step, dict) else None
        if op not in STEP_FIELDS:
            raise InvalidOptionError(f"unknown image step {step!r} (known: {', '.join(STEP_FIELDS)})")
        unknown = set(step) - set(STEP_FIELDS[op]) - set(_COMMON_FIELDS)
        if unknown:
            raise InvalidOptionError(f"image step {op}: unknown fields {sorted(unknown)}")
        _check_step(step)
    return spec


def _check_step(step: dict[str, Any]) -> None:
    op = step["op"]

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise InvalidOptionError(f"image step {op}: {what} (got {step!r})")

    def strings(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    if op in ("apt_install", "pip_install"):
        need(strings(step.get("packages")), "packages must be a list of strings")
    elif op == "uv_pip_install":
        need(strings(step.get("packages")) and strings(step.get("requirements", [])), "packages must be strings")
    elif op == "run_commands":
        need(strings(step.get("commands")), "commands must be a list of strings")
    elif op == "env":
        need(isinstance(step.get("vars"), dict) and all(isinstance(v, str) for v in step["vars"].values()), "vars")
    elif op == "workdir":
        need(isinstance(step.get("path"), str) and step["path"].startswith("/"), "path must be absolute")
    elif op == "run_function":
        need(isinstance(step.get("pickle"), str), "pickle missing")
    elif op == "pip_install_from_requirements":
        need(isinstance(step.get("path"), str), "path missing")
        need(Path(step["path"]).is_file(), f"requirements file {step.get('path')} does not exist")
    elif op in ("add_local_file", "add_local_dir"):
        need(isinstance(step.get("local"), str) and str(step.get("remote", "")).startswith("/"), "local/remote")
        need(os.path.normpath(step["remote"]) != "/", "remote cannot be /")
        local = Path(step["local"])
        if not local.exists():
            raise InvalidOptionError(f"{op}: local path {local} does not exist")
        if op == "add_local_dir" and not local.is_dir():
            raise InvalidOptionError(f"{op}: {local} is not a directory")
        if op == "add_local_file" and not local.is_file():
            raise InvalidOptionError(f"{op}: {local} is not a file")
    elif op == "add_local_python_source":
        modules = step.get("modules")
        need(isinstance(modules, dict), "modules must map names to paths (Image.to_spec())")
        for name, path in modules.items():
            need(all(part.isidentifier() for part in name.split(".")), f"{name!r} is not a module name")
            if not Path(path).exists():
                raise InvalidOptionError(f"add_local_python_source({name!r}): {path} does not exist")


def describe(step: dict[str, Any]) -> str:
    """A step as a progress header: what it runs."""
    op = step["op"]
    if op == "apt_install":
        return "apt-get install " + " ".join(step["packages"])
    if op == "pip_install":
        return "pip install " + " ".join(step["packages"])
    if op == "uv_pip_install":
        return "uv pip install " + " ".join([*step["packages"], *(f"-r {r}" for r in step.get("requirements", []))])
    if op == "pip_install_from_requirements":
        return f"pip install -r {step['path']}"
    if op == "run_commands":
        return "run_commands " + " && ".join(step["commands"])
    if op == "run_function":
        return f"run_function {step.get('name', '?')}"
    if op == "env":
        return "env " + " ".join(sorted(step["vars"]))
    if op == "workdir":
        return f"workdir {step['path']}"
    copy = " (copy)" if step.get("copy") else ""
    if op == "add_local_python_source":
        return f"add_local_python_source {' '.join(sorted(step['modules']))}{copy}"
    return f"{op} {step['local']} -> {step['remote']}{copy}"
