"""Image builds: real mmdebstrap bases, real bubblewrap sandboxes, real apt and pip (no mocks).

The Debian bases are cached host-wide (``/var/cache/warmboot`` or ``$WARMBOOT_CACHE``), so only the first run
on a machine bootstraps them; every test's layers live in its own temporary root.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
from registry_helpers import BaseImage

from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.sdk.image import Image
from warmboot.worker import images
from warmboot.worker.images import build, debian, hostcfg, oci, sandbox
from warmboot.worker.images.registry import pull_base

PY = "3.11"  # bookworm's Python, the same minor as this test process (run_function needs that)


def _write_marker(path: str, value: str) -> None:
    """Run inside the image by ``run_function`` (pickled by value)."""
    import pathlib
    import sys as image_sys

    pathlib.Path(path).write_text(f"{value} {image_sys.version_info[0]}.{image_sys.version_info[1]}\n")


def _sources(base: Path) -> dict[str, Path]:
    """A local package, a single-file module, a data directory (with a file to ignore) and a config file."""
    pkg = base / "src" / "wbimg_pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 'from-pkg'\n")
    (pkg / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"junk")
    (base / "src" / "wbimg_mod.py").write_text("def hello():\n    return 'from-mod'\n")
    data = base / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "weights.txt").write_text("42\n")
    (data / "scratch.tmp").write_text("ignored\n")
    conf = base / "conf.txt"
    conf.write_text("baked\n")
    return {"src": base / "src", "pkg": pkg, "mod": base / "src" / "wbimg_mod.py", "data": data, "conf": conf}


def _image(sources: dict[str, Path]) -> Image:
    return (
        Image.debian_slim(PY)
        .apt_install("libgomp1")
        .pip_install("six")
        .env({"GREETING": "hello"})
        .workdir("/srv/app")
        .run_commands("echo built-by-$GREETING > made.txt", "rm /etc/issue")
        .run_function(_write_marker, kwargs={"path": "/srv/app/fn.txt", "value": "from-function"})
        .add_local_file(sources["conf"], "/opt/data/", copy=True)
        .add_local_dir(sources["data"], "/data/in", ignore=["*.tmp"])
        .add_local_python_source("wbimg_pkg", "wbimg_mod")
    )


def _spec(sources: dict[str, Path], image: Any = _image) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(sources["src"]))
        return image(sources).to_spec()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full build, started by two threads at once (one builds, the other waits and reuses its layers)."""
    base = tmp_path_factory.mktemp("images")
    sources = _sources(base)
    spec = _spec(sources)
    root = base / "root"
    logs: list[list[str]] = [[], []]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(images.build_image, spec, root=root, progress=log.append) for log in logs]
        results = [f.result() for f in futures]
    return {"spec": spec, "root": root, "sources": sources, "results": results, "logs": logs, "base": base}


def run_in_image(layers: tuple[Path, ...], scratch: Path, code: str, *, env: dict[str, str], cwd: str) -> str:
    """Mount ``layers`` (bottom first) as overlayfs lower layers under a fresh upper, chroot in, run ``code``."""
    upper, work, merged = scratch / "upper", scratch / "work", scratch / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    lower = ":".join(str(p) for p in reversed(layers))
    options = f"lowerdir={lower},upperdir={upper},workdir={work},{images.OVERLAY_OPTIONS}"
    env_args = [f"{k}={v}" for k, v in env.items()]
    script = 'mount -t overlay overlay -o "$1" "$2" && mount -t proc proc "$2/proc" && shift 2 && exec "$@"'
    argv = ["unshare", "--mount", "--pid", "--fork", "--propagation", "private", "--", "/bin/sh", "-c", script]
    argv += ["sh", options, str(merged), "chroot", str(merged), "/usr/bin/env", "-i", *env_args]
    argv += ["/bin/sh", "-c", 'cd "$0" && exec python -c "$1"', cwd, code]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_image_runs_as_an_overlay_stack(built: dict[str, Any], tmp_path: Path) -> None:
    image: images.BuiltImage = built["results"][0]
    assert image.python == "/usr/local/bin/python" and image.workdir == "/srv/app"
    assert image.env["GREETING"] == "hello" and image.env["PYTHONPATH"] == "/root"
    assert image.env["PATH"].startswith("/usr/local/sbin:/usr/local/bin")
    local_layers = images.materialize_local_mounts(image, built["root"])
    code = (
        "import os, sys, ctypes, six, wbimg_pkg, wbimg_mod\n"
        "ctypes.CDLL('libgomp.so.1')\n"
        "print(sys.version_info[:2], os.getcwd())\n"
        "print(open('made.txt').read().strip(), open('fn.txt').read().strip())\n"
        "print(wbimg_pkg.VALUE, wbimg_mod.hello(), six.__name__)\n"
        "print(open('/data/in/sub/weights.txt').read().strip(), open('/opt/data/conf.txt').read().strip())\n"
        "print(os.path.exists('/etc/issue'), os.path.exists('/data/in/scratch.tmp'))\n"
    )
    out = run_in_image((*image.layers, *local_layers), tmp_path, code, env=image.env, cwd=image.workdir)
    assert out.splitlines() == [
        "(3, 11) /srv/app",
        "built-by-hello from-function 3.11",
        "from-pkg from-mod six",
        "42 baked",
        "False False",  # rm in a step left a whiteout; the ignored file was not copied
    ]


