"""Image builds: a spec (``Image.to_spec()``) turned into a stack of cached layers on a base root filesystem.

Under ``root`` (``$WARMBOOT_HOME/images``)::

    layers/<id>/         one layer: an overlayfs lower directory, never changed once renamed into place
    keys/<key>.json      which layer a step's cache key resolves to (written last: the layer is complete)
    locks/<key>.lock     ``flock`` serializing the builds of one key (threads and processes alike)
    local/<hash>/        ``add_local_*`` files copied at deploy (:func:`materialize_local_mounts`)
    images/<digest>.json every complete image (its :class:`BuiltImage`), recorded in the OCI layout ``oci/`` too
    tmp/                 work directories of builds in progress

A step's key is the sha256 of the layer it is built on (its ``id``), its canonical JSON and the contents of
every local file it copies in. ``env``/``workdir`` steps and ``copy=False`` local files add no layer but go into
the key of the steps after them. A cached key resolves to its layer without running anything; a changed step
gets a new key, and so does every step after it (their parent layer changed). ``force_build`` builds a step
into a fresh layer (a new id) even if its key is cached, and points the key at it: the steps after it get new
keys because their parent changed, and later builds without ``force_build`` reuse the new layers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import pickle
import secrets as tokens
import shlex
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.worker.images import debian, hostcfg, registry, sandbox
from warmboot.worker.images.fsutil import atomic_write, flock
from warmboot.worker.images.layers import DEFAULT_PATH, find_python
from warmboot.worker.images.local_files import PYTHON_SOURCE_ROOT, LocalMount, copy_source, hash_source, mounts_of
from warmboot.worker.images.python_layer import python_layer
from warmboot.worker.images.python_layer import python_versions as add_python_versions
from warmboot.worker.images.record import record_image
from warmboot.worker.images.spec import describe, normalize_spec

log = logging.getLogger("warmboot.images")

#: Bumped whenever the layer format or a step's procedure changes, so old layers are not reused.
LAYER_FORMAT = 1
#: Inside the build sandbox: a tmpfs, so nothing placed here ends up in a layer.
_SANDBOX_TMP = "/tmp/.warmboot"
#: Steps that add no layer.
_METADATA_OPS = ("env",)
_LOCAL_OPS = ("add_local_file", "add_local_dir", "add_local_python_source")

Progress = Callable[[str], None]
SecretResolver = Callable[[Sequence[Mapping[str, Any]]], dict[str, str]]


@dataclass(frozen=True)
class BuiltImage:
    """A complete image on this host.

    ``python`` is the interpreter inside the container: ``/usr/local/bin/python`` for ``debian_slim`` and for
    ``from_registry(..., add_python=...)`` images; for a registry image without ``add_python`` it is the first
    ``python3`` or ``python`` on the image's ``PATH`` (a build of an image without one fails, naming add_python).
    """

    digest: str  #: content address of the whole image: its layer chain and the metadata below
    layers: tuple[Path, ...]  #: unpacked layer directories, bottom first, each an overlayfs lower directory
    env: dict[str, str]  #: the image's environment (PATH always set)
    workdir: str  #: the working directory of containers
    python: str  #: the interpreter inside the container (see above)
    local_mounts: tuple[LocalMount, ...] = field(default=())  #: ``copy=False`` local files, not in ``layers``

    def to_json(self) -> dict[str, Any]:
        """The JSON form (``images/<digest>.json``, and what a deploy stores)."""
        return {
            "format": LAYER_FORMAT,
            "digest": self.digest,
            "layers": [str(p) for p in self.layers],
            "env": dict(self.env),
            "workdir": self.workdir,
            "python": self.python,
            "local_mounts": [
                {"local": m.local, "remote": m.remote, "ignore": list(m.ignore)} for m in self.local_mounts
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuiltImage:
        """Read back :meth:`to_json`'s output."""
        return cls(
            digest=data["digest"],
            layers=tuple(Path(p) for p in data["layers"]),
            env=dict(data["env"]),
            workdir=data["workdir"],
            python=data["python"],
            local_mounts=tuple(
                LocalMount(m["local"], m["remote"], tuple(m.get("ignore", ()))) for m in data["local_mounts"]
            ),
        )


# ----- public API ------------------------------------------------------------------------------------------


