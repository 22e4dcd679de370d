"""Calls end to end: the real CLI and SDK against a real server, with real containers (no mocks).

Each test deploys (or runs) its own app under its own name, so tests share the session's server and its image
cache but never each other's apps.
"""

from __future__ import annotations

import glob
import json
import os
import threading
import time
from pathlib import Path

import pytest
from platform_helpers import Platform

from warmboot.worker import runtime_lib

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def wait_for_log(platform: Platform, app: str, text: str, timeout: float = 20) -> str:
    """The app's log once it holds ``text`` (container output reaches the log on its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        log = platform.log_text(app)
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


def last_json(stdout: str) -> object:
    """The JSON document printed on the last line of a snippet's output."""
    return json.loads(stdout.strip().splitlines()[-1])


# ----- functions: remote, map, spawn, kwargs ---------------------------------------------------------


def test_deployed_function_remote_map_spawn_kwargs(platform: Platform) -> None:
    path = platform.write_app(
        "calls_basic",
        """
        import warmboot as modal

        app = modal.App("calls-basic")

        @app.function()
        def combine(x, y=10, *, scale=1):
            return (x + y) * scale

        @app.function()
        def square(x):
            return x * x
        """,
    )
    platform.cli("deploy", str(path))
    out = platform.python(
        """
        import json
        import warmboot as modal

        combine = modal.Function.from_name("calls-basic", "combine")
        square = modal.Function.from_name("calls-basic", "square")
        handle = combine.spawn(4, scale=3)
        print(json.dumps({
            "remote": square.remote(12),
            "remote_default": combine.remote(1),
            "remote_kwargs": combine.remote(1, y=2, scale=5),
            "remote_all_kwargs": combine.remote(x=3, y=4),
            "map": list(square.map(range(5))),
            "map_two": list(combine.map([1, 2, 3], [10, 20, 30])),
            "handle_type": type(handle).__name__,
            "spawn": handle.get(timeout=30),
        }))
        """
    )
    assert last_json(out.stdout) == {
        "remote": 144,
        "remote_default": 11,
        "remote_kwargs": 15,
        "remote_all_kwargs": 7,
        "map": [0, 1, 4, 9, 16],
        "map_two": [11, 22, 33],
        "handle_type": "FunctionCall",
        "spawn": 42,
    }


