"""Real apps on root-filesystem images, through the real CLI and server: Debian packages, PyPI, a registry."""

from __future__ import annotations

import json
import uuid

from platform_helpers import Platform
from registry_helpers import BaseImage


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _last_json(text: str) -> object:
    return json.loads(text.strip().splitlines()[-1])


def test_apt_install_and_pip_install_app_runs(platform: Platform) -> None:
    """The issue's acceptance app: libgomp1 from Debian, scikit-learn from PyPI, run as a user would."""
    app = _unique("apt-pip")
    path = platform.write_app(
        app.replace("-", "_"),
        f"""
        import json
        import warmboot as modal

        image = modal.Image.debian_slim(python_version="3.11").apt_install("libgomp1").pip_install("scikit-learn")
        app = modal.App("{app}", image=image)

        @app.function()
        def fit():
            import ctypes.util
            from sklearn.datasets import make_classification
            from sklearn.linear_model import LogisticRegression

            x, y = make_classification(n_samples=200, n_features=8, random_state=0)
            score = LogisticRegression(max_iter=500).fit(x, y).score(x, y)
            return {{"score": score, "gomp": ctypes.util.find_library("gomp")}}

        @app.local_entrypoint()
        def main():
            print(json.dumps(fit.remote()))
        """,
    )
    run = platform.cli("run", str(path), timeout=900)
    assert "apt-get install" in run.stderr or "apt_install" in run.stderr, run.stderr[-3000:]
    result = _last_json(run.stdout)
    assert isinstance(result, dict)
    assert result["score"] > 0.8 and result["gomp"], result


def test_from_registry_with_add_python_runs(platform: Platform, registry_base_image: BaseImage) -> None:
    """An image from a registry on loopback that has no Python of its own; add_python gives it one."""
    app = _unique("from-reg")
    path = platform.write_app(
        app.replace("-", "_"),
        f"""
        import warmboot as modal

        image = modal.Image.from_registry({registry_base_image.ref!r}, add_python="3.11").pip_install("six")
        app = modal.App("{app}", image=image)

        @app.function()
        def where():
            import os
            import sys

            import six

            busybox = os.path.exists("/bin/busybox")
            return {{"version": sys.version_info[:2], "six": six.__version__, "busybox": busybox}}
        """,
    )
    deployed = platform.cli("deploy", str(path), timeout=600)
    assert f"FROM {registry_base_image.ref}" in deployed.stderr, deployed.stderr[-3000:]
    out = platform.python(
        f"""
        import json, warmboot
        print(json.dumps(warmboot.Function.from_name({app!r}, "where").remote()))
        """,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:] + "\n--- app log ---\n" + platform.log_text(app)[-3000:]
    result = _last_json(out.stdout)
    assert result == {"version": [3, 11], "six": result["six"], "busybox": True}, result
    platform.cli("app", "stop", app)


def test_from_registry_without_python_is_refused_with_the_fix(
    platform: Platform, registry_base_image: BaseImage
) -> None:
    app = _unique("no-python")
    path = platform.write_app(
        app.replace("-", "_"),
        f"""
        import warmboot as modal

        app = modal.App("{app}", image=modal.Image.from_registry({registry_base_image.ref!r}))

        @app.function()
        def f():
            return 1
        """,
    )
    proc = platform.cli("deploy", str(path), check=False, timeout=600)
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())
    assert "has no python3 or python" in message and "add_python=" in message, message
