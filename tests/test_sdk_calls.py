"""The SDK's call API end to end, Modal style: a real server, real containers, the real CLI.

``.aio`` variants, ``remote_gen``, the map family, ``FunctionCall.gather``/``cancel``, ``modal.Retries`` back-off,
``app.run()`` in a plain script, an async local entrypoint, and what a function sees of where it runs. Inputs that
must be running (or held) at a given moment meet the test through files in a Volume, never through timing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from platform_helpers import Platform, wait_for

SOURCE = """
import os, time
import warmboot as modal

app = modal.App({app!r})
meet = modal.Volume.from_name({volume!r}, create_if_missing=True)


@app.function()
def square(x):
    return x * x


@app.function()
def add(a, b, scale=1):
    return (a + b) * scale


@app.function()
def fails_from_two(x):
    if x >= 2:
        raise ValueError(f"bad {{x}}")
    return x


@app.function(volumes={{"/meet": meet}}, max_containers=2)
def wait_for_release(tag):
    while not os.path.exists(f"/meet/release-{{tag}}"):
        time.sleep(0.01)
    return tag


@app.function(volumes={{"/meet": meet}}, max_containers=1)
def held(tag):
    open(f"/meet/running-{{tag}}", "w").close()
    while not os.path.exists(f"/meet/release-{{tag}}"):
        time.sleep(0.01)
    return tag


@app.function()
def countdown(n):
    for i in range(n, 0, -1):
        yield i


@app.function(
    volumes={{"/meet": meet}},
    retries=modal.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=0.2, max_delay=1.0),
)
def flaky():
    # Fails on its first two attempts (counted in the volume), succeeds on the third.
    path = "/meet/flaky-attempts"
    attempts = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as f:
        f.write(str(attempts))
    if attempts < 3:
        raise RuntimeError(f"flaky attempt {{attempts}}")
    return attempts


@app.function(retries=1)
def always_fails():
    raise KeyError("always")


@app.function()
def where():
    return [modal.is_local(), modal.current_function_call_id()]


@app.cls()
class Counter:
    @modal.method()
    def count(self, n):
        yield from range(n)

    @modal.method()
    def double(self, x):
        return 2 * x
