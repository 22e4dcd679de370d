"""Shared fixtures: real containers and a real snapshot store (real CRIU), cleaned up after each test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from db_helpers import open_db, postgres_cluster  # noqa: F401 - state tests on SQLite and PostgreSQL
from platform_helpers import Platform
from registry_helpers import registry, registry_base_image  # noqa: F401 - session fixtures, one registry

from warmboot.sdk.image import Image
from warmboot.worker import container as containers
from warmboot.worker import runtime_lib
from warmboot.worker.images import build_image
from warmboot.worker.snapshot import Snapshot, SnapshotStore

CHILDREN = Path(__file__).parent / "children"


#: The tests' own memory copies of snapshots (worker/snapshot_files.py): apart from a server's on this host (whose
#: copies the tests' eviction would otherwise push out) and from another test session's, small, and unmounted when
#: the session ends (or by the next session, if this one was killed).
TEST_SNAPSHOT_CACHES = Path("/dev/shm")
_CACHE_PREFIX = "warmboot-test-snapshot-cache-"


def _remove_cache(path: Path) -> None:
    if os.path.ismount(path):
        subprocess.run(["umount", "--lazy", str(path)], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True, scope="session")
def _test_snapshot_cache() -> Iterator[None]:
    for old in TEST_SNAPSHOT_CACHES.glob(f"{_CACHE_PREFIX}*"):
        owner = old.name.removeprefix(_CACHE_PREFIX)
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            _remove_cache(old)
    mine = TEST_SNAPSHOT_CACHES / f"{_CACHE_PREFIX}{os.getpid()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WARMBOOT_SNAPSHOT_CACHE_DIR", str(mine))
        mp.setenv("WARMBOOT_SNAPSHOT_CACHE_MB", "1024")
        yield
    _remove_cache(mine)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMBOOT_HOME", str(tmp_path / "home"))


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


# ----- engine-level containers -----------------------------------------------------------------------
#
# A container sees only its own root filesystem, so the test children cannot run on the host's Python: they
# run on a Debian image's, from a layer that holds a copy of tests/children at CHILDREN_IN_CONTAINER.

CHILDREN_IN_CONTAINER = "/root/children"
STATEFUL = f"{CHILDREN_IN_CONTAINER}/stateful.py"


@dataclass(frozen=True)
class EngineImage:
    """What engine tests start containers on: layers (bottom first, the runtime layer on top) and a Python."""

    layers: tuple[Path, ...]
    python: str  #: the interpreter, as a path inside the container
    env: dict[str, str]

    def to_json(self) -> str:
        return json.dumps({"layers": [str(p) for p in self.layers], "python": self.python, "env": self.env})

    @classmethod
    def from_json(cls, text: str) -> EngineImage:
        d = json.loads(text)
        return cls(tuple(Path(p) for p in d["layers"]), d["python"], d["env"])


def _base_image(root: Path) -> tuple[tuple[Path, ...], str, dict[str, str]]:
    """A debian_slim image's layers, interpreter and environment (the Debian base is cached host-wide)."""
    built = build_image(Image.debian_slim().to_spec(), root=root, progress=lambda _line: None)
    return tuple(built.layers), built.python, dict(built.env)


def _children_layer(root: Path) -> Path:
    """A layer holding a copy of tests/children at :data:`CHILDREN_IN_CONTAINER` (/root keeps Debian's 0700)."""
    layer = root / "children-layer"
    target = layer / CHILDREN_IN_CONTAINER.lstrip("/")
    shutil.copytree(CHILDREN, target, ignore=shutil.ignore_patterns("__pycache__"))
    os.chmod(layer / "root", 0o700)
    return layer


@pytest.fixture(scope="session")
def engine_image(tmp_path_factory: pytest.TempPathFactory) -> EngineImage:
    root = tmp_path_factory.mktemp("engine-image")
    layers, python, env = _base_image(root / "images")
    runtime = runtime_lib.ensure(root / "home")
    return EngineImage((*layers, _children_layer(root), runtime), python, env)


class Running:
    """Starts and restores containers on ``image`` (run directories under ``run_root``); kills what is left."""

    def __init__(self, image: EngineImage, run_root: Path) -> None:
        self.image = image
        self.run_root = run_root
        self.all: list[containers.Container] = []

    def add(self, c: containers.Container) -> containers.Container:
        self.all.append(c)
        return c

    def run_dir(self) -> Path:
        """A fresh run directory for one container (its writable layer)."""
        return self.run_root / f"c{len(self.all)}-{uuid.uuid4().hex[:8]}"

    def spec(self, argv: Sequence[str], mounts: Sequence[containers.BindMount] = ()) -> containers.ContainerSpec:
        return containers.ContainerSpec(
            argv=list(argv),
            layers=self.image.layers,
            run_dir=self.run_dir(),
            env=self.image.env,
            cwd="/root",
            mounts=tuple(mounts),
        )

    def start(self, argv: Sequence[str], mounts: Sequence[containers.BindMount] = ()) -> containers.Container:
        return self.add(containers.start(self.spec(argv, mounts)))

    def start_stateful(self, *args: str, mounts: Sequence[containers.BindMount] = ()) -> containers.Container:
        c = self.start([self.image.python, "-S", STATEFUL, *args], mounts)
        ready = c.channels.control_out.readline()
        assert ready == b"ready\n", f"{ready!r}; stderr: {c.channels.stderr.read().decode()}"
        return c

    def restore(self, store: SnapshotStore, snapshot: Snapshot | str) -> containers.Container:
        return self.add(store.restore(snapshot, self.run_dir()))


@pytest.fixture
def running(engine_image: EngineImage, tmp_path: Path) -> Iterator[Running]:
    r = Running(engine_image, tmp_path / "containers")
    yield r
    for c in r.all:
        with contextlib.suppress(OSError, TimeoutError):
            c.kill(timeout=10)


def ask(c: containers.Container, request: str) -> dict:
    """Send one request line to a stateful child and return its JSON reply."""
    c.channels.control_in.write(request.encode() + b"\n")
    line = c.channels.control_out.readline()
    assert line, f"container {c.pid} closed its control channel; stderr: {c.channels.stderr.read()!r}"
    return json.loads(line)


@pytest.fixture(scope="session")
def platform() -> Iterator[Platform]:
    """One real server for the session (image builds are cached in its home); tests use distinct app names."""
    p = Platform()
    p.start_server()
    yield p
    p.close()
