"""Image builds: an SDK ``Image`` spec turned into a virtualenv on this host, content-addressed and cached.

An image lives in ``<root>/<digest>/``::

    venv/        the virtualenv (created in place: virtualenvs are not relocatable)
    pysrc/       copies of ``add_local_python_source`` modules (put on PYTHONPATH)
    dirs/<n>/    copies of ``add_local_dir`` trees (bind-mounted read-only at their remote paths)
    build.log    every line the build printed
    image.json   the marker of a complete image (the :class:`BuiltImage` fields), written last

The digest covers the spec's canonical JSON and the contents of every local file the spec copies, so an edit to
a local file makes a new image. Builds of one digest are serialized by an ``flock`` on ``<root>/<digest>.lock``
(threads and processes alike); a failed build removes its directory and raises :class:`ImageBuildError`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from warmboot import config
from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.worker.container import BindMount

log = logging.getLogger("warmboot.images")

#: Bumped whenever the layout or build procedure changes, so old cached images are not reused.
FORMAT_VERSION = 1
MARKER = "image.json"
BUILD_LOG = "build.log"
#: How many output lines of a failing step an :class:`ImageBuildError` quotes.
TAIL_LINES = 20
#: PATH inside containers (after the venv's bin) when the image's env does not set one.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Host variables that must not leak into build steps (they would point the venv's Python elsewhere).
_DROPPED_HOST_VARS = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
_SKIP_NAMES = ("__pycache__", "*.pyc")
_VERSION_RE = re.compile(r"^\d+\.\d+$")
_PYTHON_NAME_RE = re.compile(r"^python(\d+\.\d+)$")
# Run by each candidate interpreter: it must be able to make a virtualenv with pip (venv + ensurepip).
_PROBE = (
    "import sys, venv, ensurepip; "
    "sys.stdout.write('%d.%d %s' % (sys.version_info[0], sys.version_info[1], sys.executable))"
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuiltImage:
    """A complete image on this host: its interpreter, environment, mounts and PYTHONPATH entries."""

    digest: str  #: content address (hex)
    path: Path  #: the image directory
    python: str  #: absolute path of the image's interpreter (the virtualenv's ``bin/python``)
    env: dict[str, str]  #: env steps merged, plus VIRTUAL_ENV and PATH (venv's bin first)
    mounts: tuple[BindMount, ...]  #: read-only mounts of the ``add_local_dir`` copies
    pythonpath: tuple[str, ...]  #: host directories to put on PYTHONPATH

    def to_json(self) -> dict[str, Any]:
        """The marker-file form of this image."""
        return {
            "format": FORMAT_VERSION,
            "digest": self.digest,
            "path": str(self.path),
            "python": self.python,
            "env": dict(self.env),
            "mounts": [asdict(m) for m in self.mounts],
            "pythonpath": list(self.pythonpath),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuiltImage:
        """Read back :meth:`to_json`'s output."""
        return cls(
            digest=data["digest"],
            path=Path(data["path"]),
            python=data["python"],
            env=dict(data["env"]),
            mounts=tuple(BindMount(**m) for m in data["mounts"]),
            pythonpath=tuple(data["pythonpath"]),
        )


# ----- public API ------------------------------------------------------------------------------------------


def build_image(
    spec: dict[str, Any], *, root: Path | None = None, progress: Progress = lambda line: None
) -> BuiltImage:
    """Build the image ``spec`` describes (``Image.to_spec()``), or return the cached build of it.

    ``root`` holds the images (default ``$WARMBOOT_HOME/images``). ``progress`` receives step headers such as
    ``[2/4] pip install numpy`` and every output line of the build as it comes.

    Raises :class:`InvalidOptionError` for a malformed spec, a missing local path or a Python version this host
    lacks, and :class:`ImageBuildError` when a step fails (the message names the step and quotes its output).
    """
    _validate(spec)
    root = Path(root) if root is not None else config.home() / "images"
    say = _safe_progress(progress)
    digest = image_digest(spec)
    image_dir = root / digest

    cached = _load_complete(image_dir)
    if cached is not None:
        say(f"Image {digest} cached")
        return cached
    interpreter = find_python(spec["python_version"])
    root.mkdir(parents=True, exist_ok=True)
    with _digest_lock(root / f"{digest}.lock"):
        cached = _load_complete(image_dir)  # another thread or process may have built it while we waited
        if cached is not None:
            say(f"Image {digest} cached")
            return cached
        shutil.rmtree(image_dir, ignore_errors=True)  # leftovers of a build that died without cleaning up
        try:
            return _Build(spec, digest, image_dir, interpreter, say).run()
        except BaseException:
            shutil.rmtree(image_dir, ignore_errors=True)
            raise


