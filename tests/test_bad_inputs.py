"""Functions that abuse their channels, and bad inputs to the server and the CLI: each ends in a clear error.

Two halves, on a real server with real containers:

- **Abusive functions** write garbage to every fd they hold, half a control frame, a frame out of turn (a
  ``ready`` during a call), or a well-formed result for another call onto fd 4 (the control pipe out, framed as
  in ``warmboot/runtime/wire.py``: two big-endian u32 lengths, a JSON object, raw bytes). Each call ends, by
  itself and before its ``timeout=`` unless it merely stalls, with an error that says what happened; the next
  call of the same function gets its own result from a fresh container, and the app's other functions answer.
- **Bad inputs** that reach the real CLI or the server's socket: each is refused with an error naming the
  culprit, nothing is half done, and the same server process answers afterwards.

One app is deployed for the module; the SDK runs in this process with ``WARMBOOT_HOME`` pointed at the
platform's home (the ``sdk`` fixture), the CLI as a real subprocess.
"""

from __future__ import annotations

import math
import re
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from platform_helpers import Platform

import warmboot as modal
from warmboot.errors import (
    ContainerBootError,
    ContainerCrashedError,
    FunctionTimeoutError,
    InvalidOptionError,
    NotFoundError,
    WarmbootError,
)

ID = uuid.uuid4().hex[:8]
APP = f"bad-inputs-{ID}"

# The app every test here calls. Its helpers speak the container's control protocol by hand, as a function
# that wants to fool the worker would. Every abusive function takes (mode, x): mode None is the clean call.
APP_SOURCE = '''
import json, os, pickle, struct, sys, threading
import warmboot as modal

app = modal.App({app!r})


def frame(message, blobs=None):
    """One control frame as warmboot/runtime/wire.py writes it: two big-endian u32 lengths, JSON, raw bytes."""
    header = dict(message)
    if blobs:
        header["_binary"] = {{key: len(value) for key, value in blobs.items()}}
    body = json.dumps(header).encode()
    payload = b"".join((blobs or {{}}).values())
    return struct.pack(">II", len(body), len(payload)) + body + payload


def own_call_id():
    """The id of the call being served, read from the runtime's frames (any code in the container can)."""
    f = sys._getframe()
    while f is not None:
        call_id = f.f_locals.get("call_id")
        message = f.f_locals.get("message")
        if isinstance(call_id, str) and call_id.startswith("fc-"):
            return call_id
        if isinstance(getattr(message, "call_id", None), str):
            return message.call_id
        f = f.f_back
    raise LookupError("no call id on the stack")


def stall():
    threading.Event().wait()  # only the worker stopping the container ends this


JUNK = b"\\x00\\xff\\xfe junk \\x1b[2J\\x1b]0;pwned\\x07 [bold]markup[/bold] \\r\\x08\\xc2\\x9b end"

# Lies told while the container boots, before the runtime announces its snapshot point.
if os.environ.get("WARMBOOT_TAG") == "boot_liar":
    os.write(4, frame({{"type": "ready"}}))
if os.environ.get("WARMBOOT_TAG") == "boot_garbage":
    os.write(4, b"garbage!" + JUNK)


@app.function()
def ok(x):
    return x + 1


@app.function()
def returns_lock():
    return threading.Lock()


@app.cls()
class Model:
    @modal.method()
    def predict(self, x):
        return x * 10


def drained(*fds):
    """Wait until the worker has read what this container wrote to these pipes (FIONREAD: bytes not yet read)."""
    import fcntl, termios, time
    for fd in fds:
        try:
            while struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\\0" * 4))[0]:
                time.sleep(0.005)
        except OSError:
            pass


@app.function(timeout=60)
def garbage(mode, x):
    """Garbage on stdout and stderr, then on every other fd it holds, fd 4 (the control pipe out) last."""
    if mode is not None:
        print(f"garbage-begin stdout {{x}}", flush=True)
        print(f"garbage-begin stderr {{x}}", file=sys.stderr, flush=True)
        os.write(1, JUNK + b"\\n" + b"x" * 65536 + b"\\n" + JUNK + b"\\n")
        os.write(2, JUNK + b"\\n")
        tried = []
        for name in sorted(os.listdir("/proc/self/fd"), key=int):
            if int(name) in (1, 2, 4):
                continue
            try:
                os.write(int(name), JUNK)
                tried.append(f"{{name}}:written")
            except OSError as exc:
                tried.append(f"{{name}}:{{exc.strerror.replace(' ', '-')}}")
        print(f"garbage-end {{x}} fds {{' '.join(tried)}}", flush=True)
        drained(1, 2)  # its output is in the log before the worker hears the garbage below and stops it
        os.write(4, b"garbage!" + JUNK)  # b"garb" as a length: a JSON part of 1.7 GB
        if mode == "stall":
            stall()
    return f"real {{x}}"


@app.function(timeout=60)
def last_words(mode, x):
    """A lot of output, then a protocol violation at once: the worker stops it with its output still unread."""
    if mode is not None:
        import fcntl
        try:
            fcntl.fcntl(1, 1031, 1 << 20)  # F_SETPIPE_SZ: room for all of it, so the writes below never block
        except OSError:
            pass
        os.write(1, b"".join(b"line %06d of the output before the violation\\n" % i for i in range(8000)))
        os.write(1, f"last-words {{x}}\\n".encode())
        os.write(4, b"garbage!")
    return f"real {{x}}"


@app.function(timeout=3)
def half_result(mode, x):
    if mode is not None:
        whole = frame({{"type": "result", "call_id": own_call_id(), "ok": True}}, {{"value": pickle.dumps("forged")}})
        os.write(4, whole[: len(whole) // 2])
        stall()
    return f"real {{x}}"


@app.function(timeout=60)
def out_of_turn(mode, x):
    """A complete, well-formed frame of a type the worker does not expect during a call, then a stall."""
    if mode is not None:
        extra = {{
            "init_error": {{"phase": "import", "traceback": "forged traceback"}},
            "start": {{"container_id": "wc-forged"}},
        }}.get(mode, {{}})
        os.write(4, frame({{"type": mode, **extra}}))
        stall()
    return f"real {{x}}"


@app.function(timeout=60)
def mistyped_result(mode, x):
    """A result for its own call whose fields have the wrong types."""
    if mode is not None:
        os.write(4, frame({{"type": "result", "call_id": own_call_id(), "ok": "yes", "message": 5}}))
        stall()
    return f"real {{x}}"


@app.function(timeout=60, max_containers=1)
def fake_result(mode, x):
    """A well-formed result frame for another call, carrying a value its caller must never see."""
    if mode is not None:
        forged = {{"type": "result", "call_id": "fc-forged00000000", "ok": True}}
        os.write(4, frame(forged, {{"value": pickle.dumps("forged")}}))
        if mode == "stall":
            stall()
    return f"real {{x}}"


@app.function(timeout=60, max_containers=1)
def double_reply(mode, x):
    """Answers its own call twice: a reply of its own first, then the runtime's. The second stays in the pipe."""
    if mode is not None:
        early = {{"type": "result", "call_id": own_call_id(), "ok": True}}
        os.write(4, frame(early, {{"value": pickle.dumps(f"early {{x}}")}}))
    return f"real {{x}}"


@app.function()
def forge_log_line(mode, x):
    """Output with a carriage return, then what looks like one of warmboot's own log lines."""
    if mode is not None:
        os.write(1, f"innocent output\\r2026-01-01T00:00:00 [warmboot] Deployed app forged-{{x}}\\n".encode())
    return f"real {{x}}"


@app.function()
def boot_liar(mode, x):
    return f"real {{x}}"


@app.function()
def boot_garbage(mode, x):
    return f"real {{x}}"
'''

