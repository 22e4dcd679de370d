"""Running inputs inside the container: sync or async functions, generators, one at a time or concurrently.

- A sync function runs in a thread: the main thread when the container takes one input at a time, else one of
  ``max_concurrent`` pool threads (``@modal.concurrent``).
- An async function (or async generator) runs on one asyncio loop, in a thread of its own, shared by every
  input: concurrent async inputs are tasks on that loop, as in Modal.
- A generator call (``.remote_gen``) sends each yielded value as an ``Item`` frame, then its ``Result``.

Frames from concurrent inputs are written under one lock, so they never interleave on the pipe. Each input
sees its own call id in ``warmboot.sdk.context.CALL_ID``.
"""

from __future__ import annotations

import functools
import threading
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from warmboot.runtime import wire

if TYPE_CHECKING:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

# asyncio and concurrent.futures are imported where first needed: every container's cold start pays for what
# this module imports, and most functions are sync and take one input at a time.


class Executor:
    """Runs :class:`wire.CallInput` messages against ``resolve(method)`` and writes their frames to ``out``."""

    def __init__(self, resolve: Callable[[str | None], Any], out: BinaryIO, max_concurrent: int = 1):
        self._resolve = resolve
        self._out = out
        self._write_lock = threading.Lock()
        self.max_concurrent = max_concurrent
        self._threads: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._in_flight: set[Any] = set()

    # ----- the frames ------------------------------------------------------------------------------------

    def send(self, message: wire.Message) -> None:
        with self._write_lock:
            wire.send_message(self._out, message)

    def send_many(self, messages: list[wire.Message]) -> None:
        if messages:
            with self._write_lock:
                wire.send_messages(self._out, messages)

    # ----- dispatch -----------------------------------------------------------------------------------------

    def submit(self, call: wire.CallInput) -> None:
        """Run ``call``: inline with one input at a time, else in the background."""
        if self.max_concurrent <= 1:
            self.send(self._run_in_thread(call))
            return
        import asyncio

        if self._is_async(call):
            future = asyncio.run_coroutine_threadsafe(self._run_async_and_send(call), self.loop())
        else:
            if self._threads is None:
                from concurrent.futures import ThreadPoolExecutor

                self._threads = ThreadPoolExecutor(self.max_concurrent, thread_name_prefix="input")
            future = self._threads.submit(lambda: self.send(self._run_in_thread(call)))
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)

    def submit_batch(self, batch: wire.BatchInput) -> None:
        """Run a ``@batched`` function once on the gathered calls; one Result per call (inline: batches of one
        function do not overlap)."""
        for result in self._run_batch(batch):
            self.send(result)

    def _run_batch(self, batch: wire.BatchInput) -> list[wire.Result]:
        import cloudpickle

        from warmboot.sdk.context import CALL_ID

        token = CALL_ID.set(batch.call_ids[0])
        try:
            fn = self._resolve(batch.method)
            import inspect  # batches only: every container's start would pay for it

            signature = inspect.signature(fn)
            columns: dict[str, list[Any]] = {name: [] for name in signature.parameters}
            for payload in batch.split():
                args, kwargs = cloudpickle.loads(payload)
                for name, value in signature.bind(*args, **kwargs).arguments.items():
                    columns[name].append(value)
            result = fn(**columns)
            if _awaitable(result):
                import asyncio

                result = asyncio.run_coroutine_threadsafe(_awaited(result), self.loop()).result()
            if not isinstance(result, list) or len(result) != len(batch.call_ids):
                got = f"a list of {len(result)}" if isinstance(result, list) else type(result).__name__
                raise _CallShapeError(
                    f"{getattr(fn, '__name__', 'the function')} is @batched: it must return a list with one result "
                    f"per input ({len(batch.call_ids)} here), it returned {got}"
                )
        except BaseException as exc:  # noqa: BLE001 - the batch's failure is every one of its calls' failure
            return [_failure(call_id, exc) for call_id in batch.call_ids]
        finally:
            CALL_ID.reset(token)
        return [_success(call_id, value) for call_id, value in zip(batch.call_ids, result, strict=True)]

    def track(self, future: Any) -> None:
        """Count a background input (a web request) as in flight, so that :meth:`drain` waits for it."""
        self._in_flight.add(future)
        future.add_done_callback(self._in_flight.discard)

    def drain(self) -> None:
        """Wait for the inputs still running (before ``@exit`` hooks run)."""
        for future in list(self._in_flight):
            future.result()

    def loop(self) -> asyncio.AbstractEventLoop:
        """The container's one asyncio loop, started on first use (sync-only apps never pay for it)."""
        import asyncio

        with self._loop_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=_run_loop, args=(loop,), name="asyncio", daemon=True).start()
                self._loop = loop
            return self._loop

    def run_hook(self, hook: Callable[[], Any]) -> None:
        """Run a lifecycle hook, awaiting it on the loop if it is async."""
        result = hook()
        if _awaitable(result):
            import asyncio

            asyncio.run_coroutine_threadsafe(_awaited(result), self.loop()).result()

    def _is_async(self, call: wire.CallInput) -> bool:
        try:
            fn = self._resolve(call.method)
        except Exception:  # noqa: BLE001 - the call itself reports it
            return False
        return _is_coroutine_function(fn) or _is_async_generator_function(fn)

    # ----- one input ------------------------------------------------------------------------------------------

    def _run_in_thread(self, call: wire.CallInput) -> wire.Result:
        from warmboot.sdk.context import CALL_ID

        token = CALL_ID.set(call.call_id)
        try:
            fn, args, kwargs = self._prepare(call)
            if _is_coroutine_function(fn) or _is_async_generator_function(fn):
                import asyncio

                return asyncio.run_coroutine_threadsafe(self._run_async(call), self.loop()).result()
            if _is_generator_function(fn):
                for value in fn(*args, **kwargs):
                    self.send(wire.Item(call.call_id, _dumps(value)))
                return wire.Result(call.call_id, ok=True, value=_dumps(None))
            return _success(call.call_id, fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - every user exception goes back to the caller
            return _failure(call.call_id, exc)
        finally:
            CALL_ID.reset(token)

    async def _run_async_and_send(self, call: wire.CallInput) -> None:
        self.send(await self._run_async(call))

    async def _run_async(self, call: wire.CallInput) -> wire.Result:
        from warmboot.sdk.context import CALL_ID

        CALL_ID.set(call.call_id)  # a task runs in a copy of the context: this input's own
        try:
            fn, args, kwargs = self._prepare(call)
            if _is_async_generator_function(fn):
                async for value in fn(*args, **kwargs):
                    self.send(wire.Item(call.call_id, _dumps(value)))
                return wire.Result(call.call_id, ok=True, value=_dumps(None))
            if _is_generator_function(fn):  # a sync generator reached the loop: run it in a thread
                import asyncio

                return await asyncio.to_thread(self._run_in_thread, call)
            result = fn(*args, **kwargs)
            if _awaitable(result):
                result = await result
            return _success(call.call_id, result)
        except BaseException as exc:  # noqa: BLE001
            return _failure(call.call_id, exc)

    def _prepare(self, call: wire.CallInput) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
        """The function and its arguments; refuses a generator called without ``.remote_gen`` and vice versa."""
        import cloudpickle

        fn = self._resolve(call.method)
        is_gen = _is_generator_function(fn) or _is_async_generator_function(fn)
        name = getattr(fn, "__name__", "the function")
        if is_gen and not call.generator:
            raise _CallShapeError(f"{name} is a generator function: call it with .remote_gen(), not .remote()")
        if call.generator and not is_gen:
            raise _CallShapeError(f"{name} is not a generator function: call it with .remote(), not .remote_gen()")
        args, kwargs = cloudpickle.loads(call.args)
        return fn, args, kwargs


# What kind of function a call runs, read from its code's flags as inspect does, without importing inspect (and ast,
# dis, ...): every container imports this module at start, and its start is a cold start.
_CO_GENERATOR, _CO_COROUTINE, _CO_ASYNC_GENERATOR = 0x20, 0x80, 0x200


def _code_flags(fn: Any) -> int:
    fn = getattr(fn, "__func__", fn)  # a bound method: its function
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(fn, "__code__", None)
    return code.co_flags if code is not None else 0


def _is_coroutine_function(fn: Any) -> bool:
    return bool(_code_flags(fn) & _CO_COROUTINE)


def _is_async_generator_function(fn: Any) -> bool:
    return bool(_code_flags(fn) & _CO_ASYNC_GENERATOR)


def _is_generator_function(fn: Any) -> bool:
    return bool(_code_flags(fn) & _CO_GENERATOR)


def _awaitable(value: Any) -> bool:
    return hasattr(type(value), "__await__")


class _CallShapeError(Exception):
    """The caller used the wrong call for the function's kind; reported as warmboot's InvalidOptionError."""


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Run the container's loop for good, under one long-lived root task.

    Not ``run_forever()``: libraries look for the task that ``run_until_complete`` runs as the loop's root and tie
    state to it. anyio (Starlette's thread pool for sync endpoints) otherwise takes each request's task as the
    root and starts a new worker thread for every request, since its workers end with their root task.
    """
    import asyncio

    async def root() -> None:
        await asyncio.Event().wait()  # never set: the loop lives as long as the container

    asyncio.set_event_loop(loop)
    loop.run_until_complete(root())


def _dumps(value: Any) -> bytes:
    import cloudpickle

    return cloudpickle.dumps(value)


def _success(call_id: str, value: Any) -> wire.Result:
    try:
        return wire.Result(call_id, ok=True, value=_dumps(value))
    except Exception as exc:  # noqa: BLE001
        return wire.Result(call_id, ok=False, message=f"the result ({type(value).__name__}) cannot be pickled: {exc}")


def _failure(call_id: str, exc: BaseException) -> wire.Result:
    if isinstance(exc, _CallShapeError):
        return wire.Result(call_id, ok=False, error_type="InvalidOptionError", message=str(exc))
    try:
        pickled = _dumps(exc)
    except Exception:  # noqa: BLE001 - unpicklable exceptions travel as text
        pickled = None
    return wire.Result(
        call_id,
        ok=False,
        exception=pickled,
        message=f"{type(exc).__name__}: {exc}",
        traceback="".join(traceback.format_exception(exc)),
    )