"""


@pytest.fixture(scope="module")
def app(platform: Platform) -> tuple[str, Path]:
    name = f"calls-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-meet"
    platform.cli("deploy", str(platform.write_app(name.replace("-", "_"), SOURCE.format(app=name, volume=volume))))
    return name, platform.home / "volumes" / volume


def _run(platform: Platform, code: str) -> object:
    proc = platform.python(code, timeout=240)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lookups(name: str) -> str:
    return f"""
        import asyncio, json
        import warmboot as modal
        fn = lambda tag: modal.Function.from_name({name!r}, tag)
        square, add, fails, countdown = fn("square"), fn("add"), fn("fails_from_two"), fn("countdown")
        counter = modal.Cls.from_name({name!r}, "Counter")()
        """


def test_map_family(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    out = _run(
        platform,
        _lookups(name)
        + """
        got = {}
        got["map"] = list(square.map(range(5)))
        got["kwargs"] = list(add.map([1, 2], [3, 4], kwargs={"scale": 10}))
        got["starmap"] = list(add.starmap([(1, 2), (3, 4)]))
        got["exceptions"] = [
            [type(r).__name__, str(r)] if isinstance(r, Exception) else r
            for r in fails.map([0, 1, 2, 3], return_exceptions=True)
        ]
        seen = []
        try:
            for r in fails.map([0, 1, 2, 3]):
                seen.append(r)
        except ValueError as exc:
            got["raised"] = [seen, str(exc)]
        fails.for_each([0, 1], ignore_exceptions=False)
        fails.for_each([0, 5], ignore_exceptions=True)
        try:
            fails.for_each([0, 5])
        except ValueError as exc:
            got["for_each"] = str(exc)
        handle = square.spawn_map([1, 2, 3])
        again = modal.FunctionCall.from_id(handle.object_id)
        got["spawn_map"] = [handle.num_inputs(), [handle.get(index=i) for i in range(3)], list(again.iter())]
        got["method_map"] = list(counter.double.map([1, 2]))
        print(json.dumps(got))
        """,
    )
    assert out == {
        "map": [0, 1, 4, 9, 16],
        "kwargs": [40, 60],
        "starmap": [3, 7],
        "exceptions": [0, 1, ["ValueError", "bad 2"], ["ValueError", "bad 3"]],
        "raised": [[0, 1], "bad 2"],
        "for_each": "bad 5",
        "spawn_map": [3, [1, 4, 9], [1, 4, 9]],
        "method_map": [2, 4],
    }


def test_map_with_order_outputs_false_yields_results_as_they_finish(platform: Platform, app: tuple[str, Path]) -> None:
    name, meet = app
    tags = [f"slow-{uuid.uuid4().hex[:6]}", f"fast-{uuid.uuid4().hex[:6]}"]
    (meet / f"release-{tags[1]}").touch()  # the second input may finish; the first waits for the test
    out = _run(
        platform,
        f"""
        import json, pathlib
        import warmboot as modal
        f = modal.Function.from_name({name!r}, "wait_for_release")
        got = []
        for tag in f.map({tags!r}, order_outputs=False):
            got.append(tag)
            pathlib.Path({str(meet)!r}, f"release-{tags[0]}").touch()  # only now may the first input finish
        print(json.dumps(got))
        """,
    )
    assert out == [tags[1], tags[0]], "the finished input came first, ahead of the one still running"


def test_remote_gen_streams_from_functions_and_methods(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    out = _run(
        platform,
        _lookups(name)
        + """
        print(json.dumps([list(countdown.remote_gen(3)), list(counter.count.remote_gen(4))]))
        """,
    )
    assert out == [[3, 2, 1], [0, 1, 2, 3]]


def test_aio_variants(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    out = _run(
        platform,
        _lookups(name)
        + """
        async def main():
            got = {}
            got["remote"] = await square.remote.aio(3)
            got["gather"] = await asyncio.gather(*[square.remote.aio(i) for i in range(6)])
            got["remote_gen"] = [v async for v in countdown.remote_gen.aio(3)]
            got["method_gen"] = [v async for v in counter.count.remote_gen.aio(2)]
            got["map"] = [r async for r in square.map.aio([1, 2, 3])]
            got["starmap"] = [r async for r in add.starmap.aio([(1, 1)], kwargs={"scale": 3})]
            call = await square.spawn.aio(5)
            got["get"] = await call.get.aio(timeout=120)
            calls = [square.spawn(2), square.spawn(4)]
            got["fc_gather"] = await modal.FunctionCall.gather.aio(*calls)
            await square.for_each.aio([1, 2])
            handle = await square.spawn_map.aio([6, 7])
            got["spawn_map"] = [r async for r in handle.iter.aio()]
            return got

        print(json.dumps(asyncio.run(main())))
        """,
    )
    assert out == {
        "remote": 9,
        "gather": [0, 1, 4, 9, 16, 25],
        "remote_gen": [3, 2, 1],
        "method_gen": [0, 1],
        "map": [1, 4, 9],
        "starmap": [6],
        "get": 25,
        "fc_gather": [4, 16],
        "spawn_map": [36, 49],
    }


def test_gather_returns_results_in_order_and_raises_the_first_error(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    out = _run(
        platform,
        _lookups(name)
        + """
        got = {"ok": modal.FunctionCall.gather(square.spawn(3), fails.spawn(1), square.spawn(2))}
        try:
            modal.functions.gather(square.spawn(1), fails.spawn(3), fails.spawn(2))
        except ValueError as exc:
            got["error"] = str(exc)
        print(json.dumps(got))
        """,
    )
    assert out == {"ok": [9, 1, 4], "error": "bad 3"}, "the first failure in the order given, not in time"


def test_cancel_a_queued_and_a_running_call(platform: Platform, app: tuple[str, Path]) -> None:
    name, meet = app
    run_id = uuid.uuid4().hex[:6]
    a, b, c = (f"{t}-{run_id}" for t in "abc")
    ids = _run(
        platform,
        f"""
        import json, warmboot as modal
        f = modal.Function.from_name({name!r}, "held")
        print(json.dumps([f.spawn(t).object_id for t in ({a!r}, {b!r})]))
        """,
    )
    wait_for("the first call runs", lambda: (meet / f"running-{a}").exists(), watch=meet)
    (meet / f"release-{c}").touch()
    out = _run(
        platform,
        f"""
        import json, warmboot as modal
        from warmboot.exception import InputCancellation
        running, queued = (modal.FunctionCall.from_id(i) for i in {ids!r})
        got = {{}}
        queued.cancel()
        try:
            queued.get(timeout=0)  # ended at once: no waiting
        except InputCancellation as exc:
            got["queued"] = str(exc)
        running.cancel()
        try:
            running.get(timeout=120)
        except InputCancellation as exc:
            got["running"] = str(exc)
        running.cancel()  # a finished call: nothing changes
        got["after"] = modal.Function.from_name({name!r}, "held").remote({c!r})
        print(json.dumps(got))
        """,
    )
    assert out == {
        "queued": f"call {ids[1]} was cancelled (FunctionCall.cancel()) before it finished; call it again to run it",
        "running": f"call {ids[0]} was cancelled (FunctionCall.cancel()) before it finished; call it again to run it",
        "after": c,
    }, "and a fresh container serves the next call"
    assert not (meet / f"running-{b}").exists(), "the cancelled queued call never ran"
    log = platform.log_text(name)
    assert f"Call {ids[0]} cancelled: stopping container" in log, log[-3000:]


def test_retries_wait_their_back_off_between_attempts(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    out = _run(
        platform,
        f"""
        import json, warmboot as modal
        got = {{"flaky": modal.Function.from_name({name!r}, "flaky").remote()}}
        try:
            modal.Function.from_name({name!r}, "always_fails").remote()
        except KeyError as exc:
            got["always"] = str(exc)
        print(json.dumps(got))
        """,
    )
    assert out == {"flaky": 3, "always": "'always'"}
    log = platform.log_text(name)
    assert "runs again in 0.2 s (attempt 2 of 4)" in log, log[-3000:]
    assert "runs again in 0.4 s (attempt 3 of 4)" in log, "the delay doubled (backoff_coefficient=2.0)"
    assert "attempt 4 of 4" not in log, "it succeeded on the third attempt"
    assert "runs again in 1 s (attempt 2 of 2)" in log, "retries=1: one retry after Modal's fixed 1 s"


def test_is_local_and_the_call_id_inside_a_container(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    out = _run(
        platform,
        f"""
        import json, warmboot as modal
        call = modal.Function.from_name({name!r}, "where").spawn()
        print(json.dumps([modal.is_local(), modal.current_function_call_id(), call.object_id, call.get(timeout=120)]))
        """,
    )
    local, local_id, call_id, remote = out  # type: ignore[misc]
    assert (local, local_id) == (True, None)
    assert remote == [False, call_id]


def test_app_run_in_a_plain_script_and_app_deploy(platform: Platform) -> None:
    name = f"script-{uuid.uuid4().hex[:8]}"
    script = platform.write_app(
        name.replace("-", "_"),
        f"""
        import sys
        import warmboot as modal

        app = modal.App({name!r})


        @app.function()
        def shout(word):
            print(f"container says {{word}}")
            return word.upper()


        if __name__ == "__main__":
            with modal.enable_output(), app.run():
                print("result", shout.remote("hello"), flush=True)
            if sys.argv[1:] == ["deploy"]:
                app.deploy()
        """,
    )
    proc = subprocess.run(
        [sys.executable, str(script)], env=platform.env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "result HELLO" in proc.stdout
    assert "container says hello" in proc.stderr, "enable_output(): the container's output is shown"
    listed = platform.cli("app", "list").stdout
    assert name not in listed, "the ephemeral app stopped with the block"
    deployed = subprocess.run(
        [sys.executable, str(script), "deploy"], env=platform.env, capture_output=True, text=True, timeout=240
    )
    assert deployed.returncode == 0, deployed.stderr
    out = _run(
        platform,
        f"""
        import json, warmboot as modal
        print(json.dumps(modal.Function.from_name({name!r}, "shout").remote("deployed")))
        """,
    )
    assert out == "DEPLOYED"


def test_an_async_local_entrypoint_runs_under_warmboot_run(platform: Platform) -> None:
    name = f"async-entry-{uuid.uuid4().hex[:8]}"
    path = platform.write_app(
        name.replace("-", "_"),
        f"""
        import asyncio
        import warmboot as modal

        app = modal.App({name!r})


        @app.function()
        def cube(x):
            return x ** 3


        @app.local_entrypoint()
        async def main():
            results = await asyncio.gather(cube.remote.aio(2), cube.remote.aio(3))
            print("async results", results)
        """,
    )
    proc = platform.cli("run", str(path))
    assert "async results [8, 27]" in proc.stdout, proc.stdout + proc.stderr
    assert "never awaited" not in proc.stderr


@pytest.mark.parametrize("how", ["warmboot run", "python"])
def test_the_calls_and_maps_example_runs(platform: Platform, how: str) -> None:
    example = Path(__file__).resolve().parent.parent / "examples" / "calls_and_maps.py"
    if how == "python":  # its `if __name__ == "__main__":` block: app.run() with enable_output()
        proc = subprocess.run(
            [sys.executable, str(example)], env=platform.env, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
    else:
        out = platform.cli("run", str(example), timeout=300).stdout
    for line in (
        "square(4) = 16",
        "await square.remote.aio(5) = 25",
        "asyncio.gather of .aio calls: [0, 1, 4, 9]",
        "map: [0, 1, 4, 9, 16]",
        "map with kwargs: [8, 27]",
        "starmap: [32, 100]",
        "return_exceptions: [1, ValueError('-2 is negative'), 3]",
        "async map: [49, 64]",
        "spawn_map: 3 inputs -> [100, 400, 900]",
        "gather: [4, 9]",
        "gather raised: -1 is negative",
        "remote_gen: [3, 2, 1]",
        "async remote_gen: [2, 1]",
        "with retries: [0, 1, 2]",
    ):
        assert line in out, f"{line!r} not in:\n{out}"
    assert "cancelled: call fc-" in out and "inside a container: {'local': False, 'call_id': 'fc-" in out, out
