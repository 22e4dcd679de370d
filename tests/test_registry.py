"""OCI images against a real registry: layers written, pushed with skopeo, pulled, unpacked and stacked by overlayfs.

Everything is real: Debian's ``docker-registry`` on loopback, skopeo, the kernel's overlayfs (mounted in a
private mount namespace) and Debian's packages for ``add_python``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import BaseImage, Registry, run_in_overlay

from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.worker.images.layers import OPAQUE_XATTR, find_python, lookup_path, unpack_layer
from warmboot.worker.images.oci import MEDIA_LAYER_GZIP, ImageConfig, Layout
from warmboot.worker.images.python_layer import python_layer, python_versions
from warmboot.worker.images.registry import ImageRef, pull_base

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking layers and mounting overlays needs root")


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One images root for the module's tests, so layers are shared between pulls as in production."""
    return tmp_path_factory.mktemp("images")


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))


def test_pull_base_gives_layers_overlayfs_can_stack(registry_base_image: BaseImage, image_root: Path) -> None:
    lines: list[str] = []
    base = pull_base(registry_base_image.ref, root=image_root, progress=lines.append)

    assert len(base.layers) == 1 and base.layers[0].parent == image_root / "layers"
    assert base.layers[0].name.startswith("oci-")
    assert base.env == {"PATH": "/usr/bin:/bin", "BASE": "1"} and base.workdir == "/root"
    assert base.digest.startswith("sha256:") and len(base.digest) == 71
    assert any("Copying blob" in line for line in lines), lines  # skopeo's own progress was streamed
    out = run_in_overlay(list(base.layers), "cat /etc/hello; ls /opt/data; command -v python3 || echo no-python")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == ["hello from the base", "a", "b", "no-python"]

    # A second pull of the same tag unpacks nothing and pins the same digest.
    again = pull_base(registry_base_image.ref, root=image_root, progress=lambda _line: None)
    assert again.digest == base.digest and again.layers == base.layers


def test_whiteouts_and_opaque_dirs_round_trip_through_the_registry(
    registry: Registry, registry_base_image: BaseImage, image_root: Path, tmp_path: Path
) -> None:
    base = pull_base(registry_base_image.ref, root=image_root, progress=lambda _line: None)

    # An upper layer as overlayfs leaves it: a deleted file, an opaque dir, plus attributes a layer must keep.
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    _whiteout(upper / "etc/hello")
    (upper / "opt/data").mkdir(parents=True)
    os.setxattr(upper / "opt/data", OPAQUE_XATTR, b"y")
    (upper / "opt/data/c").write_text("c\n")
    (upper / "srv").mkdir()
    tool = upper / "srv/tool"
    tool.write_text("#!/bin/sh\necho tool\n")
    os.chown(tool, 1234, 5678)
    os.chmod(tool, 0o4755)
    os.setxattr(tool, "user.origin", b"\xffbinary\x00value")
    os.link(tool, upper / "srv/tool-hardlink")
    os.symlink("tool", upper / "srv/tool-link")

    layout = Layout(tmp_path / "oci")
    desc = layout.write_layer(upper)
    blob = layout.blob_path(desc.digest)
    inode = blob.stat().st_ino
    assert layout.write_layer(upper) == desc and blob.stat().st_ino == inode  # cached: not rewritten
    with tarfile.open(blob) as tar:
        names = tar.getnames()
    assert "etc/.wh.hello" in names and "opt/data/.wh..wh..opq" in names and "etc/hello" not in names

    # The derived image reuses the pulled base layer's blob; push it gzip-compressed to exercise that path.
    base_layout = Layout(image_root / "oci")
    for d in base.descriptors:
        shutil.copy(base_layout.blob_path(d.digest), layout.blob_path(d.digest))
    config = ImageConfig(env={"PATH": "/usr/bin:/bin", "LAYER": "2"}, workdir="/srv", cmd=["/srv/tool"])
    layout.write_image([*base.descriptors, desc], config, "test/derived:1")
    assert layout.read_image("test/derived:1") == ([*base.descriptors, desc], config)
    ref = registry.push(layout, "test/derived:1", "test/derived:1", compress="gzip")

    derived = pull_base(ref, root=image_root, progress=lambda _line: None)
    assert derived.layers[0] == base.layers[0]  # the shared base layer was not unpacked again
    assert derived.descriptors[1].media_type == MEDIA_LAYER_GZIP
    assert derived.env == {"PATH": "/usr/bin:/bin", "LAYER": "2"} and derived.workdir == "/srv"

    top = derived.layers[1]
    assert stat.S_ISCHR((top / "etc/hello").lstat().st_mode) and (top / "etc/hello").lstat().st_rdev == 0
    assert os.getxattr(top / "opt/data", OPAQUE_XATTR) == b"y"
    st = (top / "srv/tool").lstat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4755)
    assert os.getxattr(top / "srv/tool", "user.origin") == b"\xffbinary\x00value"
    assert (top / "srv/tool-hardlink").lstat().st_ino == st.st_ino
    assert os.readlink(top / "srv/tool-link") == "tool"

    # The same view without mounting anything: whiteouts, opaque dirs and symlinks honoured.
    layers = list(derived.layers)
    assert lookup_path(layers, "/etc/hello") is None and lookup_path(base.layers, "/etc/hello") is not None
    assert lookup_path(layers, "/opt/data/a") is None and lookup_path(layers, "/opt/data/c") == top / "opt/data/c"
    # /bin -> usr/bin in the base layer, so "/bin/.." is /usr (as the kernel resolves it), and /bin/../.. is /.
    assert lookup_path(layers, "/bin/../srv/tool-link") is None
    assert lookup_path(layers, "/bin/../../srv/tool-link") == top / "srv/tool"
    assert lookup_path(layers, "/etc/passwd") == base.layers[0] / "etc/passwd"

    script = (
        "test -e /etc/hello && echo hello-visible; ls /opt/data; /srv/tool-link; "
        "stat -c '%u:%g %a %h' /srv/tool; cat /etc/passwd"
    )
    out = run_in_overlay(list(derived.layers), script)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["c", "tool", "1234:5678 4755 2", "root:x:0:0:root:/root:/bin/sh"]


