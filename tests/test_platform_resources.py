"""Volumes, private /tmp, images, secrets, the management CLI and server restarts, end to end.

Every test goes through the real CLI and SDK (in subprocesses) against the session's real server, with real
containers; each uses its own app (and volume/secret) names, made unique by a per-module suffix.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest
from platform_helpers import WARMBOOT, Platform

ID = uuid.uuid4().hex[:8]
HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def flat(text: str) -> str:
    """``text`` with every run of whitespace made one space (Rich may wrap long messages)."""
    return " ".join(text.split())


def remote(platform: Platform, app: str, function: str, *args: object) -> object:
    """Call ``app.function(*args)`` by name from a fresh process; return its (JSON-able) result."""
    out = platform.python(
        f"""
        import json, warmboot
        f = warmboot.Function.from_name({app!r}, {function!r})
        print(json.dumps(f.remote(*{args!r})))
        """
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def deploy_fails(platform: Platform, path: Path) -> str:
    """Deploy ``path``, expecting failure; return the error (stderr from "Error:" on, whitespace flattened)."""
    proc = platform.cli("deploy", str(path), check=False)
    assert proc.returncode != 0, f"deploy of {path.name} should fail\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Error:" in proc.stderr, proc.stderr
    return flat(proc.stderr[proc.stderr.index("Error:") :])


# ----- volumes ---------------------------------------------------------------------------------------------

VOLUME_APP = """
import os
import warmboot as modal

app = modal.App({app!r})
vol = modal.Volume.from_name({volume!r}, create_if_missing=True)

@app.function(volumes={{"/data": vol}})
def write(name, text):
    with open(os.path.join("/data", name), "w") as f:
        f.write(text)
    vol.commit()
    return os.environ["WARMBOOT_CONTAINER_ID"]

@app.function(volumes={{"/data": vol}})
def read(name):
    vol.reload()
    with open(os.path.join("/data", name)) as f:
        return [f.read(), os.environ["WARMBOOT_CONTAINER_ID"]]
{extra}
"""


def test_volume_persists_across_containers_and_redeploys(platform: Platform) -> None:
    app, volume = f"res-vol-{ID}", f"v-res-{ID}"
    path = platform.write_app("res_volume", VOLUME_APP.format(app=app, volume=volume, extra=""))
    deployed = platform.cli("deploy", str(path))
    assert f"Created volume {volume}" in deployed.stderr
    writer = remote(platform, app, "write", "greeting.txt", "hello volume")
    assert (platform.home / "volumes" / volume / "greeting.txt").read_text() == "hello volume"

    # A stopped app's containers are gone: the redeployed app reads the file back in a new container.
    platform.cli("app", "stop", app)
    platform.cli("deploy", str(path))
    text, reader = remote(platform, app, "read", "greeting.txt")
    assert text == "hello volume"
    assert reader != writer

    # A new version of the app (changed code) still sees the volume's contents.
    platform.write_app("res_volume", VOLUME_APP.format(app=app, volume=volume, extra="\n# version 2\n"))
    deployed = platform.cli("deploy", str(path))
    assert "version 3" in flat(deployed.stderr + deployed.stdout)
    assert "Created volume" not in deployed.stderr, "the volume exists already"
    text, reader_v3 = remote(platform, app, "read", "greeting.txt")
    assert text == "hello volume"
    assert reader_v3 not in (writer, reader)


def test_deploy_with_missing_volume_fails_naming_it(platform: Platform) -> None:
    volume = f"v-missing-{ID}"
    path = platform.write_app(
        "res_missing_volume",
        f"""
        import warmboot as modal

        app = modal.App("res-missing-vol-{ID}")

        @app.function(volumes={{"/data": modal.Volume.from_name("{volume}")}})
        def f():
            return 1
        """,
    )
    error = deploy_fails(platform, path)
    assert volume in error
    assert "does not exist" in error
    assert "create_if_missing=True" in error
    assert not (platform.home / "volumes" / volume).exists()
    assert f"res-missing-vol-{ID}" not in platform.cli("app", "list").stdout


# ----- private /tmp ----------------------------------------------------------------------------------------

TMP_APP = """
import os
import warmboot as modal

app = modal.App({app!r})

@app.function()
def probe(host_marker, container_marker):
    before = sorted(os.listdir("/tmp"))
    with open(os.path.join("/tmp", container_marker), "w") as f:
        f.write("written in the container")
    return {{
        "before": before,
        "sees_host_marker": os.path.exists(os.path.join("/tmp", host_marker)),
        "after": sorted(os.listdir("/tmp")),
        "container": os.environ["WARMBOOT_CONTAINER_ID"],
    }}
