"""Shared fixtures: real containers and a real snapshot store (real CRIU), cleaned up after each test."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_helpers import Platform

from warmboot.worker import container as containers
from warmboot.worker.snapshot import SnapshotStore

CHILDREN = Path(__file__).parent / "children"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMBOOT_HOME", str(tmp_path / "home"))


@pytest.fixture
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(tmp_path / "snapshots")


class Running:
    """Tracks containers a test starts or restores, and kills what is left at the end."""

    def __init__(self) -> None:
        self.all: list[containers.Container] = []

    def add(self, c: containers.Container) -> containers.Container:
        self.all.append(c)
        return c

    def start_stateful(self, *args: str, mounts: tuple[containers.BindMount, ...] = ()) -> containers.Container:
        spec = containers.ContainerSpec(
            argv=[sys.executable, "-S", str(CHILDREN / "stateful.py"), *args],
            mounts=mounts,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            private_tmp=False,  # the checkout and its .venv may live under /tmp, which a private /tmp hides
        )
        c = self.add(containers.start(spec))
        assert c.channels.control_out.readline() == b"ready\n", c.channels.stderr.read().decode()
        return c


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running()
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
