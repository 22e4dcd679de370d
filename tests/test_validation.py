"""Bad inputs are refused with an error that names the option, in the SDK and again by the real server.

The fast layer checks the rules (``warmboot.validation``) directly; the platform layer sends requests the SDK
would have refused straight to a real server's socket, and checks the server refuses them too and keeps serving.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

import pytest
from platform_helpers import Platform

import warmboot as modal
from warmboot import validation
from warmboot.errors import InvalidOptionError

BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"timeout": float("inf")}, "timeout= must be a finite number"),
    ({"timeout": float("nan")}, "timeout= must be a finite number"),
    ({"timeout": 1e300}, "timeout=1e+300 is out of range"),
    ({"timeout": 0.5}, "timeout=0.5 is out of range"),
    ({"timeout": True}, "timeout= must be a finite number"),
    ({"timeout": "60"}, "timeout= must be a finite number"),
    ({"scaledown_window": -1}, "scaledown_window=-1 is out of range"),
    ({"env": {"A": 1}}, "the value of A must be a string"),
    ({"env": {"": "x"}}, "'' is not a valid variable name"),
    ({"env": {"A=B": "x"}}, "'A=B' is not a valid variable name"),
    ({"env": {"1A": "x"}}, "'1A' is not a valid variable name"),
    ({"env": {"A": "x\0y"}}, "contains a NUL character"),
    ({"env": ["A"]}, "must be a dict of names to strings"),
    ({"volumes": {"/": modal.Volume.from_name("v")}}, "mount point '/' must be a normalised path other than '/'"),
    ({"volumes": {"/usr/lib/x": modal.Volume.from_name("v")}}, "would hide the image's /usr"),
    ({"volumes": {"/etc": modal.Volume.from_name("v")}}, "would hide the image's /etc"),
    ({"volumes": {"/root": modal.Volume.from_name("v")}}, "would hide the image's /root"),
    ({"volumes": {"/tmp": modal.Volume.from_name("v")}}, "would hide the image's /tmp"),
    ({"volumes": {"/__warmboot/lib": modal.Volume.from_name("v")}}, "would hide the image's /__warmboot"),
    ({"volumes": {"/data/../etc": modal.Volume.from_name("v")}}, "must be a normalised path"),
    ({"volumes": {"data": modal.Volume.from_name("v")}}, "must be an absolute path"),
]


@pytest.mark.parametrize(("options", "message"), BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_bad_function_options_are_refused_at_decoration(options: dict[str, Any], message: str) -> None:
    app = modal.App("validation")
    with pytest.raises(InvalidOptionError) as caught:
        app.function(**options)(lambda: None)
    assert message in str(caught.value), str(caught.value)
    assert "@app.function" in str(caught.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("a" * 65, "has 65 characters; at most 64"),
        ("", "must be a non-empty string"),
        ("has space", "use letters, digits"),
        ("new\nline", "use letters, digits"),
        ("../server", "use letters, digits"),
        ("-leading", "use letters, digits"),
        (42, "must be a non-empty string"),
    ],
)
def test_bad_names_are_refused(value: Any, message: str) -> None:
    for make in (modal.App, modal.Secret.from_name, modal.Volume.from_name):
        with pytest.raises(InvalidOptionError) as caught:
            make(value)
        assert message in str(caught.value)


def test_good_values_pass_unchanged() -> None:
    assert validation.name("app", "my-app_1.2") == "my-app_1.2"
    assert validation.timeout("timeout", 1) == 1.0 and validation.timeout("timeout", 86400) == 86400.0
    assert validation.environment("env", {"HF_HOME": "/root/.cache", "_X1": ""}) == {
        "HF_HOME": "/root/.cache",
        "_X1": "",
    }
    assert validation.mount_point("volumes", "/root/.cache/huggingface") == "/root/.cache/huggingface"
    assert validation.mount_point("volumes", "/data/") == "/data"
    assert not math.isnan(validation.timeout("t", 3.5))


def test_bad_secret_values_are_refused() -> None:
    with pytest.raises(InvalidOptionError, match="not a valid variable name"):
        modal.Secret.from_dict({"A=B": "x"})
    with pytest.raises(InvalidOptionError, match="must be a string"):
        modal.Secret.from_dict({"TOKEN": 123})


# ----- the server refuses what a client other than our SDK might send -------------------------------------------


def _spec(**options: Any) -> dict[str, Any]:
    """A deploy spec as the SDK makes it, with ``options`` forced in after the SDK's own checks."""
    app = modal.App("placeholder")
    app.function()(_nothing)
    spec = app.spec()
    fspec = spec["functions"]["_nothing"]
    for key, value in options.items():
        if key in ("volumes", "secrets"):
            fspec[key] = value
        else:
            fspec["options"][key] = value
    return spec