def image_digest(spec: dict[str, Any]) -> str:
    """The content address of ``spec``: sha256 of its canonical JSON and of every local file it copies."""
    _validate(spec)
    digest = hashlib.sha256()
    digest.update(f"warmboot-image-v{FORMAT_VERSION}\0".encode())
    digest.update(json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())
    for step in spec["steps"]:
        if step["op"] == "add_local_python_source":
            for name, path in sorted(step["paths"].items()):
                digest.update(f"\0module {name}\0".encode())
                _hash_tree(Path(path), digest, what=f"add_local_python_source({name!r})")
        elif step["op"] == "add_local_dir":
            digest.update(f"\0dir {step['local']}\0".encode())
            _hash_tree(Path(step["local"]), digest, what="add_local_dir", want_dir=True)
    return digest.hexdigest()[:32]  # 128 bits; kept short so venv shebang lines stay well under the kernel's limit


def available_pythons() -> dict[str, str]:
    """The Python versions an image can use on this host: ``{"3.11": interpreter path}``, oldest first.

    Only interpreters that can create a virtualenv with pip (``venv`` and ``ensurepip``) count.
    """
    shims = _pyenv_root() / "shims"  # pyenv's shims run whichever version pyenv selects: its versions are listed below
    dirs = [Path(d) for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != shims]
    pyenv_bins = glob.glob(str(_pyenv_root() / "versions" / "*" / "bin"))
    dirs += sorted((Path(p) for p in pyenv_bins), key=lambda p: _patch_key(p.parent.name), reverse=True)
    dirs += [Path("/usr/bin"), Path("/usr/local/bin")]
    candidates: dict[str, tuple[str, str]] = {}  # real path -> (first path naming it, version), in search order
    for directory in dirs:
        with contextlib.suppress(OSError):
            for path in sorted(directory.iterdir()):
                match = _PYTHON_NAME_RE.match(path.name)
                if match and os.access(path, os.X_OK):
                    candidates.setdefault(os.path.realpath(path), (str(path), match.group(1)))
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda item: (item[1], _probe(*item)), candidates.values()))
    found: dict[str, str] = {}
    for version, executable in results:
        if executable:
            found.setdefault(version, executable)
    return dict(sorted(found.items(), key=lambda kv: tuple(int(x) for x in kv[0].split("."))))


def find_python(version: str) -> str:
    """An interpreter of Python ``version`` ("major.minor") on this host, able to make a virtualenv.

    Searched in order: ``python{version}`` on PATH, pyenv's ``versions/{version}.*`` (newest patch first),
    ``/usr/bin`` and ``/usr/local/bin``. Raises :class:`InvalidOptionError` naming the versions available.
    """
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise InvalidOptionError(f"python_version must look like '3.11', got {version!r}")
    exe = f"python{version}"
    candidates: list[str] = []
    on_path = shutil.which(exe)
    if on_path:
        candidates.append(on_path)
    pyenv = glob.glob(str(_pyenv_root() / "versions" / f"{version}.*" / "bin" / exe))
    candidates += sorted(pyenv, key=lambda p: _patch_key(Path(p).parent.parent.name), reverse=True)
    candidates += [f"/usr/bin/{exe}", f"/usr/local/bin/{exe}"]
    tried: set[str] = set()
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real in tried or not os.access(candidate, os.X_OK):
            continue
        tried.add(real)
        executable = _probe(candidate, version)
        if executable:
            return executable
    available = ", ".join(available_pythons()) or "none"
    raise InvalidOptionError(
        f"Python {version} is not available on this host (available: {available}); "
        f"choose one of those in Image.debian_slim(python_version=...)"
    )


# ----- the build -------------------------------------------------------------------------------------------


