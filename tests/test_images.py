"""Image builds: real virtualenvs, real pip, real copies (no mocks)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from warmboot.errors import ImageBuildError, InvalidOptionError
from warmboot.sdk.image import Image
from warmboot.worker import images

PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def _make_sources(base: Path) -> dict[str, Path]:
    """A local package, a single-file module and a data directory, with bytecode caches to be skipped."""
    pkg = base / "src" / "wbimg_pkg"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 'from-pkg'\n")
    (pkg / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"junk")
    (base / "src" / "wbimg_mod.py").write_text("def hello():\n    return 'from-mod'\n")
    data = base / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "weights.txt").write_text("42\n")
    return {"src": base / "src", "pkg": pkg, "mod": base / "src" / "wbimg_mod.py", "data": data}


def _spec(sources: dict[str, Path]) -> dict[str, Any]:
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(sources["src"]))
        image = (
            Image.debian_slim(PY)
            .pip_install("six")
            .env({"GREETING": "hello", "LAYER": "first"})
            .env({"LAYER": "second"})
            .run_commands("echo built-by-$GREETING > made.txt", "python -c 'import six; print(six.__name__)'")
            .add_local_python_source("wbimg_pkg", "wbimg_mod")
            .add_local_dir(sources["data"], "/data/in")
        )
        return image.to_spec()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full build, started by two threads at once (one must wait for the other and reuse its image)."""
    base = tmp_path_factory.mktemp("images")
    sources = _make_sources(base)
    spec = _spec(sources)
    root = base / "images"
    logs: list[list[str]] = [[], []]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(images.build_image, spec, root=root, progress=log.append) for log in logs]
        results = [f.result() for f in futures]
    return {"spec": spec, "root": root, "sources": sources, "results": results, "logs": logs}


def test_build_makes_working_image(built: dict[str, Any]) -> None:
    image: images.BuiltImage = built["results"][0]
    assert image.digest == images.image_digest(built["spec"])
    assert image.path == built["root"] / image.digest
    assert image.python == str(image.path / "venv" / "bin" / "python")
    assert image.env["GREETING"] == "hello" and image.env["LAYER"] == "second"
    assert image.env["VIRTUAL_ENV"] == str(image.path / "venv")
    assert image.env["PATH"].split(":")[0] == str(image.path / "venv" / "bin")
    assert image.pythonpath == (str(image.path / "pysrc"),)

    assert (image.path / "pysrc" / "wbimg_pkg" / "__init__.py").is_file()
    assert not (image.path / "pysrc" / "wbimg_pkg" / "__pycache__").exists()  # bytecode caches are not copied
    code = (
        "import sys, six, wbimg_pkg, wbimg_mod; "
        "print(sys.prefix); print(wbimg_pkg.VALUE, wbimg_mod.hello(), six.__name__)"
    )
    env = {**image.env, "PYTHONPATH": ":".join(image.pythonpath)}
    out = subprocess.run([image.python, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    prefix, line = out.splitlines()
    assert Path(prefix) == image.path / "venv"
    assert line == "from-pkg from-mod six"

    # add_local_dir: a copy inside the image, mounted read-only at the remote path
    (mount,) = image.mounts
    assert mount.target == "/data/in" and mount.read_only
    assert Path(mount.source).is_relative_to(image.path)
    assert (Path(mount.source) / "sub" / "weights.txt").read_text() == "42\n"

    # run_commands ran in the image directory with the image's env; the log kept everything
    assert (image.path / "made.txt").read_text() == "built-by-hello\n"
    log = (image.path / "build.log").read_text()
    assert "Successfully installed six" in log
    marker = json.loads((image.path / "image.json").read_text())
    assert images.BuiltImage.from_json(marker) == image


def test_progress_shows_steps_and_output(built: dict[str, Any]) -> None:
    lines = next(log for log in built["logs"] if any("built in" in line for line in log))
    assert "[1/7] create virtualenv" in lines[1]
    assert "[2/7] pip install six" in lines
    assert any(line.startswith("Successfully installed six") for line in lines)
    assert "$ echo built-by-$GREETING > made.txt" in lines
    assert "six" in lines  # output of the second command, streamed


def test_concurrent_builds_share_one_image(built: dict[str, Any]) -> None:
    first, second = built["results"]
    assert first == second
    builders = [log for log in built["logs"] if any("built in" in line for line in log)]
    assert len(builders) == 1, "exactly one thread built; the other waited and reused it"
    assert f"Image {first.digest} cached" in next(log for log in built["logs"] if log is not builders[0])


def test_second_build_is_cached(built: dict[str, Any]) -> None:
    lines: list[str] = []
    started = time.monotonic()
    image = images.build_image(built["spec"], root=built["root"], progress=lines.append)
    assert time.monotonic() - started < 1.0
    assert image == built["results"][0]
    assert lines == [f"Image {image.digest} cached"]


def test_digest_follows_local_file_contents(tmp_path: Path) -> None:
    sources = _make_sources(tmp_path)
    spec = _spec(sources)
    before = images.image_digest(spec)
    assert images.image_digest(spec) == before
    (sources["pkg"] / "__pycache__" / "other.pyc").write_bytes(b"more junk")  # bytecode is ignored
    assert images.image_digest(spec) == before

    sources["mod"].write_text("def hello():\n    return 'changed'\n")
    after_module = images.image_digest(spec)
    assert after_module != before
    (sources["data"] / "sub" / "weights.txt").write_text("43\n")
    assert images.image_digest(spec) not in (before, after_module)


def test_failing_command_raises_with_output_tail(tmp_path: Path) -> None:
    root = tmp_path / "images"
    spec = Image.debian_slim(PY).env({"X": "1"}).run_commands("echo first-line; echo second-line >&2; exit 3").to_spec()
    with pytest.raises(ImageBuildError) as info:
        images.build_image(spec, root=root)
    message = str(info.value)
    assert "[3/3] run_commands: echo first-line; echo second-line >&2; exit 3 (exit status 3)" in message
    assert "first-line" in message and "second-line" in message
    digest = images.image_digest(spec)
    assert not (root / digest).exists()  # the partial image was removed: the next attempt starts clean
    assert not any(root.glob("*/image.json"))


def test_unavailable_python_lists_available_versions(tmp_path: Path) -> None:
    with pytest.raises(InvalidOptionError) as info:
        images.build_image({"python_version": "2.7", "steps": []}, root=tmp_path / "images")
    assert "2.7" in str(info.value)
    assert PY in str(info.value)
    assert PY in images.available_pythons()
    assert os.path.exists(images.available_pythons()[PY])


def test_bad_specs_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "images"
    with pytest.raises(InvalidOptionError, match="unknown image step"):
        images.build_image({"python_version": PY, "steps": [{"op": "apt_install", "packages": ["x"]}]}, root=root)
    with pytest.raises(InvalidOptionError, match="does not exist"):
        missing = {"op": "add_local_dir", "local": str(tmp_path / "nope"), "remote": "/x"}
        images.build_image({"python_version": PY, "steps": [missing]}, root=root)
    with pytest.raises(InvalidOptionError, match="python_version"):
        images.build_image({"python_version": "three", "steps": []}, root=root)
    assert not root.exists() or not any(root.iterdir())
