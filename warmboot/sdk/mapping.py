"""``.map()``, ``.starmap()``, ``.for_each()`` and ``.spawn_map()``: many inputs of one function at once.

Every input is submitted as a call of its own (the server queues them, and its pool starts containers for them),
then the results are fetched: in input order, or (``order_outputs=False``) as they finish, by a few threads
that each wait for one call at a time.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from warmboot.errors import InvalidOptionError, ServerError

#: Calls waited for at once when results come as they finish (one connection to the server each).
UNORDERED_WINDOW = 32


def _kwargs(kwargs: Any) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidOptionError(f".map(kwargs=): a dict of keyword arguments for every call, got {kwargs!r}")
    return kwargs


def submit_all(invocable: Any, inputs: Iterable[tuple[Any, ...]], kwargs: Any) -> list[str]:
    """Submit one call per input (each a tuple of positional arguments); their call ids, in input order."""
    from warmboot.sdk import client

    target = invocable._target()
    extra = _kwargs(kwargs)
    return [client.submit(target, tuple(args), extra) for args in inputs]


def _outcome(call_id: str, return_exceptions: bool) -> tuple[bool, Any]:
    """``(True, result)``, or ``(False, exception)``; the server's own failures (it went away) always raise."""
    from warmboot.sdk import client

    try:
        return True, client.get_result(call_id, None)
    except ServerError:
        raise
    except Exception as exc:  # noqa: BLE001 - an input's failure: its caller decides (return_exceptions)
        return False, exc


def run(
    invocable: Any, inputs: Iterable[tuple[Any, ...]], kwargs: Any, order_outputs: bool, return_exceptions: bool
) -> Iterator[Any]:
    """Submit every input, then yield each result (or its exception, with ``return_exceptions``)."""
    call_ids = submit_all(invocable, inputs, kwargs)
    outcomes = _in_order(call_ids, return_exceptions) if order_outputs else _as_finished(call_ids, return_exceptions)
    for ok, value in outcomes:
        if not ok and not return_exceptions:
            raise value
        yield value


def _in_order(call_ids: list[str], return_exceptions: bool) -> Iterator[tuple[bool, Any]]:
    for call_id in call_ids:
        yield _outcome(call_id, return_exceptions)


def _as_finished(call_ids: list[str], return_exceptions: bool) -> Iterator[tuple[bool, Any]]:
    """Outcomes in the order the calls finish, by up to :data:`UNORDERED_WINDOW` waiting threads.

    The threads are daemons: a caller that stops iterating early leaves them waiting for calls nobody reads,
    and they must not keep the process alive.
    """
    todo: queue.SimpleQueue[str | None] = queue.SimpleQueue()
    done: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    for call_id in call_ids:
        todo.put(call_id)
    workers = min(UNORDERED_WINDOW, len(call_ids))
    for _ in range(workers):
        todo.put(None)  # one end mark per worker

    def work() -> None:
        while (call_id := todo.get()) is not None:
            try:
                done.put(_outcome(call_id, return_exceptions))
            except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
                done.put((False, exc))

    for _ in range(workers):
        threading.Thread(target=work, name="warmboot-map", daemon=True).start()
    for _ in call_ids:
        ok, value = done.get()
        if not ok and isinstance(value, ServerError):
            raise value
        yield ok, value