class _Build:
    """One build of one image, in place in ``image_dir`` (the caller holds the digest's lock)."""

    def __init__(self, spec: dict[str, Any], digest: str, image_dir: Path, interpreter: str, say: Progress):
        self.spec = spec
        self.digest = digest
        self.dir = image_dir
        self.interpreter = interpreter
        self.say = say
        self.venv = image_dir / "venv"
        self.env: dict[str, str] = {}
        self.mounts: list[BindMount] = []
        self.pythonpath: list[str] = []
        self.total = len(spec["steps"]) + 1
        self.log_file: Any = None

    def run(self) -> BuiltImage:
        started = time.monotonic()
        self.dir.mkdir(parents=True)
        with open(self.dir / BUILD_LOG, "w", encoding="utf-8") as self.log_file:
            self.emit(f"Building image {self.digest}")
            self.header(1, f"create virtualenv (Python {self.spec['python_version']}: {self.interpreter})")
            self.execute([self.interpreter, "-m", "venv", str(self.venv)], 1, "create virtualenv", env=self.build_env())
            for number, step in enumerate(self.spec["steps"], start=2):
                getattr(self, f"step_{step['op']}")(number, step)
            image = BuiltImage(
                digest=self.digest,
                path=self.dir,
                python=str(self.venv / "bin" / "python"),
                env=self.final_env(),
                mounts=tuple(self.mounts),
                pythonpath=tuple(self.pythonpath),
            )
            self.emit(f"Image {self.digest} built in {time.monotonic() - started:.1f} s")
        self.log_file = None
        tmp = self.dir / (MARKER + ".tmp")
        tmp.write_text(json.dumps(image.to_json(), indent=2) + "\n")
        os.replace(tmp, self.dir / MARKER)  # the marker appears atomically, and last
        return image

    # -- steps

    def step_pip_install(self, number: int, step: dict[str, Any]) -> None:
        packages = [str(p) for p in step["packages"]]
        self.header(number, "pip install " + " ".join(packages))
        if packages:
            argv = [str(self.venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
            self.execute([*argv, *packages], number, "pip install " + " ".join(packages), env=self.build_env())

    def step_env(self, number: int, step: dict[str, Any]) -> None:
        self.header(number, "env " + " ".join(sorted(step["vars"])))
        self.env.update(step["vars"])

    def step_run_commands(self, number: int, step: dict[str, Any]) -> None:
        commands = [str(c) for c in step["commands"]]
        self.header(number, f"run_commands ({len(commands)})")
        for command in commands:
            self.emit(f"$ {command}")
            self.execute(["bash", "-c", command], number, f"run_commands: {command}", env=self.build_env())

    def step_add_local_python_source(self, number: int, step: dict[str, Any]) -> None:
        paths: dict[str, str] = step["paths"]
        self.header(number, "add_local_python_source " + " ".join(sorted(paths)))
        pysrc = self.dir / "pysrc"
        for name, source in sorted(paths.items()):
            src = Path(source)
            parent = pysrc.joinpath(*name.split(".")[:-1])
            try:
                if src.is_dir():
                    _copy_tree(src, parent / name.split(".")[-1])
                else:
                    parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, parent / src.name)
            except (OSError, shutil.Error) as exc:
                self.fail(number, f"add_local_python_source({name!r}): cannot copy {src}: {exc}", [])
            self.emit(f"copied {name} from {src}")
        if str(pysrc) not in self.pythonpath:
            self.pythonpath.append(str(pysrc))

    def step_add_local_dir(self, number: int, step: dict[str, Any]) -> None:
        local, remote = step["local"], step["remote"]
        self.header(number, f"add_local_dir {local} -> {remote}")
        copy = self.dir / "dirs" / str(len(self.mounts))
        try:
            _copy_tree(Path(local), copy)
        except (OSError, shutil.Error) as exc:
            self.fail(number, f"add_local_dir: cannot copy {local}: {exc}", [])
        self.mounts.append(BindMount(source=str(copy), target=remote, read_only=True))

    # -- helpers

    def build_env(self) -> dict[str, str]:
        """The environment of build commands: the host's (pip's settings included), the image's, the venv."""
        env = {k: v for k, v in os.environ.items() if k not in _DROPPED_HOST_VARS}
        env.update(self.env)
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{self.env.get('PATH') or os.environ.get('PATH', DEFAULT_PATH)}"
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("PIP_NO_INPUT", "1")
        return env

    def final_env(self) -> dict[str, str]:
        env = dict(self.env)
        env["VIRTUAL_ENV"] = str(self.venv)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{self.env.get('PATH') or DEFAULT_PATH}"
        return env

    def header(self, number: int, text: str) -> None:
        self.emit(f"[{number}/{self.total}] {text}")

    def emit(self, line: str) -> None:
        if self.log_file is not None:
            self.log_file.write(line + "\n")
            self.log_file.flush()
        self.say(line)

    def execute(self, argv: Sequence[str], number: int, what: str, *, env: Mapping[str, str]) -> None:
        """Run one command in the image directory, streaming its output; raise ImageBuildError if it fails."""
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        try:
            proc = subprocess.Popen(
                list(argv),
                cwd=self.dir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except OSError as exc:
            self.fail(number, f"{what}: cannot run {shlex.join(argv)}: {exc}", [])
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                self.emit(line)
            code = proc.wait()
        finally:
            if proc.poll() is None:  # interrupted (an exception in progress, KeyboardInterrupt): stop the step
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if code != 0:
            self.fail(number, f"{what} (exit status {code})", list(tail))

    def fail(self, number: int, what: str, tail: list[str]) -> NoReturn:
        message = f"Image build failed at step [{number}/{self.total}] {what}"
        if tail:
            message += f"\nLast {len(tail)} line(s) of its output:\n" + "\n".join(f"  {line}" for line in tail)
        raise ImageBuildError(message)


# ----- helpers ---------------------------------------------------------------------------------------------


def _validate(spec: Any) -> None:
    """Refuse a spec that is not what ``Image.to_spec()`` makes, naming what is wrong."""
    if not isinstance(spec, dict) or not isinstance(spec.get("steps"), list):
        raise InvalidOptionError(f"image spec must be a dict with 'python_version' and a 'steps' list, got {spec!r}")
    version = spec.get("python_version")
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise InvalidOptionError(f"python_version must look like '3.11', got {version!r}")
    for step in spec["steps"]:
        op = step.get("op") if isinstance(step, dict) else None
        if op not in _STEP_CHECKS:
            raise InvalidOptionError(f"unknown image step {step!r} (known: {', '.join(_STEP_CHECKS)})")
        ok = _STEP_CHECKS[op](step)
        if not ok:
            raise InvalidOptionError(f"malformed image step {step!r}")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _module_name(name: Any) -> bool:
    return isinstance(name, str) and all(part.isidentifier() for part in name.split("."))


_STEP_CHECKS: dict[str, Callable[[dict[str, Any]], bool]] = {
    "pip_install": lambda s: _strings(s.get("packages")),
    "env": lambda s: isinstance(s.get("vars"), dict) and all(isinstance(v, str) for v in s["vars"].values()),
    "run_commands": lambda s: _strings(s.get("commands")),
    "add_local_python_source": lambda s: (
        isinstance(s.get("paths"), dict) and all(_module_name(k) and isinstance(v, str) for k, v in s["paths"].items())
    ),
    "add_local_dir": lambda s: (
        isinstance(s.get("local"), str)
        and isinstance(s.get("remote"), str)
        and s["remote"].startswith("/")
        and os.path.normpath(s["remote"]) != "/"
    ),
}


def _hash_tree(root: Path, digest: Any, *, what: str, want_dir: bool = False) -> None:
    """Feed ``root`` (a file, or a directory walked in sorted order) into ``digest``; skip bytecode caches."""
    if not root.exists():
        raise InvalidOptionError(f"{what}: local path {root} does not exist")
    if want_dir and not root.is_dir():
        raise InvalidOptionError(f"{what}: {root} is not a directory")
    if root.is_file():
        _hash_file(root, root.name, digest)
        return
    for current, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        base = Path(current)
        rel_dir = base.relative_to(root).as_posix()
        digest.update(f"\0d {rel_dir}\0".encode())
        for name in sorted(filenames):
            path = base / name
            if name.endswith(".pyc") or not path.exists():  # bytecode, or a dangling symlink (not copied either)
                continue
            _hash_file(path, f"{rel_dir}/{name}", digest)


def _hash_file(path: Path, rel: str, digest: Any) -> None:
    content = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                content.update(chunk)
        mode = path.stat().st_mode
    except OSError as exc:
        raise InvalidOptionError(f"cannot read local file {path}: {exc}") from exc
    executable = "x" if mode & 0o111 else "-"
    digest.update(f"\0f {rel} {executable} {content.hexdigest()}\0".encode())


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*_SKIP_NAMES), ignore_dangling_symlinks=True)


