"""Lifecycle decorators for ``@app.cls`` classes: ``@enter``, ``@exit`` and ``@method``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from warmboot.sdk.batching import BATCHING_ATTR
from warmboot.sdk.web import WEB_ATTR

F = TypeVar("F", bound=Callable[..., Any])

ENTER_ATTR = "_warmboot_enter"  # value: {"snap": bool}
EXIT_ATTR = "_warmboot_exit"
METHOD_ATTR = "_warmboot_method"


def enter(*, snap: bool = False) -> Callable[[F], F]:
    """Run this method when a container starts.

    ``snap=True`` hooks run before the memory snapshot (their work is captured in it and never runs again in a
    restored container); ``snap=False`` hooks run on every container start, after a restore too.
    """

    def mark(f: F) -> F:
        setattr(f, ENTER_ATTR, {"snap": bool(snap)})
        return f

    return mark


def exit() -> Callable[[F], F]:
    """Run this method when the container shuts down (scale-down, app stop)."""

    def mark(f: F) -> F:
        setattr(f, EXIT_ATTR, True)
        return f

    return mark


def method() -> Callable[[F], F]:
    """Expose this method of an ``@app.cls`` class to ``.remote()`` calls."""

    def mark(f: F) -> F:
        setattr(f, METHOD_ATTR, True)
        return f

    return mark


def lifecycle(user_cls: type) -> dict[str, list[str]]:
    """The names of a class's hooks and methods, in definition order."""
    found: dict[str, list[str]] = {"enter_snap": [], "enter": [], "exit": [], "methods": []}
    for name, member in vars(user_cls).items():
        if (info := getattr(member, ENTER_ATTR, None)) is not None:
            found["enter_snap" if info["snap"] else "enter"].append(name)
        if getattr(member, EXIT_ATTR, False):
            found["exit"].append(name)
        # A @modal.batched or web method is a method too (Modal's classes mark them with that decorator alone).
        if getattr(member, METHOD_ATTR, False) or hasattr(member, BATCHING_ATTR) or hasattr(member, WEB_ATTR):
            found["methods"].append(name)
    return found