def test_runtime_library_made_once_when_first_containers_boot_together(tmp_path: Path) -> None:
    """Pools boot their first containers on many threads at once; each needs the runtime layer."""
    barrier = threading.Barrier(6)
    results: list[Path] = []
    errors: list[BaseException] = []

    def boot() -> None:
        barrier.wait()
        try:
            results.append(runtime_lib.ensure(tmp_path))
        except BaseException as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)

    threads = [threading.Thread(target=boot) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    layer = results[0]
    assert (layer / runtime_lib.LIB_DIR.lstrip("/") / "warmboot" / "runtime" / "__main__.py").is_file()
    lib = layer / runtime_lib.LIB_DIR.lstrip("/") / "warmboot"
    # Only what a container imports: the server, CLI and worker stay out (and out of snapshot keys). Beside the
    # sources, their bytecode (made once here, so that containers compile nothing at start).
    assert sorted(p.name for p in lib.iterdir() if p.name != "__pycache__") == sorted(runtime_lib.CONTAINER_PARTS)
    assert list((lib / "runtime" / "__pycache__").glob("__main__.cpython-*.pyc"))
    assert os.access(layer / "__warmboot" / "init", os.X_OK) and (layer / "__warmboot" / "seccomp.bpf").stat().st_size
    assert sorted(os.listdir(layer / "dev")) == [
        "fd",
        "full",
        "null",
        "pts",
        "random",
        "shm",
        "stderr",
        "stdin",
        "stdout",
        "tty",
        "urandom",
        "zero",
    ]
    assert os.getxattr(layer / "dev", "trusted.overlay.opaque") == b"y"  # the image's own /dev stays hidden
    assert [p.name for p in (tmp_path / "runtime").iterdir()] == [results[0].name], "no temporary copies left"


# ----- warmboot run ----------------------------------------------------------------------------------


def test_run_entrypoint_and_named_function(platform: Platform) -> None:
    path = platform.write_app(
        "calls_run",
        """
        import warmboot as modal

        app = modal.App("calls-run")

        @app.function()
        def greet(name="world"):
            print(f"greeting {name} inside")
            return f"hello, {name}"

        @app.local_entrypoint()
        def main():
            print("entrypoint got:", greet.remote("ada"))
            print("entrypoint mapped:", list(greet.map(["x", "y"])))
        """,
    )
    proc = platform.cli("run", str(path))
    assert "entrypoint got: hello, ada" in proc.stdout
    assert "entrypoint mapped: ['hello, x', 'hello, y']" in proc.stdout

    proc = platform.cli("run", f"{path}::greet")
    assert proc.stdout.strip().splitlines()[-1] == "hello, world"
    assert "greeting world inside" in proc.stderr, "the container's output streams to the terminal"
    assert "calls-run" not in platform.cli("app", "list").stdout, "`warmboot run` stops its ephemeral app"


# ----- classes and their lifecycle hooks -------------------------------------------------------------


def test_cls_enter_hooks_once_and_exit_on_stop(platform: Platform) -> None:
    path = platform.write_app(
        "calls_cls",
        """
        import os
        import warmboot as modal

        app = modal.App("calls-cls")

        @app.cls()
        class Counter:
            @modal.enter(snap=True)
            def load(self):
                self.events = ["enter_snap"]

            @modal.enter(snap=False)
            def setup(self):
                self.events.append("enter")
                self.container = os.environ["WARMBOOT_CONTAINER_ID"]

            @modal.method()
            def record(self, tag):
                self.events.append(f"call:{tag}")
                return {"events": list(self.events), "container": self.container}

            @modal.method()
            def twice(self, x):
                return 2 * x

            @modal.exit()
            def bye(self):
                print(f"exit hook ran after {self.events[-1]}", flush=True)
        """,
    )
    platform.cli("deploy", str(path))
    out = platform.python(
        """
        import json
        import warmboot as modal

        Counter = modal.Cls.from_name("calls-cls", "Counter")
        first = Counter().record.remote("a")
        second = Counter().record.remote(tag="b")
        print(json.dumps({"first": first, "second": second, "twice": Counter().twice.remote(21)}))
        """
    )
    result = last_json(out.stdout)
    assert isinstance(result, dict)
    assert result["first"]["events"] == ["enter_snap", "enter", "call:a"]
    assert result["second"]["events"] == ["enter_snap", "enter", "call:a", "call:b"], "enter hooks run once"
    assert result["first"]["container"] == result["second"]["container"]
    assert result["twice"] == 42

    assert "exit hook ran" not in platform.log_text("calls-cls")
    platform.cli("app", "stop", "calls-cls")
    assert "exit hook ran after call:b" in wait_for_log(platform, "calls-cls", "exit hook ran")
    stopped = platform.python(
        """
        import warmboot as modal
        try:
            modal.Cls.from_name("calls-cls", "Counter")().twice.remote(1)
        except modal.WarmbootError as exc:
            print(type(exc).__name__)
        """
    )
    assert stopped.stdout.strip() == "NotFoundError", "a stopped app takes no more calls"


# ----- errors ------------------------------------------------------------------------------------------


def test_remote_exception_reraises_with_remote_traceback(platform: Platform) -> None:
    path = platform.write_app(
        "calls_raise",
        """
        import warmboot as modal

        app = modal.App("calls-raise")

        def check(value):
            if value < 0:
                raise ValueError(f"negative input: {value}")
            return value

        @app.function()
        def explode(value):
            return check(value)
        """,
    )
    platform.cli("deploy", str(path))
    out = platform.python(
        """
        import json
        import traceback
        import warmboot as modal

        f = modal.Function.from_name("calls-raise", "explode")
        try:
            f.remote(-7)
        except ValueError as exc:
            text = "".join(traceback.format_exception(exc))
            caught = {"type": type(exc).__name__, "args": list(exc.args), "text": text}
        spawned = f.spawn(-8)
        try:
            spawned.get(timeout=30)
        except ValueError as exc:
            caught["spawn_args"] = list(exc.args)
        caught["still_works"] = f.remote(5)
        print(json.dumps(caught))
        """
    )
    caught = last_json(out.stdout)
    assert isinstance(caught, dict)
    assert caught["type"] == "ValueError"
    assert caught["args"] == ["negative input: -7"]
    assert caught["spawn_args"] == ["negative input: -8"]
    assert caught["still_works"] == 5, "a failing call leaves the container serving"
    text = caught["text"]
    assert "ValueError: negative input: -7" in text
    assert "calls_raise.py" in text, text
    assert "in explode" in text, text
    assert "in check" in text, text


def test_deploy_syntax_error_names_file_and_line(platform: Platform) -> None:
    path = platform.write_app(
        "calls_syntax",
        """
        import warmboot as modal

        app = modal.App("calls-syntax")

        @app.function()
        def broken(items, i):
            return items[i] items[/i]
        """,
    )
    proc = platform.cli("deploy", str(path), check=False)
    assert proc.returncode != 0
    assert "calls_syntax.py" in proc.stderr, proc.stderr
    assert "line 8" in proc.stderr, proc.stderr
    assert "return items[i] items[/i]" in proc.stderr, "the offending line is shown as written"
    assert "Traceback" not in proc.stderr, "a user error gets a message, not a crash"
    assert "calls-syntax" not in platform.cli("app", "list").stdout


def test_deploy_import_error_shows_user_traceback(platform: Platform) -> None:
    path = platform.write_app(
        "calls_importerr",
        """
        import warmboot as modal

        app = modal.App("calls-importerr")

        def load_config(table):
            return table["[/missing]"]

        CONFIG = load_config({})
        """,
    )
    proc = platform.cli("deploy", str(path), check=False)
    assert proc.returncode != 0
    assert "calls_importerr.py raised KeyError while being imported" in proc.stderr, proc.stderr
    assert 'return table["[/missing]"]' in proc.stderr, proc.stderr
    assert "in load_config" in proc.stderr
    assert "appfile.py" not in proc.stderr, "the loader's own frames are not the user's business"


def test_unknown_option_fails_deploy(platform: Platform) -> None:
    path = platform.write_app(
        "calls_badopt",
        """
        import warmboot as modal

        app = modal.App("calls-badopt")

        @app.function(foo=1)
        def f():
            return 1
        """,
    )
    proc = platform.cli("deploy", str(path), check=False)
    assert proc.returncode != 0
    assert "'foo'" in proc.stderr, proc.stderr
    assert "calls_badopt.py, line 6" in proc.stderr, "the message points at the decorator's line"
    assert "options.py" not in proc.stderr, "no traceback through warmboot's internals"
    assert "calls-badopt" not in platform.cli("app", "list").stdout


def test_unknown_option_raises_in_process() -> None:
    import warmboot as modal
    from warmboot.errors import InvalidOptionError

    app = modal.App("calls-badopt-local")
    with pytest.raises(InvalidOptionError, match="'foo'"):

        @app.function(foo=1)
        def f() -> int:
            return 1

    with pytest.raises(InvalidOptionError, match="'bar'"):

        @app.cls(bar=2)
        class C:
            pass

    assert app.registered == {}
    assert issubclass(InvalidOptionError, modal.WarmbootError)


@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="this machine has an NVIDIA GPU")
def test_gpu_without_gpu_fails_deploy(platform: Platform) -> None:
    path = platform.write_app(
        "calls_gpu",
        """
        import warmboot as modal

        app = modal.App("calls-gpu")

        @app.function(gpu="a10g")
        def f():
            return 1
        """,
    )
    proc = platform.cli("deploy", str(path), check=False)
    assert proc.returncode != 0
    message = " ".join(proc.stderr.split())
    assert "gpu='a10g'" in message, proc.stderr
    assert "no NVIDIA GPU" in message, proc.stderr
    assert "calls-gpu" not in platform.cli("app", "list").stdout