def _nothing() -> None:
    return None


def _deploy_request(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "spec": spec, "source": b"x = 1\n", "filename": "placeholder.py"}


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("n" * 300, {}, "has 300 characters; at most 64"),
        ("bad\nname", {}, "app name 'bad\\nname'"),
        ("ok-name", {"timeout": float("inf")}, "timeout= must be a finite number"),
        ("ok-name", {"timeout": 1e300}, "out of range"),
        ("ok-name", {"env": {"A": 5}}, "the value of A must be a string"),
        ("ok-name", {"volumes": {"/": {"name": "v", "create_if_missing": True}}}, "other than '/'"),
        ("ok-name", {"secrets": [{"values": {"": "x"}}]}, "not a valid variable name"),
        ("ok-name", {"secrets": [{"name": "../state"}]}, "secret name '../state'"),
    ],
)
def test_server_refuses_bad_deploys_and_keeps_serving(
    platform: Platform, name: str, options: dict[str, Any], message: str
) -> None:
    from warmboot.sdk import client

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WARMBOOT_HOME", str(platform.home))
        with pytest.raises(InvalidOptionError) as caught:
            list(client.stream("deploy", **_deploy_request(name, _spec(**options))))
        assert message in str(caught.value), str(caught.value)
        # Nothing half-deployed, and the server still answers.
        assert client.request("ping")["pid"]
    assert name not in platform.cli("app", "list").stdout


def test_server_refuses_a_logs_request_for_a_path(platform: Platform) -> None:
    proc = platform.cli("logs", "../server", check=False)
    assert proc.returncode != 0
    assert "app name '../server'" in " ".join(proc.stderr.split())


def test_secret_create_refuses_bad_keys(platform: Platform) -> None:
    name = f"s-{uuid.uuid4().hex[:6]}"
    proc = platform.cli("secret", "create", name, "=value", check=False)
    assert proc.returncode != 0, proc.stdout
    assert name not in platform.cli("secret", "list").stdout


def test_connections_past_the_cap_are_refused_and_the_server_recovers() -> None:
    """Each open connection holds a server thread: past WARMBOOT_MAX_CONNECTIONS a client is told, not queued."""
    from multiprocessing.connection import Client

    from warmboot.errors import ServerError

    platform = Platform(extra_env={"WARMBOOT_MAX_CONNECTIONS": "3"})
    platform.start_server()
    sock = str(platform.home / "server.sock")
    idle = []
    try:
        idle = [Client(sock, family="AF_UNIX") for _ in range(3)]  # held open, never sending: three threads
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("WARMBOOT_HOME", str(platform.home))
            from warmboot.sdk import client

            with pytest.raises(ServerError, match="the server is busy: 3 connections are open"):
                client.request("ping")
            for conn in idle:
                conn.close()
            idle = []
            # The threads give their slots back as they see the connections close: wait for that, with a deadline.
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert client.request("ping")["pid"]
                    break
                except ServerError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
    finally:
        for conn in idle:
            conn.close()
        platform.close()
