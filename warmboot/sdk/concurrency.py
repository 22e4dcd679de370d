"""``@modal.concurrent``: one container runs several inputs at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from warmboot.errors import InvalidOptionError

T = TypeVar("T", bound=Callable[..., Any] | type)

CONCURRENCY_ATTR = "_warmboot_concurrency"  # value: {"max_inputs": int, "target_inputs": int | None}


def concurrent(*, max_inputs: int, target_inputs: int | None = None) -> Callable[[T], T]:
    """Let one container run up to ``max_inputs`` inputs at once (async functions as asyncio tasks on one loop,
    sync functions in threads). Put it under ``@app.function()`` or ``@app.cls()``.

    ``target_inputs`` is accepted for Modal compatibility and checked; scaling here starts a container when the
    waiting inputs exceed the free slots, counting ``max_inputs`` per container.

    Example::

        @app.function()
        @modal.concurrent(max_inputs=20)
        async def fetch(url: str) -> int: ...
    """
    for name, value in (("max_inputs", max_inputs), ("target_inputs", target_inputs)):
        if value is None and name == "target_inputs":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1000:
            raise InvalidOptionError(f"@modal.concurrent: {name}= must be an integer from 1 to 1000, got {value!r}")
    if target_inputs is not None and target_inputs > max_inputs:
        raise InvalidOptionError(f"@modal.concurrent: target_inputs={target_inputs} exceeds max_inputs={max_inputs}")

    def mark(target: T) -> T:
        if hasattr(target, "raw_f") or hasattr(target, "user_cls"):
            raise InvalidOptionError(
                "@modal.concurrent goes below @app.function() / @app.cls(), so that it applies first"
            )
        setattr(target, CONCURRENCY_ATTR, {"max_inputs": max_inputs, "target_inputs": target_inputs})
        return target

    return mark


def concurrency_of(target: Any) -> dict[str, Any] | None:
    """What ``@modal.concurrent`` set on a function or class, if anything."""
    return getattr(target, CONCURRENCY_ATTR, None)