"""


def test_each_container_has_a_private_tmp(platform: Platform) -> None:
    app = f"res-tmp-{ID}"
    host_marker = f"warmboot-host-marker-{ID}"
    container_marker = f"warmboot-container-marker-{ID}"
    host_file = Path("/tmp") / host_marker
    host_file.write_text("written on the host")
    try:
        path = platform.write_app("res_tmp", TMP_APP.format(app=app))
        platform.cli("deploy", str(path))
        first = remote(platform, app, "probe", host_marker, container_marker)
        assert first["before"] == [], f"the container's /tmp must start empty, it held {first['before']}"
        assert first["sees_host_marker"] is False
        assert first["after"] == [container_marker]
        assert not (Path("/tmp") / container_marker).exists(), "a container's /tmp write leaked to the host"

        # A new container gets a fresh /tmp: the previous container's file is gone with it.
        platform.cli("app", "stop", app)
        platform.cli("deploy", str(path))
        second = remote(platform, app, "probe", host_marker, container_marker)
        assert second["container"] != first["container"]
        assert second["before"] == []
    finally:
        host_file.unlink(missing_ok=True)
        (Path("/tmp") / container_marker).unlink(missing_ok=True)


# ----- images ----------------------------------------------------------------------------------------------


def test_image_pip_install_env_local_source_and_imports(platform: Platform) -> None:
    app = f"res-image-{ID}"
    app_dir = platform.apps_dir / "res_image"  # its own directory: mymod.py sits next to the app file
    app_dir.mkdir()
    (app_dir / "mymod.py").write_text(f'VALUE = "from mymod {ID}"\n')
    path = app_dir / "image_app.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import os
            import sys
            import warmboot as modal

            image = (
                modal.Image.debian_slim()
                .pip_install("six")
                .env({{"K": "V"}})
                .add_local_python_source("mymod")
            )
            app = modal.App("{app}", image=image)

            with image.imports():
                import six  # not installed on the caller's machine: only the container must import it

            @app.function()
            def inspect():
                import mymod

                return {{
                    "six_version": six.__version__,
                    "six_file": six.__file__,
                    "prefix": sys.prefix,
                    "K": os.environ.get("K"),
                    "mymod_value": mymod.VALUE,
                    "mymod_file": mymod.__file__,
                }}
            """
        )
    )
    deployed = platform.cli("deploy", str(path))
    assert "pip install six" in deployed.stderr
    got = remote(platform, app, "inspect")
    # The image's own Python, in its root filesystem (not a host virtualenv): six went into its site-packages.
    assert got["prefix"] == "/usr", got
    assert got["six_file"].startswith("/usr/local/lib/python3"), got
    assert got["six_version"]
    assert got["K"] == "V"
    assert got["mymod_value"] == f"from mymod {ID}"
    # Imported from the copy under /root (where Modal puts local Python sources), not from this machine.
    assert got["mymod_file"] == "/root/mymod.py", got


def test_failing_build_step_fails_deploy_with_its_output(platform: Platform) -> None:
    path = platform.write_app(
        "res_build_fails",
        f"""
        import warmboot as modal

        app = modal.App("res-build-fails-{ID}", image=modal.Image.debian_slim().run_commands("echo boom; exit 3"))

        @app.function()
        def f():
            return 1
        """,
    )
    error = deploy_fails(platform, path)
    assert "Image build failed" in error
    assert "echo boom; exit 3" in error
    assert "exit status 3" in error
    assert "boom" in error.split("exit status 3", 1)[1], "the error must quote the failing step's output"
    assert f"res-build-fails-{ID}" not in platform.cli("app", "list").stdout


def test_unavailable_python_version_lists_available_ones(platform: Platform) -> None:
    path = platform.write_app(
        "res_bad_python",
        f"""
        import warmboot as modal

        app = modal.App("res-bad-python-{ID}", image=modal.Image.debian_slim(python_version="3.99"))

        @app.function()
        def f():
            return 1
        """,
    )
    error = deploy_fails(platform, path)
    assert "Python 3.99 is not available" in error
    assert "available:" in error
    available = error.split("available:", 1)[1]
    assert HOST_PYTHON in available, f"the Python running the tests ({HOST_PYTHON}) must be listed: {error}"


# ----- secrets ---------------------------------------------------------------------------------------------


def test_secrets_become_environment_variables(platform: Platform) -> None:
    app, secret = f"res-secrets-{ID}", f"mysecret-{ID}"
    value = f"xyz-{uuid.uuid4().hex}"
    created = platform.cli("secret", "create", secret, f"API_KEY={value}")
    assert value not in created.stdout + created.stderr

    listed = platform.cli("secret", "list")
    row = next((line for line in listed.stdout.splitlines() if secret in line), None)
    assert row is not None, listed.stdout
    assert "API_KEY" in row
    assert value not in listed.stdout + listed.stderr, "`secret list` must never show values"

    path = platform.write_app(
        "res_secrets",
        f"""
        import os
        import warmboot as modal

        app = modal.App("{app}")

        @app.function(secrets=[modal.Secret.from_dict({{"TOKEN": "abc"}}), modal.Secret.from_name("{secret}")])
        def env():
            return [os.environ.get("TOKEN"), os.environ.get("API_KEY")]
        """,
    )
    platform.cli("deploy", str(path))
    assert remote(platform, app, "env") == ["abc", value]