def _load_complete(image_dir: Path) -> BuiltImage | None:
    """The image in ``image_dir`` if its marker says it is complete and its interpreter still runs from there."""
    try:
        data = json.loads((image_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        return None
    try:
        image = BuiltImage.from_json(data)
    except (KeyError, TypeError):
        return None
    # The venv's python is a symlink to the base interpreter: if that was removed, the image must be rebuilt.
    if image.path != image_dir or not Path(image.python).exists():
        return None
    return image


@contextlib.contextmanager
def _digest_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: one builder per digest across threads and processes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _probe(candidate: str, version: str) -> str | None:
    """The interpreter's real path if ``candidate`` runs, is Python ``version`` and can make a venv with pip."""
    try:
        result = subprocess.run(
            [candidate, "-I", "-c", _PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found, _, executable = result.stdout.partition(" ")
    if result.returncode != 0 or found != version or not executable:
        return None
    return executable


def _pyenv_root() -> Path:
    return Path(os.environ.get("PYENV_ROOT") or "/root/.pyenv")


def _patch_key(name: str) -> tuple[int, ...]:
    """Sort key of a pyenv version directory name (``3.11.7`` -> (3, 11, 7))."""
    return tuple(int(x) if x.isdigit() else -1 for x in re.split(r"[.\-]", name))


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