def test_layers_hold_only_their_steps_work(built: dict[str, Any]) -> None:
    image: images.BuiltImage = built["results"][0]
    base, apt, pip, workdir, commands, function, conf = image.layers
    assert base.is_relative_to(debian.cache_dir())  # shared by every home on this machine
    assert not list(base.glob("usr/lib/python3*/EXTERNALLY-MANAGED"))
    assert list(apt.glob("usr/lib/x86_64-linux-gnu/libgomp.so.1*"))
    assert list(pip.glob("usr/local/lib/python3*/dist-packages/six.py"))
    for layer in image.layers[1:]:
        lists = layer / "var" / "lib" / "apt" / "lists"
        assert not [p for p in lists.glob("*") if p.is_file() and p.name != "lock"], layer
        assert not (layer / "root" / ".cache").exists(), layer
        # mount points of host paths (pip's find-links, constraint and index directories) were not left behind
        assert not (layer / "opt" / "wheels").exists() and not (layer / "etc" / "xdg" / "pip").exists(), layer
    assert (workdir / "srv" / "app").is_dir()
    issue = commands / "etc" / "issue"
    assert issue.is_char_device() and os.stat(issue).st_rdev == 0  # an overlay whiteout, as lower layers want
    assert (function / "srv" / "app" / "fn.txt").is_file()
    assert (conf / "opt" / "data" / "conf.txt").read_text() == "baked\n"
    assert not (conf / "data").exists()  # copy=False files are not in any layer
    assert image.local_mounts == (
        images.LocalMount(str(built["sources"]["data"]), "/data/in", ("*.tmp",)),
        images.LocalMount(str(built["sources"]["pkg"]), "/root/wbimg_pkg", ("**/*.pyc", "**/__pycache__")),
        images.LocalMount(str(built["sources"]["mod"]), "/root/wbimg_mod.py", ("**/*.pyc", "**/__pycache__")),
    )
    assert images.BuiltImage.from_json(json.loads(json.dumps(image.to_json()))) == image


def test_progress_streams_steps_and_output(built: dict[str, Any]) -> None:
    lines = built["logs"][0] + built["logs"][1]
    assert "[3/10] pip install six" in lines
    assert "[2/10] apt-get install libgomp1" in lines
    assert "$ echo built-by-$GREETING > made.txt" in lines
    assert any(line.startswith("Successfully installed six") for line in lines)
    assert any("libgomp1" in line and line.startswith("Setting up") for line in lines)


def test_concurrent_builds_build_each_layer_once(built: dict[str, Any]) -> None:
    first, second = built["results"]
    assert first == second
    lines = built["logs"][0] + built["logs"][1]
    for number in (2, 3, 5, 6, 7, 8):  # the steps that make layers: each built by one thread, cached for the other
        built_here = [line for line in lines if line.startswith(f"[{number}/10] ") and not line.endswith("(cached)")]
        assert len(built_here) == 1, built_here