def test_unpicklable_argument_is_named(platform: Platform) -> None:
    path = platform.write_app(
        "calls_pickle",
        """
        import warmboot as modal

        app = modal.App("calls-pickle")

        @app.function()
        def echo(*args, **kwargs):
            return [len(args), sorted(kwargs)]
        """,
    )
    platform.cli("deploy", str(path))
    out = platform.python(
        """
        import json
        import threading
        import warmboot as modal
        from warmboot.errors import InvalidOptionError

        f = modal.Function.from_name("calls-pickle", "echo")
        messages = {}
        try:
            f.remote(1, (i for i in range(3)))
        except InvalidOptionError as exc:
            messages["generator"] = str(exc)
        try:
            f.remote(1, guard=threading.Lock())
        except InvalidOptionError as exc:
            messages["lock"] = str(exc)
        try:
            f.spawn(threading.Lock())
        except InvalidOptionError as exc:
            messages["spawn"] = str(exc)
        messages["still_works"] = f.remote(1, 2, k=3)
        print(json.dumps(messages))
        """
    )
    messages = last_json(out.stdout)
    assert isinstance(messages, dict)
    assert "argument 1" in messages["generator"] and "generator" in messages["generator"], messages
    assert "'guard'" in messages["lock"] and "lock" in messages["lock"], messages
    assert "argument 0" in messages["spawn"], messages
    assert messages["still_works"] == [2, ["k"]]


# ----- the reference examples ------------------------------------------------------------------------


def test_example_memory_snapshot_function(platform: Platform) -> None:
    platform.cli("deploy", str(EXAMPLES / "memory_snapshot_function.py"))
    out = platform.python(
        """
        import warmboot as modal
        print(repr(modal.Function.from_name("memory-snapshot-function", "my_func").remote()))
        """
    )
    assert out.stdout.strip() == "None"
    log = wait_for_log(platform, "memory-snapshot-function", "] hello")
    assert any(line.endswith("] hello") for line in log.splitlines()), log


def test_example_memory_snapshot_class(platform: Platform) -> None:
    proc = platform.cli("deploy", str(EXAMPLES / "memory_snapshot_class.py"))
    assert "memory-snapshot-class" in proc.stderr + proc.stdout
    listed = platform.cli("app", "list").stdout
    assert "memory-snapshot-class" in listed
    assert "MyCls" in listed


def test_calling_a_function_from_inside_a_container_is_a_clear_error(platform: Platform) -> None:
    """Containers cannot reach the server (by design); the SDK says so instead of starting a server inside."""
    path = platform.write_app(
        "calls_nested",
        """
        import warmboot as modal

        app = modal.App("calls-nested")

        @app.function()
        def inner():
            return 1

        @app.function()
        def outer():
            try:
                return inner.remote()
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"
        """,
    )
    platform.cli("deploy", str(path))
    out = platform.python(
        """
        import warmboot
        print(warmboot.Function.from_name("calls-nested", "outer").remote())
        """
    )
    assert out.stdout.strip().startswith("UnsupportedOptionError: calling warmboot functions"), out.stdout
    platform.cli("app", "stop", "calls-nested")
