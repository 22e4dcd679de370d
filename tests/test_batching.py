"""``@modal.batched`` end to end: a real server and real containers gather single calls into batches.

The function reports the size of the batch each input ran in, so the test sees how batches were formed.
"""

from __future__ import annotations

import json
import uuid

import pytest
from platform_helpers import Platform

SOURCE = """
import os
import warmboot as modal

app = modal.App({app!r})


@app.function(max_containers=1)
@modal.batched(max_batch_size=4, wait_ms=1000)
def add(xs: list[int], ys: list[int]) -> list[list[int]]:
    return [[x + y, len(xs)] for x, y in zip(xs, ys)]


@app.function()
@modal.batched(max_batch_size=3, wait_ms=10)
async def wrong_length(xs: list[int]) -> list[int]:
    return xs[:-1]


@app.cls(enable_memory_snapshot=True, max_inputs=1)
class Scaler:
    @modal.enter(snap=True)
    def load(self):
        self.factor = 10
        self.pid_at_snapshot = os.getpid()

    @modal.batched(max_batch_size=2, wait_ms=1000)
    def scale(self, xs: list[int]) -> list[list[int]]:
        return [[x * self.factor, len(xs)] for x in xs]
"""


@pytest.fixture(scope="module")
def app(platform: Platform) -> str:
    name = f"batch-{uuid.uuid4().hex[:8]}"
    platform.cli("deploy", str(platform.write_app(name.replace("-", "_"), SOURCE.format(app=name))))
    return name


def _run(platform: Platform, code: str) -> object:
    return json.loads(platform.python(code, timeout=240).stdout.strip().splitlines()[-1])


def test_batches_fill_up_to_max_batch_size_and_a_partial_one_goes_after_wait_ms(platform: Platform, app: str) -> None:
    results = _run(
        platform,
        f"""
        import json, warmboot
        add = warmboot.Function.from_name({app!r}, "add")
        calls = [add.spawn(i, 100) for i in range(6)]
        print(json.dumps([c.get(timeout=120) for c in calls]))
        """,
    )
    assert [r[0] for r in results] == [100, 101, 102, 103, 104, 105]  # type: ignore[index,union-attr]
    sizes = sorted(r[1] for r in results)  # type: ignore[union-attr]
    assert sizes == [2, 2, 4, 4, 4, 4], "six inputs, batches of at most four: one full batch, then two"
    assert "Batch of 4 input(s)" in platform.log_text(app)


def test_a_batched_function_that_returns_the_wrong_number_of_results_fails_each_call(
    platform: Platform, app: str
) -> None:
    out = _run(
        platform,
        f"""
        import json, warmboot
        f = warmboot.Function.from_name({app!r}, "wrong_length")
        try:
            f.remote(1)
        except Exception as exc:
            print(json.dumps([type(exc).__name__, str(exc)]))
        """,
    )
    assert "it must return a list with one result per input (1 here), it returned a list of 0" in out[1]  # type: ignore[index]


def test_a_batched_class_method_is_restored_from_its_snapshot(platform: Platform, app: str) -> None:
    for _ in range(2):  # max_inputs=1: each batch gets its own container; the second is a restore
        results = _run(
            platform,
            f"""
            import json, warmboot
            scaler = warmboot.Cls.from_name({app!r}, "Scaler")()
            calls = [scaler.scale.spawn(i) for i in (1, 2)]
            print(json.dumps([c.get(timeout=120) for c in calls]))
            """,
        )
        assert results == [[10, 2], [20, 2]]
    assert "Restored " in platform.log_text(app) and ".Scaler from memory snapshot" in platform.log_text(app)


BAD = {
    "not_a_list": """
        @app.function()
        @modal.batched(max_batch_size=4, wait_ms=10)
        def f(x: int) -> list[int]:
            return [x]
    """,
    "with_concurrent": """
        @app.function()
        @modal.concurrent(max_inputs=2)
        @modal.batched(max_batch_size=4, wait_ms=10)
        def f(xs: list[int]) -> list[int]:
            return xs
    """,
    "other_methods": """
        @app.cls()
        class C:
            @modal.batched(max_batch_size=4, wait_ms=10)
            def f(self, xs: list[int]) -> list[int]:
                return xs

            @modal.method()
            def g(self):
                return 1
    """,
    "huge_batch": """
        @app.function()
        @modal.batched(max_batch_size=100000, wait_ms=10)
        def f(xs: list[int]) -> list[int]:
            return xs
    """,
}
EXPECTED = {
    "not_a_list": "parameter 'x' of f is annotated int; a batched function receives a list per parameter",
    "with_concurrent": "@modal.batched and @modal.concurrent do not combine",
    "other_methods": "a class with a @modal.batched method can have no other methods (it has f, g)",
    "huge_batch": "max_batch_size= must be an integer from 1 to 1000, got 100000",
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_batching_is_refused_at_deploy_with_a_clear_error(platform: Platform, case: str) -> None:
    import textwrap

    source = "import warmboot as modal\napp = modal.App('bad-batch')\n" + textwrap.dedent(BAD[case])
    proc = platform.cli("deploy", str(platform.write_app(f"bad_batch_{case}", source)), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert EXPECTED[case] in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
