"""The fast layer of the SDK's call API: no server, no containers.

``modal.Retries`` and ``retries=`` checks, ``modal.exception``'s names, ``.aio`` (run off the event loop, many at
once), the map engine's ordering and exception rules and ``FunctionCall`` handles, with the client's two
calls (``submit``, ``get_result``) replaced by fakes the test controls with events (no sleeps).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import warmboot as modal
from warmboot import errors
from warmboot.sdk import client, mapping
from warmboot.sdk import retries as retry_rules
from warmboot.sdk.aio import aio_method
from warmboot.sdk.function import Function, FunctionCall
from warmboot.sdk.options import check as check_options

WAIT = 30.0  # an upper bound on waits for other threads: reached only when the code under test is broken


# ----- modal.Retries ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"max_retries": 0}, "max_retries= is how many times a failed input runs again, from 1 to 10; got 0"),
        ({"max_retries": 11}, "from 1 to 10; got 11"),
        ({"max_retries": 2.0}, "got 2.0"),
        ({"max_retries": True}, "got True"),
        ({"max_retries": 2, "backoff_coefficient": 0.5}, "backoff_coefficient= is what each delay is multiplied by"),
        ({"max_retries": 2, "backoff_coefficient": 11}, "from 1 to 10; got 11"),
        ({"max_retries": 2, "initial_delay": -1}, "initial_delay= is seconds before the first retry, from 0 to 60"),
        ({"max_retries": 2, "initial_delay": 61}, "got 61"),
        ({"max_retries": 2, "max_delay": 0.5}, "max_delay= is the longest delay in seconds, from 1 to 60; got 0.5"),
        ({"max_retries": 2, "max_delay": "5"}, "got '5'"),
    ],
)
def test_retries_refuses_values_outside_modals_ranges(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(modal.exception.InvalidError) as caught:
        modal.Retries(**kwargs)
    assert says in str(caught.value) and str(caught.value).startswith("modal.Retries: ")


def test_retries_option_takes_an_int_or_a_policy_and_the_server_checks_the_map_again() -> None:
    policy = modal.Retries(max_retries=3, backoff_coefficient=1.5, initial_delay=0.25, max_delay=5)
    opts = check_options("@app.function", {"retries": policy})
    assert opts["retries"] == {"max_retries": 3, "backoff_coefficient": 1.5, "initial_delay": 0.25, "max_delay": 5.0}
    assert check_options("app.f", dict(opts))["retries"] == opts["retries"], "the spec's map passes the server"
    assert retry_rules.policy(opts["retries"]) == (3, 0.25, 1.5, 5.0)
    assert retry_rules.policy(check_options("@app.function", {"retries": 2})["retries"]) == (2, 1.0, 1.0, 60.0)
    with pytest.raises(errors.InvalidOptionError, match="retries= is at most 10, got 11"):
        check_options("@app.function", {"retries": 11})
    with pytest.raises(errors.InvalidOptionError, match="retries= must be a non-negative integer, got -1"):
        check_options("@app.function", {"retries": -1})
    with pytest.raises(errors.InvalidOptionError, match="needs max_retries and may have"):
        check_options("app.f", {"retries": {"max_retries": 2, "jitter": True}})
    with pytest.raises(errors.InvalidOptionError, match="max_delay= is the longest delay"):
        check_options("app.f", {"retries": {**opts["retries"], "max_delay": 600}})


def test_retry_delays_grow_by_the_coefficient_up_to_max_delay() -> None:
    assert [retry_rules.delay(n, 1.0, 2.0, 10.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 8.0, 10.0]
    assert [retry_rules.delay(n, 3.0, 1.0, 60.0) for n in (1, 2, 3)] == [3.0, 3.0, 3.0]


# ----- modal.exception ------------------------------------------------------------------------------------------


def test_modal_exception_names_catch_what_warmboot_raises() -> None:
    exc = modal.exception
    assert exc.Error is errors.WarmbootError and exc.NotFoundError is errors.NotFoundError
    assert exc.InvalidError is errors.InvalidOptionError and exc.RemoteError is errors.RemoteError
    for raised, caught in [
        (errors.FunctionTimeoutError("t"), exc.FunctionTimeoutError),
        (errors.FunctionTimeoutError("t"), exc.TimeoutError),
        (errors.FunctionTimeoutError("t"), TimeoutError),  # the built-in too
        (errors.OutputTimeoutError("t"), exc.TimeoutError),
        (errors.OutputTimeoutError("t"), TimeoutError),
        (errors.InputCancelledError("c"), exc.InputCancellation),
        (errors.ContainerCrashedError("x"), exc.ExecutionError),
        (errors.ServerError("x"), exc.ConnectionError),
        (errors.SerializationError("x"), exc.SerializationError),
        (errors.SerializationError("x"), exc.InvalidError),
        (errors.ServerRestartedError("x"), exc.InternalFailure),
    ]:
        with pytest.raises(caught):
            raise raised
    assert issubclass(exc.AuthError, exc.Error) and issubclass(exc.SandboxTimeoutError, exc.TimeoutError)
    assert modal.functions.FunctionCall is FunctionCall and callable(modal.functions.gather)


# ----- .aio -------------------------------------------------------------------------------------------------------


class _Thing:
    def __init__(self, parties: int = 1) -> None:
        self.barrier = threading.Barrier(parties, timeout=WAIT)
        self.closed = threading.Event()

    @aio_method
    def block(self, x: int) -> tuple[int, str]:
        self.barrier.wait()  # every caller must be here at once for any of them to go on
        return x, threading.current_thread().name

    @aio_method(iterates=True)
    def count(self, n: int) -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            self.closed.set()


def test_aio_runs_blocking_calls_off_the_loop_and_all_at_once() -> None:
    thing = _Thing(parties=60)  # more than asyncio's default executor runs at once on a small machine

    async def main() -> list[tuple[int, str]]:
        return await asyncio.gather(*(thing.block.aio(i) for i in range(60)))

    results = asyncio.run(main())
    assert [x for x, _ in results] == list(range(60))
    assert all(name.startswith("warmboot-aio") for _, name in results)
    assert _Thing().block(7)[0] == 7, "the blocking form is unchanged"


def test_aio_iterates_and_closes_the_iterator_when_the_loop_stops_early() -> None:
    thing = _Thing()

    async def main() -> tuple[list[int], list[int]]:
        everything = [v async for v in thing.count.aio(3)]
        first = []
        async for v in thing.count.aio(100):
            first.append(v)
            if v == 1:
                break
        return everything, first

    assert asyncio.run(main()) == ([0, 1, 2], [0, 1])
    assert thing.closed.wait(WAIT), "the generator (a generator call's connection) was closed"


# ----- maps and handles, against a fake client -----------------------------------------------------------------


class FakeClient:
    """``submit`` numbers the calls; ``get_result`` returns when the test releases that call (or raises)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lock = threading.Condition()
        self.released: dict[str, Any] = {}
        self.submitted: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        monkeypatch.setattr(client, "submit", self.submit)
        monkeypatch.setattr(client, "get_result", self.get_result)

    def submit(self, target: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        with self.lock:
            self.submitted.append((args, kwargs))
            return f"fc-{len(self.submitted) - 1}"

    def release(self, call_id: str, value: Any) -> None:
        with self.lock:
            self.released[call_id] = value
            self.lock.notify_all()

    def get_result(self, call_id: str, timeout: float | None) -> Any:
        with self.lock:
            assert self.lock.wait_for(lambda: call_id in self.released, WAIT), f"{call_id} never released"
            value = self.released[call_id]
        if isinstance(value, BaseException):
            raise value
        return value


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    return FakeClient(monkeypatch)


def _f() -> Function:
    return Function.from_name("app", "f")


def test_map_zips_its_iterators_and_passes_kwargs_to_every_call(fake: FakeClient) -> None:
    for i in range(3):
        fake.release(f"fc-{i}", i * 10)
    assert list(_f().map([1, 2, 3], "ab", kwargs={"k": 1})) == [0, 10]  # zip stops at the shortest
    assert fake.submitted == [((1, "a"), {"k": 1}), ((2, "b"), {"k": 1})]
    fake.submitted.clear()
    assert list(_f().starmap([(1, 2), [3]])) == [0, 10]
    assert fake.submitted == [((1, 2), {}), ((3,), {})]
    with pytest.raises(errors.InvalidOptionError, match=r"\.map\(kwargs=\): a dict of keyword arguments"):
        list(_f().map([1], kwargs=[("k", 1)]))  # type: ignore[arg-type]


def test_map_with_order_outputs_false_yields_in_completion_order(fake: FakeClient) -> None:
    results = _f().map([0, 1, 2], order_outputs=False)
    fake.release("fc-2", "third input")
    assert next(results) == "third input", "the first to finish comes first"
    fake.release("fc-0", "first input")
    assert next(results) == "first input"
    fake.release("fc-1", "second input")
    assert list(results) == ["second input"]


def test_map_exceptions_raise_in_order_or_come_back_as_values(fake: FakeClient) -> None:
    boom = ValueError("boom")
    fake.release("fc-0", 1)
    fake.release("fc-1", boom)
    fake.release("fc-2", 3)
    assert list(_f().map([0, 1, 2], return_exceptions=True)) == [1, boom, 3]
    for i, value in enumerate([1, boom, 3]):
        fake.release(f"fc-{i + 3}", value)
    seen = []
    with pytest.raises(ValueError, match="boom"):
        for v in _f().map([0, 1, 2]):
            seen.append(v)
    assert seen == [1]
    fake.release("fc-6", errors.ServerError("the server closed the connection"))
    with pytest.raises(errors.ServerError):  # a lost server is no input's result: never returned as one
        list(_f().map([0], return_exceptions=True, order_outputs=False))


def test_spawn_map_gives_one_handle_for_every_input(fake: FakeClient) -> None:
    handle = _f().spawn_map(["a", "b", "c"])
    assert handle.num_inputs() == 3 and handle.object_id == "fc-0,fc-1,fc-2"
    for i in range(3):
        fake.release(f"fc-{i}", i)
    again = FunctionCall.from_id(handle.object_id)
    assert [again.get(index=i) for i in range(3)] == [0, 1, 2] and list(again.iter(start=1)) == [1, 2]
    with pytest.raises(errors.InvalidOptionError, match=r"has 3 input\(s\), so index is 0 to 2"):
        handle.get(index=3)
    with pytest.raises(errors.InvalidOptionError, match="is not a call id"):
        FunctionCall.from_id("fc-1,../etc")


def test_gather_waits_for_all_and_raises_the_first_failure_in_the_order_given(fake: FakeClient) -> None:
    fake.release("fc-a", 1)
    fake.release("fc-b", KeyError("second"))
    fake.release("fc-c", ValueError("third"))
    assert FunctionCall.gather(FunctionCall("fc-a"), FunctionCall("fc-a")) == [1, 1]
    with pytest.raises(KeyError, match="second"):
        FunctionCall.gather(FunctionCall("fc-a"), FunctionCall("fc-b"), FunctionCall("fc-c"))
    with pytest.raises(errors.InvalidOptionError, match="takes FunctionCalls"):
        FunctionCall.gather("fc-a")  # type: ignore[arg-type]


def test_for_each_raises_the_first_failure_unless_told_to_ignore_it(fake: FakeClient) -> None:
    fake.release("fc-0", 1)
    fake.release("fc-1", ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        _f().for_each([0, 1])
    fake.release("fc-2", 1)
    fake.release("fc-3", ValueError("bad"))
    assert _f().for_each([0, 1], ignore_exceptions=True) is None


# ----- where code runs ---------------------------------------------------------------------------------------


def test_is_local_and_app_run_inside_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    assert modal.is_local() and modal.current_function_call_id() is None
    monkeypatch.setenv("WARMBOOT_IN_CONTAINER", "1")
    assert not modal.is_local()
    with pytest.raises(errors.InvalidOptionError, match='under `if __name__ == "__main__":`'):
        modal.App("x").run().__enter__()  # refused on entering the block


def test_enable_output_nests() -> None:
    from warmboot.sdk.running import output_enabled

    assert not output_enabled()
    with modal.enable_output():
        with modal.enable_output():
            assert output_enabled()
        assert output_enabled()
    assert not output_enabled()


def test_the_map_window_is_bounded() -> None:
    assert 1 <= mapping.UNORDERED_WINDOW <= 64, "each waiting thread holds one of the server's 256 connections"