def test_second_build_is_cached(built: dict[str, Any]) -> None:
    lines: list[str] = []
    started = time.monotonic()
    image = images.build_image(built["spec"], root=built["root"], progress=lines.append)
    assert time.monotonic() - started < 1.0
    assert image == built["results"][0]
    assert lines == [f"Image {image.digest} cached"]


def test_copy_false_files_are_mounted_not_built(built: dict[str, Any], tmp_path: Path) -> None:
    image: images.BuiltImage = built["results"][0]
    sources = built["sources"]
    (first,) = images.materialize_local_mounts(image, built["root"])
    assert (first / "data" / "in" / "sub" / "weights.txt").read_text() == "42\n"
    assert (first / "root" / "wbimg_mod.py").is_file() and not (first / "data" / "in" / "scratch.tmp").exists()
    assert (first / "root" / "wbimg_pkg" / "__init__.py").is_file()
    assert not (first / "root" / "wbimg_pkg" / "__pycache__").exists()  # bytecode caches are not copied
    assert images.materialize_local_mounts(image, built["root"]) == (first,)

    # an edited copy=False file needs no rebuild: same image, new copy at the next deploy
    (sources["data"] / "sub" / "weights.txt").write_text("43\n")
    lines: list[str] = []
    assert images.build_image(_spec(sources), root=built["root"], progress=lines.append) == image
    assert lines == [f"Image {image.digest} cached"]
    (second,) = images.materialize_local_mounts(image, built["root"])
    assert second != first and (second / "data" / "in" / "sub" / "weights.txt").read_text() == "43\n"
    assert (first / "data" / "in" / "sub" / "weights.txt").read_text() == "42\n"  # deployed copies stay

    # an edited copy=True file rebuilds its own layer only
    sources["conf"].write_text("rebaked\n")
    lines.clear()
    rebuilt = images.build_image(_spec(sources), root=built["root"], progress=lines.append)
    assert rebuilt.layers[:-1] == image.layers[:-1] and rebuilt.layers[-1] != image.layers[-1]
    assert (rebuilt.layers[-1] / "opt" / "data" / "conf.txt").read_text() == "rebaked\n"
    assert "[7/10] run_function _write_marker (cached)" in lines
    assert f"[8/10] add_local_file {sources['conf']} -> /opt/data/conf.txt (copy)" in lines


def _small(commands: tuple[str, ...], *, force_pip: bool = False) -> dict[str, Any]:
    return Image.debian_slim(PY).pip_install("six", force_build=force_pip).run_commands(*commands).to_spec()


def test_changed_step_rebuilds_from_there_and_force_build(tmp_path: Path) -> None:
    root = tmp_path / "root"
    first = images.build_image(_small(("echo a > /a",)), root=root)
    lines: list[str] = []
    changed = images.build_image(_small(("echo b > /a",)), root=root, progress=lines.append)
    assert changed.layers[:2] == first.layers[:2] and changed.layers[2] != first.layers[2]
    assert "[2/3] pip install six (cached)" in lines
    assert "[3/3] run_commands echo b > /a" in lines
    assert (changed.layers[2] / "a").read_text() == "b\n"

    lines.clear()
    forced = images.build_image(_small(("echo b > /a",), force_pip=True), root=root, progress=lines.append)
    assert "[2/3] pip install six" in lines and "[3/3] run_commands echo b > /a" in lines
    assert forced.layers[0] == first.layers[0]
    assert set(forced.layers[1:]).isdisjoint(changed.layers[1:])  # the forced step and every step after it
    assert changed.layers[1].is_dir()  # the old layers stay: deployed images may still use them
    # without force_build, later builds reuse what the forced build made
    lines.clear()
    again = images.build_image(_small(("echo b > /a",)), root=root, progress=lines.append)
    assert again.layers == forced.layers and lines == [f"Image {again.digest} cached"]


def test_failing_step_names_command_and_output_tail(tmp_path: Path) -> None:
    root = tmp_path / "root"
    spec = (
        Image.debian_slim(PY)
        .env({"X": "1"})
        .run_commands("echo fine", "for i in $(seq 1 30); do echo line-$i; done; echo oops >&2; exit 3")
        .to_spec()
    )
    with pytest.raises(ImageBuildError) as info:
        images.build_image(spec, root=root)
    message = str(info.value)
    assert "[3/3] run_commands echo fine && for i in" in message
    assert "exit 3 (exit status 3)" in message
    assert "line-30" in message and "oops" in message and "line-10" not in message  # the last 20 lines
    assert not list((root / "keys").iterdir()) and not list((root / "layers").iterdir())  # nothing half-built
    assert not list((root / "tmp").iterdir())