def test_pinned_digest_needs_no_registry(registry_base_image: BaseImage, image_root: Path) -> None:
    base = pull_base(registry_base_image.ref, root=image_root, progress=lambda _line: None)
    pinned = ImageRef.parse(registry_base_image.ref).pinned(base.digest)
    again = pull_base(pinned, root=image_root, progress=lambda _line: None)  # pulls by digest once
    lines: list[str] = []
    third = pull_base(pinned, root=image_root, progress=lines.append)
    assert again.digest == third.digest == base.digest and third.layers == base.layers
    assert not any("Copying" in line for line in lines), lines


def test_missing_tag_or_registry_is_an_image_build_error(registry: Registry, image_root: Path, tmp_path: Path) -> None:
    ref = f"{registry.host}/test/base:no-such-tag"
    with pytest.raises(ImageBuildError) as e:
        pull_base(ref, root=image_root, progress=lambda _line: None)
    assert ref in str(e.value) and "manifest unknown" in str(e.value) and "skopeo" in str(e.value)

    # A port nothing listens on: a closed registry is named the same way.
    with registry_port_closed() as port:
        ref = f"127.0.0.1:{port}/test/base:1"
        with pytest.raises(ImageBuildError) as e:
            pull_base(ref, root=tmp_path, progress=lambda _line: None)
        assert ref in str(e.value) and "connection refused" in str(e.value).lower()


