"""``modal.Retries``: how often, and after what delays, a failed input runs again.

An input is retried when its function raises, or when its container dies while running it; not when it times
out, was cancelled, or is a generator call (``.remote_gen``, whose values may already have reached the caller).
The server waits between attempts: ``initial_delay`` before the first retry, multiplied by
``backoff_coefficient`` after each one, never more than ``max_delay``. ``retries=N`` (an int) means
``Retries(max_retries=N, backoff_coefficient=1.0, initial_delay=1.0)``, as in Modal.
"""

from __future__ import annotations

from typing import Any

from warmboot.errors import InvalidOptionError

MAX_RETRIES = 10  #: Modal's limit, kept so that an app valid here is valid there


def _number(where: str, name: str, value: Any, low: float, high: float, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise InvalidOptionError(f"{where}: {name}= is {meaning}, from {low:g} to {high:g}; got {value!r}")
    return float(value)


class Retries:
    """A retry policy for ``@app.function(retries=...)`` and ``@app.cls(retries=...)``.

    Example::

        @app.function(retries=modal.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=1.0))
        def flaky():
            ...  # attempts 2, 3 and 4 start 1 s, 2 s and 4 s after the failure before them
    """

    def __init__(
        self,
        *,
        max_retries: int,
        backoff_coefficient: float = 2.0,
        initial_delay: float = 1.0,
        max_delay: float = 60.0,
    ):
        where = "modal.Retries"
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 1 <= max_retries <= MAX_RETRIES:
            raise InvalidOptionError(
                f"{where}: max_retries= is how many times a failed input runs again, from 1 to {MAX_RETRIES}; "
                f"got {max_retries!r} (for no retries, leave retries= out)"
            )
        self.max_retries = max_retries
        self.backoff_coefficient = _number(
            where, "backoff_coefficient", backoff_coefficient, 1.0, 10.0, "what each delay is multiplied by (1: fixed)"
        )
        self.initial_delay = _number(where, "initial_delay", initial_delay, 0.0, 60.0, "seconds before the first retry")
        self.max_delay = _number(where, "max_delay", max_delay, 1.0, 60.0, "the longest delay in seconds")

    def __repr__(self) -> str:
        return (
            f"Retries(max_retries={self.max_retries}, backoff_coefficient={self.backoff_coefficient:g}, "
            f"initial_delay={self.initial_delay:g}, max_delay={self.max_delay:g})"
        )

    def to_spec(self) -> dict[str, Any]:
        """The policy as plain data (it travels in the deploy spec)."""
        return {
            "max_retries": self.max_retries,
            "backoff_coefficient": self.backoff_coefficient,
            "initial_delay": self.initial_delay,
            "max_delay": self.max_delay,
        }


def check(decorator: str, value: Any) -> int | dict[str, Any]:
    """``retries=`` as it goes into the spec: an int (0 to 10), or a :class:`Retries` as its :meth:`~Retries.to_spec`
    dict (a dict is checked again: a deploy request may come from any client)."""
    if isinstance(value, Retries):
        return value.to_spec()
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"max_retries", "backoff_coefficient", "initial_delay", "max_delay"})
        if unknown or "max_retries" not in value:
            raise InvalidOptionError(
                f"{decorator}: retries= as a map needs max_retries and may have backoff_coefficient, initial_delay, "
                f"max_delay; got {sorted(value)}"
            )
        return Retries(**value).to_spec()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidOptionError(
            f"{decorator}: retries= must be a non-negative integer, got {value!r} (or a modal.Retries(...) policy)"
        )
    if value > MAX_RETRIES:
        raise InvalidOptionError(f"{decorator}: retries= is at most {MAX_RETRIES}, got {value}")
    return value


def policy(value: int | dict[str, Any]) -> tuple[int, float, float, float]:
    """``(max_retries, initial_delay, backoff_coefficient, max_delay)`` of a checked ``retries=`` value."""
    if isinstance(value, dict):
        return (
            int(value["max_retries"]),
            float(value["initial_delay"]),
            float(value["backoff_coefficient"]),
            float(value["max_delay"]),
        )
    return int(value), 1.0, 1.0, 60.0  # Modal's meaning of retries=N: a fixed 1 s delay


def delay(attempt: int, initial_delay: float, backoff_coefficient: float, max_delay: float) -> float:
    """Seconds to wait before retry number ``attempt`` (1 for the first retry)."""
    return min(initial_delay * backoff_coefficient ** (attempt - 1), max_delay)