def test_debian_slim_versions(tmp_path: Path) -> None:
    assert images.python_versions() == ["3.11", "3.13"]
    with pytest.raises(InvalidOptionError) as info:
        Image.debian_slim("3.12")
    assert "3.12" in str(info.value) and "3.11, 3.13" in str(info.value)
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    default = Image.debian_slim().to_spec()["base"]["python_version"]
    assert default == (mine if mine in images.python_versions() else "3.13")

    image = images.build_image(Image.debian_slim("3.13").to_spec(), root=tmp_path / "root")
    code = "import sys, ssl, venv, pip; print(sys.version_info[:2], sys.executable)"
    out = run_in_image(image.layers, tmp_path / "run", code, env=image.env, cwd=image.workdir)
    assert out.strip() == "(3, 13) /usr/local/bin/python"


def _wheel(directory: Path, name: str) -> Path:
    """A minimal pure-Python wheel ``name``-1.0 (a package no index has)."""
    files = {
        f"{name}.py": b"WHERE = 'find-links'\n",
        f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{name}-1.0.dist-info/RECORD,,\n"
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
        zf.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return wheel


def test_host_pip_settings_reach_pip_and_uv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build._ensure_uv(lambda line: None)  # uv itself comes from the host's usual index, once per machine
    links = tmp_path / "wheels"
    links.mkdir()
    _wheel(links, "wbprobe_pip")
    _wheel(links, "wbprobe_uv")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))  # the server's environment, as a corporate set-up has it
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # so the probes can only come from there
    spec = Image.debian_slim(PY).pip_install("wbprobe_pip").uv_pip_install("wbprobe_uv").to_spec()
    lines: list[str] = []
    image = images.build_image(spec, root=tmp_path / "root", progress=lines.append)
    assert list(image.layers[1].glob("usr/local/lib/python3*/dist-packages/wbprobe_pip.py"))
    assert list(image.layers[2].glob("usr/local/lib/python3*/dist-packages/wbprobe_uv.py"))
    assert not (image.layers[1] / links.relative_to("/")).exists()  # bound in, not copied


def test_oci_layout_records_the_image(built: dict[str, Any]) -> None:
    image: images.BuiltImage = built["results"][0]
    index = json.loads((built["root"] / "oci" / "index.json").read_text())
    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert f"warmboot/{image.digest}" in names
    layers, config = oci.Layout(built["root"] / "oci").read_image(f"warmboot/{image.digest}")
    assert len(layers) == len(image.layers)
    assert config.env["GREETING"] == "hello" and config.workdir == "/srv/app"


def test_bad_specs_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    base = {"kind": "debian_slim", "python_version": PY}
    with pytest.raises(InvalidOptionError, match="unknown image step"):
        images.build_image({"format": 2, "base": base, "steps": [{"op": "yum_install"}]}, root=root)
    with pytest.raises(InvalidOptionError, match="does not exist"):
        missing = {"op": "add_local_dir", "local": str(tmp_path / "nope"), "remote": "/x", "copy": False}
        images.build_image({"format": 2, "base": base, "steps": [missing]}, root=root)
    with pytest.raises(InvalidOptionError, match=r"3\.12"):
        images.build_image({"format": 2, "base": {**base, "python_version": "3.12"}, "steps": []}, root=root)
    with pytest.raises(InvalidOptionError, match="copy=True"):
        local = tmp_path / "f.txt"
        local.write_text("x")
        images.build_image(Image.debian_slim(PY).add_local_file(local, "/f").run_commands("ls").to_spec(), root=root)
    assert not list((root / "layers").iterdir())


def test_sandbox_whiteout_detection(tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "etc" / "pip").mkdir(parents=True)
    (upper / "etc").mkdir(parents=True)
    os.mknod(upper / "etc" / "pip", 0o600 | 0o020000, os.makedev(0, 0))
    assert sandbox._exists_in([lower], "etc/pip")
    assert not sandbox._exists_in([lower, upper], "etc/pip")
    assert not sandbox._exists_in([lower, upper], "etc/pip/pip.conf")


