"""A server killed with SIGKILL mid-call and mid-spawn: what its callers hear, and what the next server does.

A server of its own (the session's shared one must not be killed). Functions tell the test where they are by
writing marker files into a volume, which the test reads on the host.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_helpers import Platform

APP = "crashy"
SOURCE = """
import os, time
import warmboot as modal

app = modal.App("crashy")
marks = modal.Volume.from_name("crashy-marks", create_if_missing=True)


@app.function(volumes={"/marks": marks}, max_containers=1)
def hold(name: str) -> str:
    # Tell the test this input is running, then run until the test lets it go (the file "release-<name>").
    open(f"/marks/running-{name}", "w").close()
    while not os.path.exists(f"/marks/release-{name}"):
        time.sleep(0.02)
    return f"done {name}"
"""


def wait_until(what: str, check: object, timeout: float = 120.0) -> None:
    """Poll a condition the system under test brings about (a file, a process gone), with a deadline."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture
def crashy() -> Iterator[Platform]:
    platform = Platform()
    platform.start_server()
    platform.cli("deploy", str(platform.write_app("crashy", SOURCE)))
    yield platform
    platform.close()


def marks(platform: Platform) -> Path:
    return platform.home / "volumes" / "crashy-marks"


def kill_server(platform: Platform) -> None:
    """SIGKILL: no shutdown hooks, no chance to stop containers or record anything."""
    assert platform.server is not None
    platform.server.send_signal(signal.SIGKILL)
    platform.server.wait(timeout=30)
    platform.server = None
    (platform.home / "server.sock").unlink(missing_ok=True)  # so start_server waits for the new one


def container_pids(platform: Platform) -> list[int]:
    listing = platform.python(
        """
        import json
        from warmboot.sdk import client
        print(json.dumps([c["pid"] for c in client.request("container_list")]))
        """
    )
    return json.loads(listing.stdout.strip().splitlines()[-1])


def test_spawned_calls_across_a_server_kill(crashy: Platform) -> None:
    spawned = crashy.python(
        """
        import json, warmboot
        hold = warmboot.Function.from_name("crashy", "hold")
        print(json.dumps([hold.spawn("first").object_id, hold.spawn("second").object_id]))
        """
    )
    first, second = json.loads(spawned.stdout.strip().splitlines()[-1])
    wait_until("the first call runs", (marks(crashy) / "running-first").exists)
    old_containers = container_pids(crashy)
    assert len(old_containers) == 1, "max_containers=1: the second call waits in the queue"

    kill_server(crashy)
    assert all(alive(pid) for pid in old_containers), "the container outlives a SIGKILLed server"
    crashy.start_server()
    # The new server stops what the dead one left running ...
    assert not any(alive(pid) for pid in old_containers), "a container left by the dead server still runs"
    assert "left by a previous server" in (crashy.home / "test-server.log").read_text()

    # ... the call that was running ends with a clear error, and the queued one runs on a fresh container.
    wait_until("the queued call runs", (marks(crashy) / "running-second").exists)
    (marks(crashy) / "release-second").touch()
    results = crashy.python(
        f"""
        import json, warmboot
        out = []
        for call_id in ({first!r}, {second!r}):
            try:
                out.append(["ok", warmboot.FunctionCall.from_id(call_id).get(timeout=120)])
            except Exception as exc:
                out.append([type(exc).__name__, str(exc)])
        print(json.dumps(out))
        """
    )
    (first_kind, first_text), (second_kind, second_text) = json.loads(results.stdout.strip().splitlines()[-1])
    assert first_kind == "ServerRestartedError", first_text
    assert "the server restarted while this call ran" in first_text
    assert (second_kind, second_text) == ("ok", "done second")


def test_a_remote_caller_hears_of_the_kill_and_the_app_serves_again(crashy: Platform) -> None:
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import warmboot
                try:
                    warmboot.Function.from_name("crashy", "hold").remote("sync")
                except Exception as exc:
                    print(type(exc).__name__, exc)
                """
            ),
        ],
        env=crashy.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_until("the call runs", (marks(crashy) / "running-sync").exists)
    kill_server(crashy)
    out, _ = caller.communicate(timeout=60)
    assert "ServerError" in out and "the server closed the connection during 'call'" in out, out

    crashy.start_server()
    (marks(crashy) / "release-again").touch()
    again = crashy.python(
        """
        import warmboot
        print(warmboot.Function.from_name("crashy", "hold").remote("again"))
        """
    )
    assert again.stdout.strip().splitlines()[-1] == "done again"
    # The deployed app came back with the server; the interrupted .remote() left nothing fetchable behind
    # that would grow without bound: a finished .remote() is forgotten once delivered.
    assert "crashy" in crashy.cli("app", "list").stdout


def test_a_graceful_stop_is_not_a_crash(crashy: Platform) -> None:
    """`warmboot server stop` runs @exit hooks and stops containers itself: the next start finds nothing left."""
    crashy.python('import warmboot; warmboot.Function.from_name("crashy", "hold").spawn("idle")')
    wait_until("the call runs", (marks(crashy) / "running-idle").exists)
    (marks(crashy) / "release-idle").touch()
    pids = container_pids(crashy)
    crashy.restart_server()
    assert not any(alive(pid) for pid in pids)
    assert "left by a previous server" not in (crashy.home / "test-server.log").read_text()
