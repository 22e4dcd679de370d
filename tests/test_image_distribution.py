"""Images between machines: built and pushed by the control plane, pulled and unpacked by an agent.

Everything is real: Debian's ``docker-registry`` on loopback, skopeo, a real build (bubblewrap + overlayfs) on
a small busybox base. The "agent" is a second, empty images root: the layer directories it unpacks must be
file-for-file those of the control plane's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import BaseImage, Registry, run_in_overlay, running_registry

from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.sdk.image import Image
from warmboot.server.images import ResolvedImage, resolve_image
from warmboot.worker.images import BuiltImage
from warmboot.worker.images.distribute import pull_image, push_image
from warmboot.worker.images.layers import OPAQUE_XATTR
from warmboot.worker.images.oci import ImageConfig, Layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="building images and unpacking layers needs root")

#: The build step: a whiteout (/etc/hello), an opaque directory (/opt/data made anew), owners, modes, links.
BUILD_SCRIPT = (
    "rm /etc/hello && rm -r /opt/data && mkdir /opt/data && echo c > /opt/data/c && "
    "mkdir -p /srv/app && echo tool > /srv/app/tool && busybox chown 1234:5678 /srv/app/tool && "
    "busybox chmod 4750 /srv/app/tool && busybox ln /srv/app/tool /srv/app/tool-hard && "
    "busybox ln -s tool /srv/app/tool-link && busybox mkfifo /srv/app/pipe"
)


@dataclass
class Deployed:
    """One image as a deploy resolves it on the control plane, and where it was pushed."""

    home: Path
    resolved: ResolvedImage
    ref: str
    push_log: list[str]
    local_dir: Path
    spec: dict[str, Any]


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A work directory on a real file system (overlayfs, xattrs, device nodes), removed after the module."""
    path = Path(tempfile.mkdtemp(prefix="wb-dist-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dist_base(registry: Registry, registry_base_image: BaseImage, scratch: Path) -> str:
    """The busybox base plus a layer with a stand-in ``python3`` (find_python wants one on PATH) and attributes
    the layer format keeps: a user xattr and a file mtime with nanoseconds."""
    extra = scratch / "base-extra"
    (extra / "usr/local/bin").mkdir(parents=True)
    python = extra / "usr/local/bin/python3"
    python.write_text("#!/bin/sh\necho 'not a real python'\n")
    python.chmod(0o755)
    os.setxattr(python, "user.origin", b"\xffbase\x00")
    os.utime(python, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    layout = Layout(scratch / "base-oci")
    layers = [layout.write_layer(registry_base_image.rootfs), layout.write_layer(extra)]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "BASE": "dist"}
    layout.write_image(layers, ImageConfig(env=env, workdir="/root"), "test/distbase:1")
    return registry.push(layout, "test/distbase:1", "test/distbase:1")


def _deploy(base_ref: str, home: Path, local_text: str, registry: Registry) -> Deployed:
    """Build the test image in ``home`` as a deploy does (resolve_image), then push it."""
    local_dir = home.parent / f"{home.name}-local"
    (local_dir / "sub").mkdir(parents=True, exist_ok=True)
    (local_dir / "sub" / "data.txt").write_text(local_text)
    (local_dir / "run.sh").write_text("#!/bin/sh\necho run\n")
    (local_dir / "run.sh").chmod(0o750)
    conf = home.parent / f"{home.name}-conf.txt"
    conf.write_text("baked\n")
    spec = (
        Image.from_registry(base_ref)
        .env({"GREETING": "hi"})
        .run_commands(BUILD_SCRIPT)
        .workdir("/srv/app")
        .add_local_file(conf, "/etc/conf.txt", copy=True)  # a build layer
        .add_local_dir(local_dir, "/data")  # copy=False: a local layer, made at deploy
        .to_spec()
    )
    resolved = resolve_image(spec, home, progress=lambda _line: None)
    log: list[str] = []
    ref = push_image(resolved, images_root=home / "images", registry=registry.host, insecure=True, progress=log.append)
    return Deployed(home, resolved, ref, log, local_dir, spec)


@pytest.fixture(scope="module")
def deployed(dist_base: str, registry: Registry, scratch: Path) -> Deployed:
    return _deploy(dist_base, scratch / "control", "v1\n", registry)


@pytest.fixture(scope="module")
def agent(deployed: Deployed, scratch: Path) -> tuple[Path, ResolvedImage, list[str], float]:
    """The image pulled into a second, empty images root (an agent's), timed."""
    root = scratch / "agent" / "images"
    log: list[str] = []
    started = time.monotonic()
    pulled = pull_image(deployed.ref, images_root=root, insecure=True, progress=log.append)
    return root, pulled, log, time.monotonic() - started


def _tree(layer: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a container (and CRIU) can see of a layer directory's entries, by relative path.

    The layer's root itself is left out: overlayfs takes the root's attributes from the upper directory.
    mtimes are compared to the second: the layer tar format (layers.write_tar) keeps whole seconds.
    """
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(layer):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, layer)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            extra: Any = None
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    extra = hashlib.file_digest(f, "sha256").hexdigest()
                # Hardlinks: the first path of the inode (os.walk's order is the same on both sides: sorted).
                extra = (extra, inodes.setdefault(st.st_ino, rel))
            elif stat.S_ISLNK(st.st_mode):
                extra = os.readlink(path)
            elif stat.S_ISCHR(st.st_mode):
                # A whiteout: overlayfs only looks at its type and device number (0/0); a container never sees it,
                # and its mode and mtime are the unpacker's, not the tar's.
                out[rel] = (kind, ("whiteout", st.st_rdev))
                continue
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for x in sorted(os.listxattr(path)):
                    if x.startswith("user.") or x == OPAQUE_XATTR:
                        xattrs[x] = os.getxattr(path, x)
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else None  # a directory's size is the fs's business
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, size, st.st_nlink if kind != stat.S_IFDIR
                        else None, int(st.st_mtime), extra, xattrs)  # fmt: skip
        dirnames.sort()
    return out


Agent = tuple[Path, ResolvedImage, list[str], float]


def test_pulled_image_is_the_pushed_one(deployed: Deployed, agent: Agent) -> None:
    root, pulled, log, _ = agent
    src = deployed.resolved
    assert deployed.ref.startswith(f"{deployed.ref.split('/')[0]}/warmboot/images@sha256:")
    # The control plane's digest (snapshot keys contain it), env, workdir, interpreter and local mounts.
    assert pulled.image.digest == src.image.digest
    assert pulled.image.env == src.image.env and pulled.image.env["GREETING"] == "hi"
    assert pulled.image.workdir == src.image.workdir == "/srv/app"
    assert pulled.image.python == src.image.python == "/usr/local/bin/python3"
    assert pulled.image.local_mounts == src.image.local_mounts
    # Layers: the image's, then the local ones on top, all on the agent.
    assert len(src.local_layers) == 1 and len(pulled.local_layers) == 1
    assert len(pulled.image.layers) == len(src.image.layers) == 4  # busybox, python3, run_commands, conf
    for layer in (*pulled.image.layers, *pulled.local_layers):
        assert layer.is_relative_to(root / "layers") and layer.is_dir()
    assert (pulled.local_layers[0] / "data/sub/data.txt").read_text() == "v1\n"
    assert any("Copying blob" in line for line in log), log  # skopeo's progress is streamed

    # File for file: contents, modes, owners, sizes, mtimes, symlinks, hardlinks, whiteouts, opaque dirs, xattrs.
    for mine, theirs in zip((*src.image.layers, *src.local_layers), (*pulled.image.layers, *pulled.local_layers),
                            strict=True):  # fmt: skip
        assert _tree(theirs) == _tree(mine), f"{theirs} differs from {mine}"
    build = _tree(pulled.image.layers[2])
    assert build["etc/hello"] == (stat.S_IFCHR, ("whiteout", 0))
    assert build["opt/data"][8] == {OPAQUE_XATTR: b"y"}
    assert build["srv/app/tool"][1:4] == (0o4750, 1234, 5678) and build["srv/app/tool"][5] == 2
    assert build["srv/app/tool-link"][7] == "tool" and build["srv/app/pipe"][0] == stat.S_IFIFO
    py = _tree(pulled.image.layers[1])["usr/local/bin/python3"]
    assert py[8] == {"user.origin": b"\xffbase\x00"} and py[6] == 1_600_000_000


def test_second_push_and_pull_are_cheap(
    deployed: Deployed, agent: tuple[Path, ResolvedImage, list[str], float], registry: Registry
) -> None:
    log: list[str] = []
    again = push_image(deployed.resolved, images_root=deployed.home / "images", registry=registry.host,
                       insecure=True, progress=log.append)  # fmt: skip
    assert again == deployed.ref
    assert any("already in the registry" in line for line in log) and not any("Copying" in line for line in log)

    root, first, _, _ = agent
    log = []
    started = time.monotonic()
    second = pull_image(deployed.ref, images_root=root, insecure=True, progress=log.append)
    assert time.monotonic() - started < 0.5 and log == []
    assert second == first


def test_cached_pull_needs_no_registry(dist_base: str, scratch: Path, registry: Registry) -> None:
    """Push to a registry of its own, pull, stop that registry: the pull is answered from the agent's cache."""
    base = Layout(scratch / "base-oci")
    with running_registry(scratch / "own-registry") as own:
        own.push(base, "test/distbase:1", "test/distbase:1")
        dep = _deploy(f"{own.host}/test/distbase:1", scratch / "own-control", "own\n", own)
        root = scratch / "own-agent"
        first = pull_image(dep.ref, images_root=root, insecure=True, progress=lambda _line: None)
    with pytest.raises(ImageBuildError):  # the registry is gone indeed
        pull_image(dep.ref, images_root=scratch / "own-agent-2", insecure=True, progress=lambda _line: None)
    log: list[str] = []
    assert pull_image(dep.ref, images_root=root, insecure=True, progress=log.append) == first
    assert log == []

    # A layer directory removed since (disk cleanup): unpacked again from the layout, still without a registry.
    shutil.rmtree(first.local_layers[0])
    again = pull_image(dep.ref, images_root=root, insecure=True, progress=log.append)
    assert again == first and first.local_layers[0].is_dir()
    assert [line for line in log if "unpacking" in line] and not any("Copying" in line for line in log)


def test_other_local_files_are_another_image_sharing_layers(
    deployed: Deployed, agent: tuple[Path, ResolvedImage, list[str], float], registry: Registry, scratch: Path
) -> None:
    """Same build, other local files: the same warmboot digest, another pushed image; the agent unpacks only
    the new local layer."""
    (deployed.local_dir / "sub" / "data.txt").write_text("v2\n")
    try:
        resolved = resolve_image(deployed.spec, deployed.home, progress=lambda _line: None)  # a second deploy
    finally:
        (deployed.local_dir / "sub" / "data.txt").write_text("v1\n")
    assert resolved.image.digest == deployed.resolved.image.digest
    assert resolved.local_layers != deployed.resolved.local_layers
    ref = push_image(resolved, images_root=deployed.home / "images", registry=registry.host, insecure=True,
                     progress=lambda _line: None)  # fmt: skip
    assert ref != deployed.ref

    root, first, _, _ = agent
    log: list[str] = []
    second = pull_image(ref, images_root=root, insecure=True, progress=log.append)
    assert second.image == first.image and second.local_layers != first.local_layers
    assert (second.local_layers[0] / "data/sub/data.txt").read_text() == "v2\n"
    assert len([line for line in log if "unpacking layer" in line]) == 1, log


def test_concurrent_pulls_of_one_image(deployed: Deployed, scratch: Path) -> None:
    root = scratch / "agent-concurrent"
    logs: list[list[str]] = [[], [], []]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(pull_image, deployed.ref, images_root=root, insecure=True, progress=log.append) for log in logs
        ]
        results = [f.result() for f in futures]
    assert results[0] == results[1] == results[2]
    assert sum("Copying config" in line for log in logs for line in log) == 1  # one skopeo ran
    unpacked = [line for log in logs for line in log if "unpacking layer" in line]
    assert len(unpacked) == len(results[0].image.layers) + len(results[0].local_layers)  # each layer once


def test_repeated_layer_and_unrecorded_image(registry: Registry, registry_base_image: BaseImage, scratch: Path) -> None:
    """Two layers alike (two steps that changed the same nothing) unpack into two directories, since overlayfs
    refuses one directory twice in a stack; an image missing from the layout (an older home) is recorded first."""
    twins = []
    for name in ("twin-a", "twin-b"):
        layer = scratch / name
        (layer / "etc").mkdir(parents=True)
        (layer / "etc/twin").write_text("twin\n")
        for path in (layer / "etc/twin", layer / "etc"):
            os.utime(path, (1_700_000_000, 1_700_000_000))
        twins.append(layer)
    image = BuiltImage("ab" * 16, (registry_base_image.rootfs, *twins), {"PATH": "/usr/bin:/bin"}, "/", "/usr/bin/sh")
    root = scratch / "twin-control"
    ref = push_image(ResolvedImage(image, ()), images_root=root, registry=registry.host, insecure=True,
                     progress=lambda _line: None)  # fmt: skip
    pulled = pull_image(ref, images_root=scratch / "twin-agent", insecure=True, progress=lambda _line: None)
    assert len(set(pulled.image.layers)) == 3 and pulled.local_layers == ()
    assert pulled.image.layers[2].name == pulled.image.layers[1].name + "-2"
    out = run_in_overlay(list(pulled.image.layers), "cat /etc/twin /etc/hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "twin\nhello from the base\n"


def test_missing_image_names_the_reference(registry: Registry, scratch: Path) -> None:
    ref = f"{registry.host}/warmboot/images@sha256:{'0' * 64}"
    with pytest.raises(ImageBuildError) as e:
        pull_image(ref, images_root=scratch / "agent-missing", insecure=True, progress=lambda _line: None)
    text = str(e.value)
    assert ref in text and "manifest unknown" in text and "has no such image" in text and "Deploy the app" in text
    with pytest.raises(InvalidOptionError, match="pinned by digest"):
        pull_image(f"{registry.host}/warmboot/images:latest", images_root=scratch / "x", insecure=True,
                   progress=lambda _line: None)  # fmt: skip


def test_unreachable_registry_is_a_clear_error(deployed: Deployed, scratch: Path) -> None:
    with closed_port() as port:
        host = f"127.0.0.1:{port}"
        ref = f"{host}/warmboot/images@{deployed.ref.split('@')[1]}"
        with pytest.raises(ImageBuildError) as e:
            pull_image(ref, images_root=scratch / "agent-unreachable", insecure=True, progress=lambda _line: None)
        assert ref in str(e.value) and f"registry {host} is unreachable" in str(e.value)
        with pytest.raises(ImageBuildError) as e:
            push_image(deployed.resolved, images_root=deployed.home / "images", registry=host, insecure=True,
                       progress=lambda _line: None)  # fmt: skip
        assert f"{host}/warmboot/images:{deployed.resolved.image.digest}" in str(e.value)
        assert f"registry {host} is unreachable" in str(e.value)


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port that is bound (so nothing else takes it) but not listening: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