def test_registry_base_with_and_without_add_python(registry_base_image: BaseImage, tmp_path: Path) -> None:
    root = tmp_path / "root"
    # The base has no Python: refused at build, naming the fix, rather than failing at every container start.
    with pytest.raises(ImageBuildError, match=r"has no python3 or python on its PATH.*add_python="):
        images.build_image(Image.from_registry(registry_base_image.ref).to_spec(), root=root)
    base = pull_base(registry_base_image.ref, root=root, progress=lambda line: None)

    script = 'python -c \'import sys; open("/py.txt", "w").write("%d.%d" % sys.version_info[:2])\''
    spec = Image.from_registry(registry_base_image.ref, add_python=PY).run_commands(script).to_spec()
    lines: list[str] = []
    image = images.build_image(spec, root=root, progress=lines.append)
    assert f"[1/2] FROM {registry_base_image.ref} + Python {PY}" in lines
    assert image.python == "/usr/local/bin/python" and image.env["PATH"].split(":")[0] == "/usr/local/bin"
    assert image.env["BASE"] == "1" and image.workdir == "/root"
    assert image.layers[: len(base.layers)] == base.layers and len(image.layers) == len(base.layers) + 2
    assert (image.layers[-1] / "py.txt").read_text() == PY
    out = run_in_image(image.layers, tmp_path / "run", "import os; print(open('/etc/hello').read().strip())",
                       env=image.env, cwd=image.workdir)  # fmt: skip
    assert out.strip() == "hello from the base"


def test_host_pip_settings_follow_pips_order(tmp_path: Path) -> None:
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    (xdg / "pip").mkdir(parents=True)
    (home / ".config" / "pip").mkdir(parents=True)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("six<2\n")
    (xdg / "pip" / "pip.conf").write_text(
        f"[global]\nindex-url = https://global.invalid/simple\nconstraint = {constraints}\n"
    )
    (home / ".config" / "pip" / "pip.conf").write_text("[global]\nindex-url = https://user.invalid/simple\n")
    environ = {
        "HOME": str(home),
        "XDG_CONFIG_DIRS": str(xdg),
        "PIP_FIND_LINKS": f"{tmp_path} /nonexistent/wheels",
        "PIP_EXTRA_INDEX_URL": f"file://{tmp_path}/pypi/simple",
    }
    (tmp_path / "pypi" / "simple").mkdir(parents=True)
    config = hostcfg.load(environ)
    assert config.pip["index-url"] == "https://user.invalid/simple"  # user files override global ones
    assert config.pip_env()["PIP_CONSTRAINT"] == str(constraints)
    # every local path the settings name is bound into builds (a file index with its parent: relative file links)
    assert set(config.binds) >= {str(constraints), str(tmp_path), str(tmp_path / "pypi")}
    assert "/nonexistent/wheels" not in config.binds
    uv = config.uv_env()
    assert uv["UV_INDEX_URL"] == "https://user.invalid/simple"
    assert uv["UV_FIND_LINKS"] == f"{tmp_path},/nonexistent/wheels"
    assert uv["UV_CONSTRAINT"] == str(constraints) and uv["UV_INDEX_STRATEGY"] == "unsafe-best-match"


def test_step_env_and_secrets_reach_the_step_only(tmp_path: Path) -> None:
    from warmboot.sdk.secret import Secret

    secret = Secret.from_dict({"TOKEN": "s3cret"})
    spec = Image.debian_slim(PY).run_commands("echo $TOKEN-$MODE > /t", env={"MODE": "fast"}, secrets=[secret])
    image = images.build_image(spec.to_spec(), root=tmp_path / "root")
    assert (image.layers[-1] / "t").read_text() == "s3cret-fast\n"
    assert "TOKEN" not in image.env and "MODE" not in image.env  # build-time only
    named = Image.debian_slim(PY).run_commands("true", secrets=[Secret.from_name("db")]).to_spec()
    with pytest.raises(InvalidOptionError, match="named secrets"):
        images.build_image(named, root=tmp_path / "root")
    resolved = images.build_image(named, root=tmp_path / "root", secrets=lambda specs: {"DB": "x"})
    assert len(resolved.layers) == 2
