"""Input concurrency, async functions and generators, end to end: a real server, real containers.

Inputs meet through files in a Volume: each writes "running-<id>" and waits for a release file (or for its
siblings), so a test knows what runs at once without timing anything.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from platform_helpers import Platform, wait_for

SOURCE = """
import asyncio, fcntl, os, time
import warmboot as modal

app = modal.App({app!r})
meet = modal.Volume.from_name({volume!r}, create_if_missing=True)


def _enter(tag):
    # Count how many inputs run at once (the peak is what the test checks), under a file lock.
    with open("/meet/lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = len([n for n in os.listdir("/meet") if n.startswith("running-")]) + 1
        open(f"/meet/running-{{tag}}", "w").close()
        peak = int(open("/meet/peak").read()) if os.path.exists("/meet/peak") else 0
        with open("/meet/peak", "w") as f:
            f.write(str(max(peak, now)))


def _leave(tag):
    with open("/meet/lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.remove(f"/meet/running-{{tag}}")


@app.function(volumes={{"/meet": meet}}, max_containers=1)
@modal.concurrent(max_inputs=2)
def held(tag):
    _enter(tag)
    while not os.path.exists("/meet/release"):
        time.sleep(0.01)
    _leave(tag)
    from warmboot.sdk.context import current_call_id

    return (tag, current_call_id())


@app.function(volumes={{"/meet": meet}}, max_containers=1)
@modal.concurrent(max_inputs=3)
async def gathered(tag):
    # Three inputs must be in this container at once for any of them to finish: one event loop, three tasks.
    open(f"/meet/async-{{tag}}", "w").close()
    while len([n for n in os.listdir("/meet") if n.startswith("async-")]) < 3:
        await asyncio.sleep(0.01)
    return f"async {{tag}} in {{os.environ['WARMBOOT_CONTAINER_ID']}}"


@app.cls(enable_memory_snapshot=True, max_inputs=1)
@modal.concurrent(max_inputs=2)
class Warm:
    @modal.enter(snap=True)
    async def load(self):
        # Made on the container's event loop before the snapshot: restored copies must find it working.
        self.lock = asyncio.Lock()
        self.loop_id = id(asyncio.get_running_loop())

    @modal.method()
    async def ask(self, x):
        async with self.lock:
            await asyncio.sleep(0)
            return [x * 2, self.loop_id == id(asyncio.get_running_loop())]


@app.function()
def countdown(n):
    for i in range(n, 0, -1):
        yield i


@app.function()
async def acountdown(n):
    for i in range(n, 0, -1):
        await asyncio.sleep(0)
        yield i * 10


@app.function()
def breaks_after(n):
    yield from range(n)
    raise ValueError(f"broke after {{n}}")
"""


@pytest.fixture(scope="module")
def app(platform: Platform) -> tuple[str, Path]:
    name = f"conc-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-meet"
    platform.cli("deploy", str(platform.write_app(name.replace("-", "_"), SOURCE.format(app=name, volume=volume))))
    return name, platform.home / "volumes" / volume


def _run(platform: Platform, code: str) -> object:
    proc = platform.python(code, timeout=240)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_sync_function_runs_up_to_max_inputs_at_once_and_no_more(platform: Platform, app: tuple[str, Path]) -> None:
    name, meet = app
    ids = _run(
        platform,
        f"""
        import json, warmboot
        f = warmboot.Function.from_name({name!r}, "held")
        print(json.dumps([f.spawn(t).object_id for t in ("a", "b", "c")]))
        """,
    )
    wait_for("two inputs run", lambda: len(list(meet.glob("running-*"))) == 2, watch=meet)
    (meet / "release").touch()
    results = _run(
        platform,
        f"""
        import json, warmboot
        print(json.dumps([warmboot.FunctionCall.from_id(i).get(timeout=120) for i in {ids!r}]))
        """,
    )
    assert sorted(r[0] for r in results) == ["a", "b", "c"]  # type: ignore[union-attr]
    assert (meet / "peak").read_text() == "2", "max_inputs=2 with one container: never three at once"
    assert len({r[1] for r in results}) == 3, "each input saw its own call id"  # type: ignore[union-attr]


def test_async_inputs_share_one_container_and_one_loop(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    results = _run(
        platform,
        f"""
        import json, warmboot
        f = warmboot.Function.from_name({name!r}, "gathered")
        print(json.dumps(list(f.map(["x", "y", "z"]))))
        """,
    )
    assert [r.split(" in ")[0] for r in results] == ["async x", "async y", "async z"]  # type: ignore[union-attr]
    assert len({r.split(" in ")[1] for r in results}) == 1, "all three ran in one container"  # type: ignore[union-attr]


def test_generators_stream_their_values_then_their_error(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    out = _run(
        platform,
        f"""
        import json
        from warmboot.sdk import client
        got = {{}}
        got["sync"] = list(client.call_gen({{"app_name": {name!r}, "tag": "countdown"}}, (4,), {{}}))
        got["async"] = list(client.call_gen({{"app_name": {name!r}, "tag": "acountdown"}}, (3,), {{}}))
        seen = []
        try:
            for v in client.call_gen({{"app_name": {name!r}, "tag": "breaks_after"}}, (2,), {{}}):
                seen.append(v)
        except ValueError as exc:
            got["error"] = [seen, str(exc)]
        try:
            client.call({{"app_name": {name!r}, "tag": "countdown"}}, (1,), {{}})
        except Exception as exc:
            got["remote"] = [type(exc).__name__, str(exc)]
        print(json.dumps(got))
        """,
    )
    assert out == {
        "sync": [4, 3, 2, 1],
        "async": [30, 20, 10],
        "error": [[0, 1], "broke after 2"],
        "remote": [
            "InvalidOptionError",
            "countdown is a generator function: call it with .remote_gen(), not .remote()",
        ],
    }


def test_a_restored_concurrent_async_class_keeps_its_loop(platform: Platform, app: tuple[str, Path]) -> None:
    name, _ = app
    results = _run(
        platform,
        f"""
        import json, warmboot
        warm = warmboot.Cls.from_name({name!r}, "Warm")()
        print(json.dumps([warm.ask.remote(i) for i in range(3)]))
        """,
    )
    assert results == [[0, True], [2, True], [4, True]]
    log = platform.log_text(name)
    assert log.count(f"Restored {name}.Warm from memory snapshot") >= 2, log[-3000:]