#: How long a test waits for a call that must end by itself (far past every function's own timeout).
CALL_WAIT_S = 120


@pytest.fixture(scope="module")
def server_log_start(platform: Platform) -> int:
    """Where the server's log stood before this module's first request."""
    return (platform.home / "test-server.log").stat().st_size


@pytest.fixture(scope="module")
def app(platform: Platform, server_log_start: int) -> str:
    path = platform.write_app(f"bad_inputs_{ID}", APP_SOURCE.format(app=APP))
    platform.cli("deploy", str(path))
    return APP


@pytest.fixture
def sdk(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The SDK's client, talking to the platform's server from this process."""
    monkeypatch.setenv("WARMBOOT_HOME", str(platform.home))
    from warmboot.sdk import client

    return client


def assert_still_serving(platform: Platform, client: ModuleType) -> None:
    """The same server process answers (it neither died nor was restarted)."""
    assert platform.server is not None and platform.server.poll() is None, "the server process exited"
    assert client.request("ping")["pid"] == platform.server.pid


def fn(app: str, name: str) -> modal.Function:
    return modal.Function.from_name(app, name)


def remote(f: modal.Function, *args: Any) -> Any:
    """``f.remote(*args)``, with a deadline on this side: a call that hangs fails the test instead of holding it."""
    return f.spawn(*args).get(timeout=CALL_WAIT_S)


def flat(text: str) -> str:
    """``text`` with its runs of whitespace (Rich's line wrapping) made single spaces."""
    return " ".join(text.split())


# ===== part 1: functions that abuse their channels =====================================================


@dataclass(frozen=True)
class Abuse:
    id: str
    function: str
    mode: str
    error: type[WarmbootError]
    says: tuple[str, ...]  #: fragments the error message must hold
    clean_after: bool = True  #: the next, clean call of the same function returns its own result


ABUSES = [
    Abuse("garbage-on-every-fd", "garbage", "write", ContainerCrashedError,
          ("wrote a malformed control message", "exceeds", "it was stopped")),
    Abuse("garbage-then-stall", "garbage", "stall", ContainerCrashedError,
          ("wrote a malformed control message", "it was stopped")),
    Abuse("half-a-result-frame-then-stall", "half_result", "half", FunctionTimeoutError,
          ("half_result call fc-", "exceeded its timeout of 3 s", "the container was stopped")),
    Abuse("ready-during-a-call", "out_of_turn", "ready", ContainerCrashedError,
          ("answered call fc-", "with a 'ready' message", "it was stopped")),
    Abuse("snapshot-point-during-a-call", "out_of_turn", "snapshot_point", ContainerCrashedError,
          ("with a 'snapshot_point' message", "it was stopped")),
    Abuse("init-error-during-a-call", "out_of_turn", "init_error", ContainerCrashedError,
          ("with a 'init_error' message", "it was stopped")),
    Abuse("a-worker-message-from-the-container", "out_of_turn", "start", ContainerCrashedError,
          ("with a 'start' message", "it was stopped")),
    Abuse("unknown-message-type", "out_of_turn", "bogus", ContainerCrashedError,
          ("malformed control message", "unknown message type 'bogus'", "it was stopped")),
    Abuse("result-with-mistyped-fields", "mistyped_result", "mistyped", ContainerCrashedError,
          ("malformed control message", "it was stopped")),
    Abuse("fake-result-for-another-call", "fake_result", "forge", ContainerCrashedError,
          ("answered call fc-", "for call 'fc-forged00000000'", "it was stopped")),
    Abuse("fake-result-then-stall", "fake_result", "stall", ContainerCrashedError,
          ("for call 'fc-forged00000000'", "it was stopped")),
    Abuse("ready-before-the-snapshot-point", "boot_liar", "boot", ContainerBootError,
          ("bad-inputs-", "boot_liar", "'snapshot_point'", "'ready'"), clean_after=False),
    Abuse("garbage-while-booting", "boot_garbage", "boot", ContainerBootError,
          ("boot_garbage", "malformed control message", "it was stopped"), clean_after=False),
]  # fmt: skip


@pytest.mark.parametrize("abuse", ABUSES, ids=[a.id for a in ABUSES])
def test_a_function_abusing_its_channels_ends_with_a_clear_error(
    platform: Platform, app: str, sdk: ModuleType, abuse: Abuse
) -> None:
    f = fn(app, abuse.function)
    abusive = f.spawn(abuse.mode, 1)
    assert remote(fn(app, "ok"), 41) == 42, "other calls are served while it runs"
    with pytest.raises(WarmbootError) as caught:
        abusive.get(timeout=CALL_WAIT_S)
    # The worker's verdict, not the caller's own deadline, and not something the container made up.
    assert isinstance(caught.value, abuse.error), f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    for fragment in abuse.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "forged" not in message.replace("fc-forged00000000", ""), message
    if abuse.clean_after:
        assert remote(f, None, 2) == "real 2", "the next call gets its own result, from a fresh container"
    assert remote(fn(app, "ok"), 41) == 42, "the app's other functions still answer"
    assert_still_serving(platform, sdk)


def test_garbage_output_leaves_the_logs_readable(platform: Platform, app: str, sdk: ModuleType) -> None:
    marker = uuid.uuid4().hex[:8]
    with pytest.raises(ContainerCrashedError, match="malformed control message"):
        remote(fn(app, "garbage"), "write", marker)
    shown = platform.cli("logs", app)
    out = shown.stdout
    assert f"garbage-begin stdout {marker}" in out and f"garbage-begin stderr {marker}" in out, out[-2000:]
    end = re.search(rf"garbage-end {marker} fds (.*)", out)
    assert end is not None, out[-2000:]
    tried = dict(entry.split(":", 1) for entry in end.group(1).split())
    assert {"0", "3"} <= set(tried), f"the function tried stdin and the control pipe in: {tried}"
    assert "junk" in out and "pwned" in out and "[bold]markup[/bold]" in out, "the printable part is shown as is"
    assert "\\x1b[2J" in out, "an escape sequence is shown as text"
    assert f"garbage-begin stdout {marker}" in platform.log_text(app), "the log file is text (UTF-8)"
    # A terminal shows none of the container's control characters as such: no escape sequence reaches it.
    controls = sorted({hex(ord(c)) for c in out if (ord(c) < 0x20 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0})
    assert controls == [], f"`warmboot logs` passed the container's control characters to the terminal: {controls}"
    assert "Traceback" not in shown.stderr
    assert_still_serving(platform, sdk)


def test_a_fake_result_never_reaches_a_caller(platform: Platform, app: str, sdk: ModuleType) -> None:
    """The forged value goes to no one: not to the call that forged it, not to the next one."""
    f = fn(app, "fake_result")
    first = f.spawn("forge", 1)
    with pytest.raises(ContainerCrashedError, match="it was stopped"):
        first.get(timeout=CALL_WAIT_S)
    calls = [f.spawn(None, x) for x in range(2, 5)]
    assert [c.get(timeout=CALL_WAIT_S) for c in calls] == ["real 2", "real 3", "real 4"]
    with pytest.raises(ContainerCrashedError, match="it was stopped"):
        first.get(timeout=CALL_WAIT_S)  # fetched again: still its own error
    assert_still_serving(platform, sdk)


def test_a_second_reply_left_in_the_pipe_never_reaches_the_next_caller(
    platform: Platform, app: str, sdk: ModuleType
) -> None:
    """A function answers its own call twice; the worker reads one reply, the other waits in the pipe. The next
    caller (same function, at most one container) gets its own result, not what was left there."""
    f = fn(app, "double_reply")
    assert remote(f, "twice", 1) in ("early 1", "real 1"), "its own call gets one of its own replies"
    assert remote(f, None, 2) == "real 2"
    assert remote(f, None, 3) == "real 3"
    assert remote(fn(app, "ok"), 41) == 42
    assert_still_serving(platform, sdk)


def test_a_container_cannot_forge_a_log_line(platform: Platform, app: str, sdk: ModuleType) -> None:
    marker = uuid.uuid4().hex[:8]
    assert remote(fn(app, "forge_log_line"), "forge", marker) == f"real {marker}"
    deadline = time.monotonic() + 30
    while f"forged-{marker}" not in platform.log_text(app):  # the worker writes output as it comes
        assert time.monotonic() < deadline, "the function's output never reached the log"
        time.sleep(0.05)
    try:
        lines = [line for line in platform.cli("logs", app).stdout.splitlines() if f"forged-{marker}" in line]
        assert lines, "the output is shown"
        assert all("[forge_log_line wc-" in line for line in lines), lines
    finally:
        assert_still_serving(platform, sdk)


def test_output_written_before_a_violation_reaches_the_log(platform: Platform, app: str, sdk: ModuleType) -> None:
    marker = uuid.uuid4().hex[:8]
    with pytest.raises(ContainerCrashedError, match="malformed control message"):
        remote(fn(app, "last_words"), "flood", marker)
    try:
        out = platform.cli("logs", app).stdout
        assert f"last-words {marker}" in out, out[-1000:]
    finally:
        assert_still_serving(platform, sdk)


# ===== part 2: bad inputs through the CLI ===============================================================

PLAIN_APP = """
import warmboot as modal

app = modal.App({name!r})


@app.function({options})
def f():
    return 1
"""


def _app_file(options: str) -> str:
    return PLAIN_APP.format(name=f"bi-never-{ID}", options=options)


@dataclass(frozen=True)
class CliCase:
    id: str
    argv: tuple[str, ...]  #: "{dir}" is the case's own directory, "{file}" its app file
    says: tuple[str, ...]
    source: str | None = None  #: the app file's source (written as {file})
    filename: str = "app.py"


NEVER = f"bi-never-{ID}"
CLI_CASES = [
    CliCase("deploy-a-missing-file", ("deploy", "{dir}/missing.py"), ("no such app file:", "missing.py")),
    CliCase("deploy-a-file-that-is-not-python", ("deploy", "{file}"), ("is not a Python file (.py)",),
            source="hello\n", filename="notes.txt"),
    CliCase("deploy-a-syntax-error", ("deploy", "{file}"), ("syntax error in", "line 2"),
            source="import warmboot\nx = (\n"),
    CliCase("deploy-a-file-with-no-app", ("deploy", "{file}"),
            ("defines no warmboot App", "app = warmboot.App('name')"), source="import warmboot\nx = 1\n"),
    CliCase("deploy-a-file-with-two-unnamed-apps", ("deploy", "{file}"),
            ("defines 2 Apps; name the one to use `app`",),
            source="import warmboot\na = warmboot.App('bi-a')\nb = warmboot.App('bi-b')\n"),
    CliCase("deploy-a-file-that-raises", ("deploy", "{file}"),
            ("raised RuntimeError while being imported", "boom at import"),
            source="raise RuntimeError('boom at import')\n"),
    CliCase("deploy-an-app-with-no-functions", ("deploy", "{file}"),
            (f"app '{NEVER}' defines no @app.function or @app.cls: nothing to deploy",),
            source=f"import warmboot\napp = warmboot.App({NEVER!r})\n"),
    CliCase("deploy-max_inputs-0", ("deploy", "{file}"),
            ("@app.function: max_inputs= is how many inputs", "(1 or more, or None), got 0", "line 7"),
            source=_app_file("max_inputs=0")),
    CliCase("deploy-retries-negative", ("deploy", "{file}"),
            ("retries= must be a non-negative integer, got -1",), source=_app_file("retries=-1")),
    CliCase("deploy-max_containers-0", ("deploy", "{file}"),
            ("max_containers= must be at least 1",), source=_app_file("max_containers=0")),
    CliCase("deploy-min-above-max-containers", ("deploy", "{file}"),
            ("min_containers=3 exceeds max_containers=2",), source=_app_file("min_containers=3, max_containers=2")),
    CliCase("deploy-memory-negative", ("deploy", "{file}"),
            ("memory= is a number of MiB, got -5",), source=_app_file("memory=-5")),
    CliCase("deploy-cpu-0", ("deploy", "{file}"),
            ("cpu= is a number of cores (e.g. 0.5 or 2), got 0",), source=_app_file("cpu=0")),
    CliCase("deploy-gpu-nonsense", ("deploy", "{file}"),
            (f"{NEVER}.f: gpu='nonsense' cannot be honoured",), source=_app_file("gpu='nonsense'")),
    CliCase("deploy-a-misspelt-option", ("deploy", "{file}"),
            ("got unknown option(s) 'gpus'; valid options are:",), source=_app_file("gpus='h100'")),
    CliCase("deploy-with-a-missing-volume", ("deploy", "{file}"),
            (f"volume 'bi-novol-{ID}' (for /data) does not exist",
             "use Volume.from_name(name, create_if_missing=True)"),
            source=_app_file(f"volumes={{'/data': modal.Volume.from_name('bi-novol-{ID}')}}")),
    CliCase("deploy-with-a-missing-secret", ("deploy", "{file}"),
            (f"no secret named 'bi-nosecret-{ID}'", f"create it with `warmboot secret create bi-nosecret-{ID}"),
            source=_app_file(f"secrets=[modal.Secret.from_name('bi-nosecret-{ID}')]")),
    CliCase("deploy-under-an-app-id-name", ("deploy", "{file}", "--name", "ap-123"),
            ("app name 'ap-123': names may not start with 'ap-'",), source=_app_file("")),
    CliCase("run-a-missing-file", ("run", "{dir}/missing.py"), ("no such app file:",)),
    CliCase("run-a-missing-entrypoint", ("run", "{file}::nope"),
            ("has no entrypoint or function 'nope' (it has: f)",), source=_app_file("")),
    CliCase("run-without-an-entrypoint", ("run", "{file}"),
            ("has no @app.local_entrypoint(); name a function to call:", "::NAME"), source=_app_file("")),
    CliCase("run-a-class", ("run", "{file}::Model"), ("Model is a class", "@app.local_entrypoint()"),
            source=_app_file("") + "\n\n@app.cls()\nclass Model:\n    @modal.method()\n    def m(self):\n"
            "        return 1\n"),
    CliCase("secret-create-without-pairs", ("secret", "create", f"bi-s-{ID}"), ("Missing argument 'pairs'",)),
    CliCase("secret-create-without-equals", ("secret", "create", f"bi-s-{ID}", "novalue"),
            ("'novalue' is not KEY=VALUE",)),
    CliCase("secret-create-bad-key", ("secret", "create", f"bi-s-{ID}", "1A=x"),
            ("'1A' is not a valid variable name",)),
    CliCase("secret-create-bad-name", ("secret", "create", "bad name", "A=x"),
            ("secret name 'bad name': use letters, digits",)),
    CliCase("logs-of-an-unknown-app", ("logs", NEVER),
            (f"no logs for an app named '{NEVER}'", "`warmboot app list` shows the apps")),
    CliCase("logs-of-an-unknown-app-id", ("logs", "ap-0000000000000000"), ("no app with id ap-0000000000000000",)),
    CliCase("stop-an-unknown-app", ("app", "stop", NEVER),
            (f"no deployed app named '{NEVER}'", "deploy it with `warmboot deploy FILE`")),
    CliCase("snapshot-rm-an-unknown-key", ("snapshot", "rm", "ffffffffffff0000"),
            ("snapshot ffffffffffff0000: no snapshot with that key or id",)),
    CliCase("snapshot-rm-an-empty-key", ("snapshot", "rm", ""),
            ("not an empty key", "`warmboot snapshot list` shows them")),
    CliCase("volume-put-a-missing-path", ("volume", "put", f"bi-vol-{ID}", "{dir}/missing"),
            ("no such file or directory:", "missing")),
    CliCase("volume-put-outside-the-volume", ("volume", "put", f"bi-vol-{ID}", "{file}", "../../escaped.py"),
            ("../../escaped.py leaves the volume",), source="x = 1\n"),
    CliCase("volume-put-a-bad-volume-name", ("volume", "put", "bad name", "{file}"),
            ("volume name 'bad name': use letters, digits",), source="x = 1\n"),
]  # fmt: skip


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_a_bad_cli_input_is_refused_clearly(platform: Platform, sdk: ModuleType, case: CliCase) -> None:
    where = platform.apps_dir / f"cli-{case.id}"
    where.mkdir(exist_ok=True)
    file = where / case.filename
    if case.source is not None:
        file.write_text(case.source)
    argv = [arg.format(dir=where, file=file) for arg in case.argv]
    proc = platform.cli(*argv, check=False, timeout=120)
    said = flat(proc.stderr + proc.stdout)
    assert proc.returncode != 0, said
    for fragment in case.says:
        assert fragment in said, f"{fragment!r} not in {said!r}"
    assert "Traceback" not in said and "internal error" not in said, said
    assert NEVER not in {a["name"] for a in sdk.request("app_list")}, "nothing half-deployed"
    assert not (platform.home / "escaped.py").exists() and not (platform.home / "volumes" / "escaped.py").exists()
    assert_still_serving(platform, sdk)


# ===== part 2: bad inputs through the SDK ===============================================================


@pytest.fixture(scope="module")
def stopped_app(platform: Platform) -> tuple[str, str]:
    """An app that was deployed and then stopped: (name, its app id)."""
    name = f"bi-stopped-{ID}"
    platform.cli("deploy", str(platform.write_app(f"bi_stopped_{ID}", PLAIN_APP.format(name=name, options=""))))
    listing = platform.cli("app", "list").stdout
    app_id = next(m.group(0) for line in listing.splitlines() if name in line for m in re.finditer(r"ap-\w+", line))
    platform.cli("app", "stop", name)
    return name, app_id


@pytest.fixture(scope="module")
def local_only_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """A module this process can import and no container has: its objects pickle by reference."""
    import importlib
    import sys

    where = tmp_path_factory.mktemp("local-only")
    name = f"bi_local_only_{ID}"
    (where / f"{name}.py").write_text("class Token:\n    pass\n")
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(where))
        sys.modules.pop(name, None)


@dataclass(frozen=True)
class SdkCase:
    id: str
    act: Callable[[str, dict[str, Any]], Any]  #: (the app's name, what the fixtures made) -> the bad call
    error: type[BaseException]
    says: tuple[str, ...]


def _generator() -> Iterator[int]:
    yield 1


SDK_CASES = [
    SdkCase("a-function-the-app-does-not-have", lambda a, _: fn(a, "nope").remote(1), NotFoundError,
            (f"app '{APP}' has no function or class 'nope'", "(it has: ok, returns_lock, Model,")),
    SdkCase("a-method-the-class-does-not-have", lambda a, _: modal.Cls.from_name(a, "Model")().nope.remote(1),
            NotFoundError, (f"{APP}.Model has no @method() named 'nope' (it has: predict)",)),
    SdkCase("a-function-called-as-a-class", lambda a, _: modal.Cls.from_name(a, "ok")().predict.remote(1),
            InvalidOptionError, (f"{APP}.ok is a function, not a class",)),
    SdkCase("an-app-never-deployed", lambda a, _: fn(NEVER, "f").remote(), NotFoundError,
            (f"no deployed app named '{NEVER}'", "deploy it with `warmboot deploy FILE`")),
    SdkCase("a-stopped-app-by-name", lambda a, x: fn(x["stopped"][0], "f").remote(), NotFoundError,
            (f"no deployed app named 'bi-stopped-{ID}'", "deploy it with `warmboot deploy FILE`")),
    SdkCase("a-stopped-app-by-id",
            lambda a, x: x["client"].call({"app_id": x["stopped"][1], "tag": "f", "method": None}, (), {}),
            NotFoundError, ("is not running (stopped, or an ended `warmboot run`)",)),
    SdkCase("get-an-unknown-call-id", lambda a, _: modal.FunctionCall.from_id("fc-0000000000000000").get(),
            NotFoundError, ("no call fc-0000000000000000: unknown, or its result expired",)),
    SdkCase("a-malformed-call-id", lambda a, _: modal.FunctionCall.from_id("../../etc/passwd").get(),
            InvalidOptionError, ("FunctionCall.from_id: '../../etc/passwd' is not a call id",)),
    SdkCase("a-call-id-that-is-not-a-string", lambda a, _: modal.FunctionCall.from_id({"id": 1}).get(),
            InvalidOptionError, ("FunctionCall.from_id: {'id': 1} is not a call id",)),
    SdkCase("get-with-a-negative-timeout", lambda a, x: x["spawned"].get(timeout=-1), InvalidOptionError,
            ("FunctionCall.get(timeout=): a number of seconds >= 0, or None; got -1",)),
    SdkCase("get-with-a-nan-timeout", lambda a, x: x["spawned"].get(timeout=math.nan), InvalidOptionError,
            ("FunctionCall.get(timeout=): a number of seconds >= 0, or None; got nan",)),
    SdkCase("get-with-a-string-timeout", lambda a, x: x["spawned"].get(timeout="5"), InvalidOptionError,
            ("FunctionCall.get(timeout=): a number of seconds >= 0, or None; got '5'",)),
    SdkCase("an-argument-that-cannot-be-pickled", lambda a, _: fn(a, "ok").remote(threading.Lock()),
            InvalidOptionError, ("argument 0 (lock) cannot be pickled",)),
    SdkCase("a-keyword-argument-that-cannot-be-pickled", lambda a, _: fn(a, "ok").remote(x=_generator()),
            InvalidOptionError, ("argument 'x' (generator) cannot be pickled",)),
    SdkCase("an-argument-the-container-cannot-unpickle",
            lambda a, x: fn(a, "ok").remote(x["local_only"].Token()), ModuleNotFoundError,
            (f"No module named 'bi_local_only_{ID}'",)),
    SdkCase("a-result-that-cannot-be-pickled", lambda a, _: fn(a, "returns_lock").remote(), WarmbootError,
            ("the result (lock) cannot be pickled",)),
    SdkCase("an-unexpected-keyword-argument", lambda a, _: fn(a, "ok").remote(1, zzz=2), TypeError,
            ("ok() got an unexpected keyword argument 'zzz'",)),
    SdkCase("a-class-called-with-positional-arguments", lambda a, _: modal.Cls.from_name(a, "Model")(3),
            InvalidOptionError, ("Model() takes its parameters by keyword only, got 1 positional argument(s)",)),
    SdkCase("local-on-a-function-looked-up-by-name", lambda a, _: fn(a, "ok").local(1), NotFoundError,
            ("ok was looked up by name: its code is not here, use .remote()",)),
]  # fmt: skip


@pytest.mark.parametrize("case", SDK_CASES, ids=[c.id for c in SDK_CASES])
def test_a_bad_sdk_input_is_refused_clearly(
    platform: Platform,
    app: str,
    sdk: ModuleType,
    stopped_app: tuple[str, str],
    local_only_module: ModuleType,
    case: SdkCase,
) -> None:
    spawned = fn(app, "ok").spawn(6)
    made = {"stopped": stopped_app, "client": sdk, "spawned": spawned, "local_only": local_only_module}
    with pytest.raises(case.error) as caught:
        case.act(app, made)
    message = str(caught.value)
    for fragment in case.says:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert "internal error" not in message, message
    assert spawned.get(timeout=CALL_WAIT_S) == 7, "a call in flight is unharmed"
    assert_still_serving(platform, sdk)


def test_a_class_called_as_a_function_says_it_is_a_class(platform: Platform, app: str, sdk: ModuleType) -> None:
    try:
        with pytest.raises(WarmbootError) as caught:
            fn(app, "Model").remote(1)
        message = str(caught.value)
        assert "None" not in message, message
        assert "is a class" in message and "Cls.from_name" in message, message
    finally:
        assert_still_serving(platform, sdk)


# ===== part 2: bad requests on the server's socket ======================================================


def _raw_reply(platform: Platform, data: bytes) -> dict[str, Any]:
    """Send ``data`` as a whole request on the server's socket (then shut the writing side) and decode the
    one reply frame: 4-byte big-endian length, msgpack."""
    import msgspec

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(str(platform.home / "server.sock"))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(1 << 16):
            received += chunk
    assert len(received) >= 4, f"the server closed the connection without a reply: {received!r}"
    (length,) = struct.unpack(">I", received[:4])
    return msgspec.msgpack.decode(received[4 : 4 + length])


def _frame(document: Any) -> bytes:
    import msgspec

    body = msgspec.msgpack.encode(document)
    return struct.pack(">I", len(body)) + body


def _deploy_spec(kind: str = "function", **options: Any) -> dict[str, Any]:
    """A deploy spec as the SDK makes it, with ``kind`` and ``options`` forced in after the SDK's own checks."""
    placeholder = modal.App("placeholder")
    placeholder.function()(_nothing)
    spec = placeholder.spec()
    spec["functions"]["_nothing"]["kind"] = kind
    spec["functions"]["_nothing"]["options"].update(options)
    return spec


def _nothing() -> None:
    return None


def _deploy(spec: dict[str, Any], filename: str = "placeholder.py") -> dict[str, Any]:
    return {"name": NEVER, "spec": spec, "source": b"x = 1\n", "filename": filename}


TARGET = {"app_name": APP, "tag": "ok"}
REQUESTS: list[tuple[str, str, dict[str, Any], str]] = [  # (id, op, fields, what the error says)
    ("unknown-operation", "nonsense-op", {}, "unknown server operation 'nonsense-op'; known: ping, deploy, call"),
    ("call-without-a-target", "call", {"args": b""},
     "request 'call' is malformed: Object missing required field `target`"),
    ("call-with-a-string-target", "call", {"target": f"{APP}.ok", "args": b""},
     "request 'call' is malformed: Expected `object`, got `str` - at `$.target`"),
    ("call-with-a-target-without-a-tag", "submit", {"target": {"app_name": APP}, "args": b""},
     "request 'submit' is malformed: Object missing required field `tag` - at `$.target`"),
    ("call-with-numeric-args", "call", {"target": TARGET, "args": 5},
     "request 'call' is malformed: Expected `bytes`, got `int` - at `$.args`"),
    ("get-without-a-call-id", "get", {}, "request 'get' is malformed: Object missing required field `call_id`"),
    ("get-with-a-string-timeout", "get", {"call_id": "fc-0000000000000000", "timeout": "soon"},
     "at `$.timeout`"),
    ("get-with-a-negative-timeout", "get", {"call_id": "fc-0000000000000000", "timeout": -1.0},
     "FunctionCall.get(timeout=): a number of seconds >= 0, or None; got -1.0"),
    ("stop-with-a-number-for-the-app", "app_stop", {"app": 5},
     "request 'app_stop' is malformed: Expected `str`, got `int` - at `$.app`"),
    ("secret-create-without-values", "secret_create", {"name": f"bi-s-{ID}"},
     "request 'secret_create' is malformed: Object missing required field `values`"),
    ("secret-create-with-a-list", "secret_create", {"name": f"bi-s-{ID}", "values": ["A=b"]},
     "Expected `object`, got `array` - at `$.values`"),
    ("logs-of-a-path", "logs", {"app": "../state.db"}, "app name '../state.db': use letters, digits"),
    ("deploy-without-a-spec", "deploy", {"name": NEVER, "source": b"", "filename": "a.py"},
     "request 'deploy' is malformed: Object missing required field `spec`"),
    ("deploy-max_inputs-0", "deploy", _deploy(_deploy_spec(max_inputs=0)),
     "max_inputs= is how many inputs a container serves before it stops (1 or more, or None), got 0"),
    ("deploy-retries-negative", "deploy", _deploy(_deploy_spec(retries=-1)),
     "retries= must be a non-negative integer, got -1"),
    ("deploy-max_containers-0", "deploy", _deploy(_deploy_spec(max_containers=0)),
     "max_containers= must be at least 1"),
    ("deploy-memory-negative", "deploy", _deploy(_deploy_spec(memory=-5)), "memory= is a number of MiB, got -5"),
    ("deploy-cpu-0", "deploy", _deploy(_deploy_spec(cpu=0)), "cpu= is a number of cores (e.g. 0.5 or 2), got 0"),
    ("deploy-a-filename-with-a-path", "deploy", _deploy(_deploy_spec(), filename="../escape.py"),
     "app file name '../escape.py': a file name ending in .py, without a path"),
    ("deploy-a-function-of-unknown-kind", "deploy", _deploy(_deploy_spec(kind="lambda")),
     "the deploy request's spec is malformed"),
]  # fmt: skip


@pytest.mark.parametrize(("op", "fields", "says"), [r[1:] for r in REQUESTS], ids=[r[0] for r in REQUESTS])
def test_a_bad_request_is_refused_clearly(
    platform: Platform, app: str, sdk: ModuleType, op: str, fields: dict[str, Any], says: str
) -> None:
    with pytest.raises(WarmbootError) as caught:
        if op in ("deploy", "logs"):
            list(sdk.stream(op, **fields))
        else:
            sdk.request(op, **fields)
    assert isinstance(caught.value, InvalidOptionError), f"{type(caught.value).__name__}: {caught.value}"
    assert says in str(caught.value), str(caught.value)
    assert NEVER not in {a["name"] for a in sdk.request("app_list")}, "nothing half-deployed"
    assert not (platform.home / "code" / "escape.py").exists()
    assert_still_serving(platform, sdk)


RAW = [  # (id, the bytes sent, what the error says)
    ("not-msgpack", struct.pack(">I", 7) + b"garbage", "the request is not valid msgpack"),
    ("a-list-not-a-map", _frame(["op", "ping"]), "a request is a map with an 'op' naming the operation"),
    ("an-op-that-is-a-number", _frame({"op": 5}), "a request is a map with an 'op' naming the operation"),
    ("a-frame-claiming-4-gib", struct.pack(">I", 0xFFFFFFFF), "a frame of 4294967295 bytes exceeds the limit"),
]


@pytest.mark.parametrize(("data", "says"), [r[1:] for r in RAW], ids=[r[0] for r in RAW])
def test_a_malformed_frame_is_answered_clearly(platform: Platform, sdk: ModuleType, data: bytes, says: str) -> None:
    reply = _raw_reply(platform, data)
    assert reply["kind"] == "error" and reply["error_type"] == "InvalidOptionError", reply
    assert says in reply["message"], reply
    assert_still_serving(platform, sdk)


def test_snapshot_rm_with_an_empty_key_is_refused(platform: Platform, sdk: ModuleType) -> None:
    try:
        with pytest.raises(InvalidOptionError, match="empty"):
            sdk.request("snapshot_rm", key="")
    finally:
        assert_still_serving(platform, sdk)


def test_at_least_25_bad_inputs_are_covered() -> None:
    """The issue asks for 25 or more, each a clear error; these are on top of test_validation.py's."""
    cases = [c.id for c in CLI_CASES] + [c.id for c in SDK_CASES] + [r[0] for r in REQUESTS] + [r[0] for r in RAW]
    assert len(cases) >= 25, len(cases)


def test_the_server_logged_no_internal_error_for_any_of_them(platform: Platform, server_log_start: int) -> None:
    """Runs last: every bad input above was refused, none crashed an operation (no traceback in the server log)."""
    with open(platform.home / "test-server.log", "rb") as log:
        log.seek(server_log_start)
        text = log.read().decode(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text[-4000:]
