"""``@modal.batched``: the platform gathers single calls into lists, and the function runs once per list."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from warmboot.errors import InvalidOptionError

F = TypeVar("F", bound=Callable[..., Any])

BATCHING_ATTR = "_warmboot_batching"  # value: {"max_batch_size": int, "wait_ms": int}
MAX_BATCH_SIZE = 1000
MAX_WAIT_MS = 10 * 60 * 1000


def batched(*, max_batch_size: int, wait_ms: int) -> Callable[[F], F]:
    """Run this function on batches: callers call it with single values (``f.remote(x)``), the platform gathers
    up to ``max_batch_size`` waiting calls (waiting at most ``wait_ms`` for more once it has one), and the
    function receives one list per parameter and returns a list with one result per call, in order.

    Put it under ``@app.function()``, or on an ``@app.cls`` method under ``@modal.method()``.

    Example::

        @app.function()
        @modal.batched(max_batch_size=8, wait_ms=100)
        def embed(texts: list[str]) -> list[list[float]]: ...
    """
    if (
        isinstance(max_batch_size, bool)
        or not isinstance(max_batch_size, int)
        or not 1 <= max_batch_size <= MAX_BATCH_SIZE
    ):
        raise InvalidOptionError(
            f"@modal.batched: max_batch_size= must be an integer from 1 to {MAX_BATCH_SIZE}, got {max_batch_size!r}"
        )
    if isinstance(wait_ms, bool) or not isinstance(wait_ms, int) or not 0 <= wait_ms < MAX_WAIT_MS:
        raise InvalidOptionError(
            f"@modal.batched: wait_ms= must be an integer from 0 to {MAX_WAIT_MS - 1} (milliseconds), got {wait_ms!r}"
        )

    def mark(f: F) -> F:
        check_batchable(f)
        setattr(f, BATCHING_ATTR, {"max_batch_size": max_batch_size, "wait_ms": wait_ms})
        return f

    return mark


def check_batchable(f: Callable[..., Any]) -> None:
    """Refuse what cannot run on batches: no parameters, ``*args``/``**kwargs``, defaults, a generator, or a
    parameter annotated with something that is not a list."""
    import inspect  # only where @batched is used: its checks run at decoration, in containers too
    import typing

    name = getattr(f, "__name__", repr(f))
    if hasattr(f, "raw_f") or hasattr(f, "user_cls"):
        raise InvalidOptionError("@modal.batched goes below @app.function(), so that it applies first")
    if inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f):
        raise InvalidOptionError(f"@modal.batched: {name} is a generator; a batched function returns a list")
    params = [p for p in inspect.signature(f).parameters.values() if p.name != "self"]
    if not params:
        raise InvalidOptionError(f"@modal.batched: {name} takes no arguments; it needs at least one list to batch")
    try:
        hints = typing.get_type_hints(f)
    except Exception:  # noqa: BLE001 - unresolvable annotations: nothing to check them against
        hints = {}
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise InvalidOptionError(f"@modal.batched: {name} takes *{p.name}; batched parameters are named lists")
        if p.default is not p.empty:
            raise InvalidOptionError(f"@modal.batched: parameter {p.name!r} of {name} has a default; remove it")
        hint = hints.get(p.name)
        if hint is not None and typing.get_origin(hint) is not list and hint is not list:
            raise InvalidOptionError(
                f"@modal.batched: parameter {p.name!r} of {name} is annotated {getattr(hint, '__name__', hint)}; "
                "a batched function receives a list per parameter (annotate it list[...])"
            )


def batching_of(target: Any) -> dict[str, Any] | None:
    """What ``@modal.batched`` set on a function, if anything."""
    return getattr(target, BATCHING_ATTR, None)


def batching_spec(target: Any, *, concurrency: dict[str, Any] | None) -> dict[str, Any] | None:
    """The batching of an ``@app.function`` function or ``@app.cls`` class, as plain data for the spec.

    A class may have one batched method and no other ``@method``: its containers take inputs in batches, and a
    batch must be of one method. Batching and ``@modal.concurrent`` do not mix (a batch is already many inputs).
    """
    if isinstance(target, type):
        batched = {name: b for name, m in vars(target).items() if (b := batching_of(m)) is not None}
        if not batched:
            return None
        from warmboot.sdk.partial import lifecycle

        methods = lifecycle(target)["methods"]
        if len(batched) > 1 or len(methods) > 1:
            raise InvalidOptionError(
                f"{target.__name__}: a class with a @modal.batched method can have no other methods "
                f"(it has {', '.join(methods)}); put the others in a class of their own"
            )
        ((method, spec),) = batched.items()
        spec = {**spec, "method": method}
    else:
        spec = batching_of(target)
        if spec is None:
            return None
        spec = {**spec, "method": None}
    if concurrency is not None:
        raise InvalidOptionError(
            f"{getattr(target, '__name__', target)}: @modal.batched and @modal.concurrent do not combine; "
            "a batch already runs many inputs at once, so drop one of them"
        )
    return spec
