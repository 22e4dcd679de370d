"""``.aio``: the async form of a blocking SDK call, Modal style (``await f.remote.aio(x)``).

A method decorated with :class:`aio_method` is called as before (``f.remote(x)`` blocks), and also has an ``.aio``
attribute: ``await f.remote.aio(x)``, or ``async for v in f.map.aio(xs)`` for a method that returns an iterator.
The blocking call runs on a thread of a pool of this module's own (not asyncio's default one, which has only a
few threads: ``asyncio.gather`` over a hundred ``.remote.aio()`` calls must run them all at once), so the event
loop never waits on the server's socket.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

#: Threads for blocking calls made through ``.aio``: calls waiting at once (the server takes 256 connections).
MAX_THREADS = 128

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    from concurrent.futures import ThreadPoolExecutor  # not at import: containers import the SDK too

    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="warmboot-aio")
        return _executor


async def run_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on a thread, awaited without blocking the event loop."""
    import asyncio

    return await asyncio.get_running_loop().run_in_executor(_pool(), functools.partial(fn, *args, **kwargs))


async def iterate_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
    """The items of the iterator ``fn(*args, **kwargs)`` returns, each fetched on a thread as it comes."""
    it = iter(await run_blocking(fn, *args, **kwargs))
    end = object()
    try:
        while (item := await run_blocking(next, it, end)) is not end:
            yield item
    finally:
        close = getattr(it, "close", None)  # a generator call stops streaming (its connection closes)
        if close is not None:
            await run_blocking(close)


class _Bound:
    """A method bound to its object: call it to block, or use ``.aio`` to await (or ``async for``)."""

    def __init__(self, fn: Callable[..., Any], iterates: bool):
        self._fn = fn
        self._iterates = iterates
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def aio(self, *args: Any, **kwargs: Any) -> Any:
        """The same call, async: a coroutine, or an async iterator for calls that return an iterator."""
        if self._iterates:
            return iterate_blocking(self._fn, *args, **kwargs)
        return run_blocking(self._fn, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<{getattr(self._fn, '__qualname__', self._fn)} (with .aio)>"


class aio_method:  # lower case: a decorator, like property
    """Decorator: the method keeps its blocking call and gains ``.aio`` (see the module's docstring).

    ``iterates=True``: the method returns an iterator, and ``.aio`` an async iterator. ``static=True``: a static
    method (``FunctionCall.gather``).
    """

    def __init__(self, fn: Callable[..., Any] | None = None, *, iterates: bool = False, static: bool = False):
        self._fn = fn
        self._iterates = iterates
        self._static = static
        if fn is not None:
            functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._fn is None:  # @aio_method(iterates=True): the decorator's second step, given the method
            return aio_method(args[0], iterates=self._iterates, static=self._static)
        return self._fn(*args, **kwargs)  # Function.remote(f, x), called on the class

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        assert self._fn is not None
        if self._static:
            return _Bound(self._fn, self._iterates)
        if obj is None:
            return self  # looked up on the class: the plain function, for help() and docs
        return _Bound(self._fn.__get__(obj, owner), self._iterates)