def build_image(
    spec: dict[str, Any],
    *,
    root: Path,
    progress: Progress = lambda line: None,
    secrets: SecretResolver | None = None,
) -> BuiltImage:
    """Build the image ``spec`` describes, or find its layers cached; returns the complete image.

    ``progress`` gets ``[3/7] pip install numpy`` headers and every output line of the steps that run; a fully
    cached image reports one line, ``Image <digest> cached``. ``secrets`` turns the ``secrets`` of a step
    (``Secret.to_spec()`` dicts) into environment variables; without it only inline (``from_dict``) secrets work.

    Raises :class:`InvalidOptionError` for a malformed spec or a missing local path, and :class:`ImageBuildError`
    naming the step, its command and the tail of its output when a step fails (nothing of it is cached).
    """
    spec = normalize_spec(spec)
    root = Path(root)
    for sub in ("layers", "keys", "locks", "tmp", "images"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return _Build(spec, root, _safe_progress(progress), secrets or _inline_secrets).run()


def image_digest(spec: dict[str, Any], *, root: Path) -> str | None:
    """The digest of ``spec``'s image if every layer of it is cached under ``root`` (building nothing)."""
    spec = normalize_spec(spec)
    return _Build(spec, Path(root), lambda line: None, _inline_secrets, dry_run=True).run_dry()


def materialize_local_mounts(image: BuiltImage, root: Path) -> tuple[Path, ...]:
    """Copy ``image``'s local mounts into one content-addressed layer (files at their remote paths).

    Called once at deploy: containers then start from the copy, so later edits of the local files need a
    redeploy and a start never reads or hashes them. Returns the layer directories, bottom first (none when
    the image has no local mounts).
    """
    if not image.local_mounts:
        return ()
    root = Path(root)
    digest = hashlib.sha256(f"warmboot-local-v{LAYER_FORMAT}\0".encode())
    for mount in image.local_mounts:
        digest.update(f"\0{mount.remote}\0".encode())
        digest.update(hash_source(Path(mount.local), mount.ignore, what=f"local mount {mount.local}").encode())
    target = root / "local" / digest.hexdigest()[:32]
    if (root / "local" / f"{target.name}.done").exists() and target.is_dir():
        return (target,)
    target.parent.mkdir(parents=True, exist_ok=True)
    with flock(target.parent / f"{target.name}.lock"):
        if not (root / "local" / f"{target.name}.done").exists():
            tmp = target.parent / f".tmp-{tokens.token_hex(8)}"
            try:
                for mount in image.local_mounts:
                    copy_source(Path(mount.local), tmp / mount.remote.lstrip("/"), mount.ignore)
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            (root / "local" / f"{target.name}.done").touch()
    return (target,)


# ----- the build -------------------------------------------------------------------------------------------


@dataclass
class _State:
    """What the steps so far have made: the layer stack and the image's metadata."""

    chain: str  #: the id of what the next step builds on (the last layer, or the key after a metadata step)
    layers: list[Path]
    env: dict[str, str]
    workdir: str
    python: str
    python_version: str | None  #: known for debian_slim and add_python images
    local_mounts: list[LocalMount] = field(default_factory=list)
    python_source: bool = False  #: whether /root must go on PYTHONPATH
    extra_descriptors: dict[Path, Any] = field(default_factory=dict)  #: OCI descriptors of pulled layers


class _Build:
    def __init__(
        self,
        spec: dict[str, Any],
        root: Path,
        say: Progress,
        resolve_secrets: SecretResolver,
        *,
        dry_run: bool = False,
    ):
        self.spec = spec
        self.root = root
        self.say = say
        self.resolve_secrets = resolve_secrets
        self.dry_run = dry_run
        self.total = len(spec["steps"]) + 1
        self.pending: list[str] = []  # headers of cached steps, shown only if something gets built
        self.building = False
        self.host: hostcfg.HostPackageConfig | None = None
        self.started = time.monotonic()

    # -- driver

    def run(self) -> BuiltImage:
        state = self.base()
        for number, step in enumerate(self.spec["steps"], start=2):
            state = self.step(number, step, state)
        return self.finish(state)

    def run_dry(self) -> str | None:
        try:
            image = self.run()
        except _NotCached:
            return None
        return image.digest

    def emit_header(self, line: str, *, cached: bool) -> None:
        if cached and not self.building:
            self.pending.append(line)
            return
        if not self.building:
            self.building = True
            for old in self.pending:
                self.say(old)
            self.pending.clear()
        self.say(line)

    # -- base

    def base(self) -> _State:
        base = self.spec["base"]
        force = bool(base.get("force_build"))
        if base["kind"] == "debian_slim":
            version = base["python_version"]
            key = debian.base_key(version)
            if self.dry_run:
                found = debian._load(debian.cache_dir() / "bases" / f"{key}.json")
                if found is None:
                    raise _NotCached
            else:
                cached = debian._load(debian.cache_dir() / "bases" / f"{key}.json") is not None and not force
                self.emit_header(f"[1/{self.total}] FROM debian_slim (Python {version})", cached=cached)
                found = debian.ensure_base(version, self.say, force=force)
            env = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"}
            return _State(found.id, [found.rootfs], env, "/root", "/usr/local/bin/python", version)
        # a registry image (through the OCI helper), possibly with Python added on top
        if self.dry_run:
            raise _NotCached  # a pull asks the registry: not a dry operation
        ref, add_python = base["ref"], base.get("add_python")
        self.emit_header(
            f"[1/{self.total}] FROM {ref}" + (f" + Python {add_python}" if add_python else ""), cached=False
        )
        pulled = registry.pull_base(ref, root=self.root, progress=self.say)
        chain = _sha("registry", pulled.digest, *(p.name for p in pulled.layers))
        layers = list(pulled.layers)
        env = dict(pulled.env)
        env.setdefault("PATH", DEFAULT_PATH)
        workdir = pulled.workdir if pulled.workdir not in ("", "/") else "/root"
        python, version = find_python(layers, env), None
        if python is None and not add_python:
            raise ImageBuildError(
                f"Image.from_registry({ref!r}) has no python3 or python on its PATH ({env['PATH']}): "
                "functions need one; pass add_python='3.11' (or another of "
                f"{', '.join(add_python_versions())}) to add Python to it"
            )
        if add_python:
            py_layer = python_layer(add_python, root=self.root, progress=self.say)
            layers.append(py_layer)
            chain = _sha(chain, "add_python", py_layer.name)
            python, version = "/usr/local/bin/python", add_python
            bin_dirs = env["PATH"].split(":")
            if "/usr/local/bin" not in bin_dirs:
                env["PATH"] = "/usr/local/bin:" + env["PATH"]
        if force:
            chain = _sha(chain, "force", tokens.token_hex(8))
        state = _State(chain, layers, env, workdir, python, version)
        state.extra_descriptors = dict(zip(pulled.layers, pulled.descriptors, strict=False))
        return state

    # -- steps

    def step(self, number: int, step: dict[str, Any], state: _State) -> _State:
        op = step["op"]
        header = f"[{number}/{self.total}] {describe(step)}"
        if state.local_mounts and op not in _LOCAL_OPS and op not in _METADATA_OPS:
            raise InvalidOptionError(
                f"image step {header}: build steps cannot follow add_local_* with copy=False (those files are "
                "mounted when a container starts, after the build); pass copy=True to the add_local_* calls"
            )
        key = self.key(step, state)
        if op == "env":
            self.emit_header(header, cached=True)
            return replace(state, chain=key, env={**state.env, **step["vars"]})
        if op in _LOCAL_OPS and not step.get("copy"):
            self.emit_header(header, cached=True)
            return replace(state, chain=key, local_mounts=[*state.local_mounts, *mounts_of(step)],
                           python_source=state.python_source or op == "add_local_python_source")  # fmt: skip
        if op == "workdir":
            path = step["path"]
            if sandbox._exists_in(state.layers, path):
                self.emit_header(header, cached=True)
                return replace(state, chain=key, workdir=path)
        force = bool(step.get("force_build"))
        layer = None if force else self.cached_layer(key)
        if layer is None:
            if self.dry_run:
                raise _NotCached
            with flock(self.root / "locks" / f"{key}.lock"):
                layer = None if force else self.cached_layer(key)  # built by another builder while we waited
                if layer is None:
                    self.emit_header(header, cached=False)
                    layer = self.build_layer(number, header, step, state, key, force=force)
                else:
                    self.emit_header(header + " (cached)", cached=True)
        else:
            self.emit_header(header + " (cached)", cached=True)
        new = replace(state, chain=layer.name, layers=[*state.layers, layer])
        if op == "workdir":
            new.workdir = step["path"]
        if op == "add_local_python_source":
            new.python_source = True
        return new

    def key(self, step: dict[str, Any], state: _State) -> str:
        """The cache key of ``step`` on ``state``: parent, canonical step, contents of the local files it copies."""
        canonical = {k: v for k, v in step.items() if k != "force_build"}
        parts = [f"layer-v{LAYER_FORMAT}", state.chain, _canonical(canonical)]
        op = step["op"]
        if op in _LOCAL_OPS and step.get("copy"):
            for mount in mounts_of(step):
                parts.append(hash_source(Path(mount.local), mount.ignore, what=f"{op} {mount.local}"))
        elif op == "pip_install_from_requirements":
            parts.append(hash_source(Path(step["path"]), (), what="requirements"))
        elif op == "uv_pip_install":
            parts += [hash_source(Path(r), (), what="requirements") for r in step.get("requirements", [])]
        return _sha(*parts)

    def cached_layer(self, key: str) -> Path | None:
        try:
            record = json.loads((self.root / "keys" / f"{key}.json").read_text())
            layer = self.root / "layers" / record["layer"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return layer if record.get("format") == LAYER_FORMAT and layer.is_dir() else None

    def build_layer(
        self, number: int, header: str, step: dict[str, Any], state: _State, key: str, *, force: bool
    ) -> Path:
        layer_id = key[:32] if not force else _sha(key, tokens.token_hex(16))[:32]
        work = self.root / "tmp" / tokens.token_hex(8)
        upper = self.root / "layers" / f".tmp-{work.name}"
        started = time.monotonic()
        try:
            upper.mkdir(mode=0o755)
            work.mkdir()
            self.run_step(number, header, step, state, upper, work)
            sandbox.clean_layer(upper)
            final = self.root / "layers" / layer_id
            shutil.rmtree(final, ignore_errors=True)  # a layer whose key record was lost: same content
            os.rename(upper, final)
        finally:
            shutil.rmtree(upper, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
        record = {
            "format": LAYER_FORMAT,
            "layer": layer_id,
            "parent": state.chain,
            "step": describe(step),
            "built_at": time.time(),
            "seconds": round(time.monotonic() - started, 2),
        }
        atomic_write(self.root / "keys" / f"{key}.json", json.dumps(record, indent=2) + "\n")
        return final

    def run_step(self, number: int, header: str, step: dict[str, Any], state: _State, upper: Path, work: Path) -> None:
        op = step["op"]
        if op == "workdir":
            (upper / step["path"].lstrip("/")).mkdir(parents=True, mode=0o755)
            return
        if op in _LOCAL_OPS:
            for mount in mounts_of(step):
                try:
                    copy_source(Path(mount.local), upper / mount.remote.lstrip("/"), mount.ignore)
                except OSError as exc:
                    self.fail(header, f"copy {mount.local} -> {mount.remote}", (str(exc),))
                self.say(f"copied {mount.local} -> {mount.remote}")
            return
        host = self.host_config()
        binds: list[sandbox.Bind] = [sandbox.Bind(p, p) for p in host.binds]
        env = {**host.pip_env()}
        env.update(state.env)
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(
            {
                "HOME": "/root",
                "DEBIAN_FRONTEND": "noninteractive",
                "PIP_ROOT_USER_ACTION": "ignore",
                "PIP_NO_INPUT": "1",
                "PIP_BREAK_SYSTEM_PACKAGES": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        files = work / "files"
        files.mkdir()
        if host.apt_conf:
            (files / "apt.conf").write_text(host.apt_conf)
            env["APT_CONFIG"] = f"{_SANDBOX_TMP}/files/apt.conf"
        binds.append(sandbox.Bind(str(files), f"{_SANDBOX_TMP}/files"))
        env.update(step.get("env") or {})
        if step.get("secrets"):
            env.update(self.resolve_secrets(step["secrets"]))
        python = state.python
        commands: list[tuple[str, list[str]]] = []  # (what, argv)

        if op == "apt_install":
            packages = shlex.join(step["packages"])
            script = f"apt-get update -q && apt-get install -y -q {packages}"
            commands.append((f"apt-get install {packages}", ["/bin/sh", "-c", script]))
        elif op in ("pip_install", "pip_install_from_requirements"):
            argv = [python, "-m", "pip", "install", *self.pip_options(step, binds)]
            if op == "pip_install":
                argv += step["packages"]
            else:
                argv += ["-r", self.bind_requirements(Path(step["path"]), 0, binds)]
            commands.append((shlex.join(argv), argv))
        elif op == "uv_pip_install":
            uv_dir = _ensure_uv(self.say)
            binds.append(sandbox.Bind(str(uv_dir), f"{_SANDBOX_TMP}/uv"))
            env.update(host.uv_env())
            env.update({"UV_CACHE_DIR": f"{_SANDBOX_TMP}/uv-cache", "UV_LINK_MODE": "copy", "UV_NO_PROGRESS": "1"})
            env.update(step.get("env") or {})
            argv = [f"{_SANDBOX_TMP}/uv/bin/uv", "pip", "install", "--system", "--break-system-packages"]
            argv += ["--python", python, *self.pip_options(step, binds, uv=True)]
            for n, req in enumerate(step.get("requirements", [])):
                argv += ["-r", self.bind_requirements(Path(req), n, binds)]
            argv += step["packages"]
            commands.append((shlex.join(argv), argv))
        elif op == "run_commands":
            commands += [(command, ["/bin/sh", "-c", command]) for command in step["commands"]]
        elif op == "run_function":
            if state.python_version and step.get("python") and step["python"] != state.python_version:
                self.fail(
                    header,
                    f"run_function {step.get('name')}",
                    (f"the function was pickled by Python {step['python']}, the image runs Python "
                     f"{state.python_version}: build it with Image.debian_slim({step['python']!r})",),
                )  # fmt: skip
            (files / "fn.pkl").write_bytes(base64.b64decode(step["pickle"]))
            (files / "args.pkl").write_bytes(base64.b64decode(step.get("args_pickle") or _EMPTY_ARGS))
            binds.append(sandbox.Bind(str(_build_lib(self.root)), f"{_SANDBOX_TMP}/lib"))
            env["WARMBOOT_IN_CONTAINER"] = "1"
            commands.append((f"run_function {step.get('name')}", [python, "-c", _RUN_FUNCTION]))

        for what, argv in commands:
            if op == "run_commands":
                self.say(f"$ {what}")
            result = sandbox.run(
                argv,
                lowers=state.layers,
                upper=upper,
                work=work / "ovl-work",
                merged=work / "merged",
                env=env,
                cwd=state.workdir,
                binds=binds,
                on_line=self.say,
            )
            if result.status != 0:
                self.fail(header, f"{what} (exit status {result.status})", result.tail)

    def pip_options(self, step: dict[str, Any], binds: list[sandbox.Bind], *, uv: bool = False) -> list[str]:
        options: list[str] = []
        for name in ("find_links", "index_url", "extra_index_url"):
            value = step.get(name)
            if value:
                options += ["--" + name.replace("_", "-"), value]
                binds += [sandbox.Bind(p, p) for p in hostcfg._local_paths(name.replace("_", "-"), value)]
        if step.get("pre"):
            options.append("--prerelease=allow" if uv else "--pre")
        if step.get("extra_options"):
            options += shlex.split(step["extra_options"])
        return options

    def bind_requirements(self, path: Path, n: int, binds: list[sandbox.Bind]) -> str:
        """Bind a requirements file's directory (relative ``-r``/``-c`` lines keep working); its path inside."""
        binds.append(sandbox.Bind(str(path.parent), f"{_SANDBOX_TMP}/req{n}"))
        return f"{_SANDBOX_TMP}/req{n}/{path.name}"

    def host_config(self) -> hostcfg.HostPackageConfig:
        if self.host is None:
            self.host = hostcfg.load()
        return self.host

    def fail(self, header: str, what: str, tail: Sequence[str]) -> NoReturn:
        message = f"Image build failed at step {header}\n  command: {what}"
        if tail:
            message += f"\nLast {len(tail)} line(s) of its output:\n" + "\n".join(f"  {line}" for line in tail)
        raise ImageBuildError(message)

    # -- the end

    def finish(self, state: _State) -> BuiltImage:
        env = dict(state.env)
        if state.python_source:
            paths = [p for p in env.get("PYTHONPATH", "").split(":") if p]
            if PYTHON_SOURCE_ROOT not in paths:
                env["PYTHONPATH"] = ":".join([PYTHON_SOURCE_ROOT, *paths])
        mounts = tuple(state.local_mounts)
        meta = {"env": env, "workdir": state.workdir, "python": state.python,
                "mounts": [[m.local, m.remote, list(m.ignore)] for m in mounts]}  # fmt: skip
        digest = _sha(f"image-v{LAYER_FORMAT}", state.chain, *(str(p) for p in state.layers), _canonical(meta))[:32]
        image = BuiltImage(digest, tuple(state.layers), env, state.workdir, state.python, mounts)
        if self.dry_run:
            return image
        marker = self.root / "images" / f"{digest}.json"
        if marker.exists():
            if not self.building:
                self.pending.clear()
                self.say(f"Image {digest} cached")
            return image
        for line in self.pending:  # all layers were cached, the image itself is new (a metadata change)
            self.say(line)
        self.pending.clear()
        record_image(self.root, image, state.extra_descriptors, self.say)
        atomic_write(marker, json.dumps(image.to_json(), indent=2) + "\n")
        self.say(f"Image {digest} built in {time.monotonic() - self.started:.1f} s")
        return image


class _NotCached(Exception):
    """A dry run met a step whose layer is not cached."""


# ----- tools the sandbox borrows from the host -------------------------------------------------------------

_RUN_FUNCTION = f"""
import sys
sys.path.insert(0, "{_SANDBOX_TMP}/lib")
import cloudpickle
with open("{_SANDBOX_TMP}/files/fn.pkl", "rb") as f:
    fn = cloudpickle.load(f)
with open("{_SANDBOX_TMP}/files/args.pkl", "rb") as f:
    args, kwargs = cloudpickle.load(f)
sys.path.remove("{_SANDBOX_TMP}/lib")
fn(*args, **kwargs)
"""
_EMPTY_ARGS = base64.b64encode(pickle.dumps(((), {}))).decode()


def _build_lib(root: Path) -> Path:
    """A copy of warmboot and cloudpickle for ``run_function``'s unpickling in the image (content-addressed)."""
    import cloudpickle

    import warmboot

    sources = [Path(warmboot.__file__).parent, Path(cloudpickle.__file__).parent]
    digest = hashlib.sha256()
    for src in sources:
        for path in sorted(src.rglob("*.py")):
            digest.update(str(path.relative_to(src.parent)).encode() + b"\0" + path.read_bytes())
    target = root / "buildlib" / digest.hexdigest()[:16]
    if target.is_dir():
        return target
    tmp = target.with_name(f".tmp-{tokens.token_hex(6)}")
    for src in sources:
        shutil.copytree(src, tmp / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        os.rename(tmp, target)
    except OSError:  # made by another builder meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _ensure_uv(say: Progress) -> Path:
    """uv from PyPI, installed once per host into the cache (``<cache>/tools/uv/bin/uv``) with the host's pip."""
    import subprocess
    import sys

    target = debian.cache_dir() / "tools" / "uv"
    if (target / "bin" / "uv").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with flock(target.parent / "uv.lock"):
        if (target / "bin" / "uv").exists():
            return target
        say("installing uv (host-wide, once) with pip")
        tmp = target.with_name(f".tmp-uv-{tokens.token_hex(4)}")
        argv = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(tmp), "uv"]
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0 or not (tmp / "bin" / "uv").exists():
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (result.stdout + result.stderr).splitlines()[-20:]
            raise ImageBuildError("could not install uv for uv_pip_install:\n" + "\n".join(f"  {t}" for t in tail))
        os.rename(tmp, target)
    return target


# ----- helpers ---------------------------------------------------------------------------------------------


def _inline_secrets(specs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for spec in specs:
        if spec.get("values") is None:
            raise InvalidOptionError(
                f"image build step uses Secret.from_name({spec.get('name')!r}): the server resolves named secrets"
            )
        env.update(spec["values"])
    return env


def _sha(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _safe_progress(progress: Progress) -> Progress:
    """``progress`` that, once it raises (a client went away), is dropped instead of failing the build."""
    broken = False

    def say(line: str) -> None:
        nonlocal broken
        if broken:
            return
        try:
            progress(line)
        except Exception:
            broken = True
            log.warning("image build progress callback failed; continuing without it", exc_info=True)

    return say