@contextlib.contextmanager
def registry_port_closed() -> Iterator[int]:
    """A loopback port that is bound (so nothing else takes it) but not listening: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_python_layer_adds_python_to_a_pythonless_base(registry_base_image: BaseImage, image_root: Path) -> None:
    base = pull_base(registry_base_image.ref, root=image_root, progress=lambda _line: None)
    lines: list[str] = []
    t0 = time.monotonic()
    layer = python_layer("3.11", root=image_root, progress=lines.append)
    first = time.monotonic() - t0
    assert layer.parent == image_root / "layers" and layer.name.startswith("python-3.11-")
    t0 = time.monotonic()
    assert python_layer("3.11", root=image_root, progress=lines.append) == layer
    assert time.monotonic() - t0 < 0.5 < first  # cached: no apt, no unpack

    assert find_python(list(base.layers), base.env) is None
    assert find_python([*base.layers, layer], {"PATH": "/usr/local/bin:/usr/bin"}) == "/usr/local/bin/python3"

    script = (
        "test ! -e /usr/lib/python3.11/EXTERNALLY-MANAGED && "  # pip installs system-wide, as in Modal's images
        "python -c 'import ssl, sqlite3, sys; print(sys.version_info[:2], ssl.OPENSSL_VERSION, sqlite3.sqlite_version)'"
        " && python3 -c 'import ssl; print(ssl.get_default_verify_paths().cafile)'"
        " && test -s /etc/ssl/certs/ca-certificates.crt && pip --version && cat /etc/hello"
    )
    out = run_in_overlay([*base.layers, layer], script)
    assert out.returncode == 0, out.stdout + out.stderr
    first_line, cafile, pip_line, hello = out.stdout.splitlines()[:4]
    assert first_line.startswith("(3, 11) OpenSSL 3.")
    assert cafile == "/etc/ssl/certs/ca-certificates.crt"  # the bundle ca-certificates' script would have made
    assert pip_line.startswith("pip ") and "python 3.11" in pip_line
    assert hello == "hello from the base"


def test_concurrent_image_writers_lose_no_index_entry(tmp_path: Path) -> None:
    layer_dir = tmp_path / "layer"
    (layer_dir / "etc").mkdir(parents=True)
    (layer_dir / "etc/file").write_text("x\n")
    layout = Layout(tmp_path / "oci")
    desc = layout.write_layer(layer_dir)
    names = [f"test/img{i}:{j}" for i in range(8) for j in range(6)]

    def write(name: str) -> str:
        return layout.write_image([desc], ImageConfig(env={"N": name}, workdir="/"), name)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        digests = dict(zip(names, pool.map(write, names), strict=True))
    for name in names:  # every writer's entry survived the others' read-modify-write of index.json
        assert layout.manifest_digest(name) == digests[name]
        assert layout.read_image(name)[1].env == {"N": name}
    assert len(json.loads((layout.path / "index.json").read_text())["manifests"]) == len(names)


@pytest.mark.parametrize(
    ("ref", "normalized", "loopback"),
    [
        ("debian", "docker.io/library/debian:latest", False),
        ("python:3.11-slim", "docker.io/library/python:3.11-slim", False),
        ("nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04", "nvcr.io/nvidia/cuda:12.4.1-base-ubuntu22.04", False),
        ("127.0.0.1:5000/test/base:1", "127.0.0.1:5000/test/base:1", True),
        ("localhost:5000/base", "localhost:5000/base:latest", True),
        ("[::1]:5000/base:2", "[::1]:5000/base:2", True),
        ("127.0.0.1.example.com/base", "127.0.0.1.example.com/base:latest", False),
        ("ghcr.io/a/b@sha256:" + "a" * 64, "ghcr.io/a/b@sha256:" + "a" * 64, False),
    ],
)
def test_image_refs_are_normalized_like_docker(ref: str, normalized: str, loopback: bool) -> None:
    parsed = ImageRef.parse(ref)
    assert str(parsed) == normalized and parsed.is_loopback is loopback


@pytest.mark.parametrize("ref", ["", "Debian:1", "a b", "debian@sha256:short", "debian:-tag"])
def test_bad_image_refs_are_refused(ref: str) -> None:
    with pytest.raises(InvalidOptionError):
        ImageRef.parse(ref)


def test_unknown_python_version_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError) as e:
        python_layer("2.7", root=tmp_path, progress=lambda _line: None)
    for version in python_versions():
        assert version in str(e.value)
    assert not (tmp_path / "layers").exists()


# ------------------------------------------------------------------------------------------------------------------
# unpack_layer on hand-made tars (byte buffers built with tarfile)


def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entry(name: str, type_: bytes = tarfile.REGTYPE, *, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = type_, linkname, mode
    return info


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([(_entry("../escape"), b"x")], "escapes"),
        ([(_entry("a/../../escape"), b"x")], "escapes"),
        ([(_entry("/etc/escape"), b"x")], "absolute"),
        ([(_entry("link", tarfile.SYMTYPE, linkname="/tmp"), None), (_entry("link/escape"), b"x")], "not a directory"),
        ([(_entry("hl", tarfile.LNKTYPE, linkname="../../etc/passwd"), None)], "escapes"),
        ([(_entry("dev/sda", tarfile.BLKTYPE), None)], "device node"),
        ([(_entry("null", tarfile.CHRTYPE), None)], "device node"),
    ],
)
def test_unpack_layer_refuses_escapes_and_devices(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], message: str
) -> None:
    blob = tmp_path / "layer.tar"
    blob.write_bytes(_tar(*members))
    dest = tmp_path / "box" / "layer"
    with pytest.raises(ImageBuildError, match=message):
        unpack_layer(blob, dest)
    assert not dest.exists()
    assert os.listdir(tmp_path / "box") == []  # the temporary directory is gone too
    assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_unpack_layer_converts_oci_whiteouts(tmp_path: Path, compression: str) -> None:
    data = _tar(
        (_entry("etc", tarfile.DIRTYPE, mode=0o755), None),
        (_entry("etc/.wh.gone"), b""),
        (_entry("var/cache", tarfile.DIRTYPE, mode=0o700), None),
        (_entry("var/cache/.wh..wh..opq"), b""),
        (_entry("var/cache/kept"), b"kept\n"),
        (_entry("./usr/bin/tool", mode=0o755), b"#!/bin/sh\n"),
    )
    raw = tmp_path / "layer.tar"
    raw.write_bytes(data)
    blob = raw
    if compression == "gzip":
        blob = tmp_path / "layer.tar.gz"
        blob.write_bytes(gzip.compress(data))
    elif compression == "zstd":
        if shutil.which("zstd") is None:
            pytest.skip("zstd is not installed")
        blob = tmp_path / "layer.tar.zst"
        subprocess.run(["zstd", "-q", str(raw), "-o", str(blob)], check=True)
    diff_id = "sha256:" + hashlib.sha256(data).hexdigest()
    dest = tmp_path / "unpacked"
    unpack_layer(blob, dest, diff_id=diff_id)
    gone = (dest / "etc/gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert not (dest / "etc/.wh.gone").exists()
    assert os.getxattr(dest / "var/cache", OPAQUE_XATTR) == b"y"
    assert not (dest / "var/cache/.wh..wh..opq").exists()
    assert (dest / "var/cache/kept").read_text() == "kept\n"
    assert stat.S_IMODE((dest / "var/cache").stat().st_mode) == 0o700
    assert stat.S_IMODE((dest / "usr/bin/tool").stat().st_mode) == 0o755

    # A blob that does not hash to its diff_id is refused.
    with pytest.raises(ImageBuildError, match="corrupt"):
        unpack_layer(blob, tmp_path / "other", diff_id="sha256:" + "0" * 64)
    assert not (tmp_path / "other").exists()