def test_deploy_with_missing_named_secret_says_how_to_create_it(platform: Platform) -> None:
    secret = f"nosuchsecret-{ID}"
    path = platform.write_app(
        "res_missing_secret",
        f"""
        import warmboot as modal

        app = modal.App("res-missing-secret-{ID}")

        @app.function(secrets=[modal.Secret.from_name("{secret}")])
        def f():
            return 1
        """,
    )
    error = deploy_fails(platform, path)
    assert repr(secret) in error
    assert f"warmboot secret create {secret}" in error
    assert f"res-missing-secret-{ID}" not in platform.cli("app", "list").stdout


# ----- managing apps and containers ------------------------------------------------------------------------

CLI_APP = """
import os
import warmboot as modal

app = modal.App({app!r})

@app.function()
def shout(text):
    print(f"shouting {{text}}")
    return os.environ["WARMBOOT_CONTAINER_ID"]
"""


def _follow_logs(platform: Platform, app: str) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
    """Start `warmboot logs APP --follow`; its stdout lines arrive on the queue (``None`` at EOF)."""
    proc = subprocess.Popen(
        [WARMBOOT, "logs", app, "--follow"],
        env=platform.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return proc, lines


def _wait_for_line(proc: subprocess.Popen[str], lines: queue.Queue[str | None], needle: str) -> str:
    seen = []
    while True:
        try:
            line = lines.get(timeout=60)
        except queue.Empty:
            raise AssertionError(f"`logs --follow` printed no line with {needle!r}; got {seen}") from None
        if line is None:
            stderr = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"`logs --follow` ended (exit {proc.wait()}) before {needle!r}; got {seen}\n{stderr}")
        seen.append(line)
        if needle in line:
            return line


def test_cli_lists_apps_and_containers_and_shows_logs(platform: Platform) -> None:
    app = f"res-cli-{ID}"
    path = platform.write_app("res_cli", CLI_APP.format(app=app))
    platform.cli("deploy", str(path))
    apps = platform.cli("app", "list").stdout
    row = next((line for line in apps.splitlines() if app in line), None)
    assert row is not None, apps
    assert "deployed" in row and "shout" in row

    container = remote(platform, app, "shout", "first")
    containers = platform.cli("container", "list").stdout
    row = next((line for line in containers.splitlines() if container in line), None)
    assert row is not None, containers
    assert app in row

    logs = platform.cli("logs", app).stdout
    assert "shouting first" in logs

    proc, lines = _follow_logs(platform, app)
    try:
        _wait_for_line(proc, lines, "shouting first")  # what was logged before it started
        remote(platform, app, "shout", "second")
        _wait_for_line(proc, lines, "shouting second")  # and what comes afterwards: it keeps streaming
        assert proc.poll() is None, "`logs --follow` must keep running"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_stopped_app_cannot_be_called(platform: Platform) -> None:
    app = f"res-stop-{ID}"
    path = platform.write_app("res_stop", CLI_APP.format(app=app))
    platform.cli("deploy", str(path))
    remote(platform, app, "shout", "before stop")
    stopped = platform.cli("app", "stop", app)
    assert app in stopped.stdout
    assert app not in platform.cli("app", "list").stdout
    assert app not in platform.cli("container", "list").stdout

    proc = platform.python(
        f"""
        import warmboot
        warmboot.Function.from_name({app!r}, "shout").remote("after stop")
        """,
        check=False,
    )
    assert proc.returncode != 0
    error = flat(proc.stderr.strip().splitlines()[-1])
    assert "NotFoundError" in error, proc.stderr
    assert app in error
    assert "no deployed app" in error or "not running" in error, error

    again = platform.cli("app", "stop", app, check=False)
    assert again.returncode != 0
    assert app in flat(again.stderr)


def test_server_status_reports_running(platform: Platform) -> None:
    status = platform.cli("server", "status")
    assert "Server running" in status.stdout
    assert str(platform.home) in flat(status.stdout)


def test_deployed_app_survives_server_restart(platform: Platform) -> None:
    app = f"res-restart-{ID}"
    path = platform.write_app("res_restart", CLI_APP.format(app=app))
    platform.cli("deploy", str(path))
    before = remote(platform, app, "shout", "before restart")

    platform.stop_server()
    try:
        status = platform.cli("server", "status", check=False)
        assert status.returncode == 3
        assert "Server not running" in status.stdout
    finally:
        platform.start_server()
    assert "Server running" in platform.cli("server", "status").stdout

    assert app in platform.cli("app", "list").stdout
    after = remote(platform, app, "shout", "after restart")
    assert after != before, "the restarted server runs a new container"
    assert "shouting after restart" in platform.cli("logs", app).stdout


# ----- help ------------------------------------------------------------------------------------------------

COMMANDS = [
    ["run"],
    ["deploy"],
    ["logs"],
    ["doctor"],
    ["app", "list"],
    ["app", "stop"],
    ["container", "list"],
    ["secret", "create"],
    ["secret", "list"],
    ["server", "start"],
    ["server", "stop"],
    ["server", "status"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_an_example(platform: Platform, command: list[str]) -> None:
    proc = platform.cli(*command, "--help")
    assert proc.returncode == 0
    assert "Example" in proc.stdout, proc.stdout
