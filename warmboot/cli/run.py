"""``warmboot run``: run an app ephemerally, call its entrypoint, stream its output, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import inspect

import typer
from rich.console import Console
from rich.markup import escape

from warmboot.cli import appfile
from warmboot.cli.deploy import show_web_endpoints
from warmboot.cli.manage import printable
from warmboot.errors import WarmbootError
from warmboot.sdk.function import Function
from warmboot.sdk.running import ephemeral

console = Console(stderr=True)


def run(
    target: str = typer.Argument(..., help="FILE or FILE::NAME (a local entrypoint, or a function to call)."),
) -> None:
    """Run an app without deploying it: call its local entrypoint (or FILE::NAME), show its output, stop it.

    Containers boot cold under `warmboot run`; memory snapshots are made for deployed apps only.

    Example:

        warmboot run examples/hello.py            # runs the @app.local_entrypoint()

        warmboot run examples/hello.py::square    # calls square.remote() with no arguments
    """
    file, _, entry = target.partition("::")
    path, _, app = appfile.load(file)
    if entry:
        if entry in app.local_entrypoints:
            fn = app.local_entrypoints[entry]
        elif isinstance(app.registered.get(entry), Function):
            fn = app.registered[entry].remote  # type: ignore[union-attr]
        elif entry in app.registered:
            raise WarmbootError(
                f"{file}::{entry}: {entry} is a class, and `warmboot run` calls a function or a local entrypoint; "
                f"call its methods from an @app.local_entrypoint(), e.g. {entry}().METHOD.remote()"
            )
        else:
            names = [*app.local_entrypoints, *app.registered]
            raise WarmbootError(f"{file} has no entrypoint or function {entry!r} (it has: {', '.join(names)})")
    elif len(app.local_entrypoints) == 1:
        fn = next(iter(app.local_entrypoints.values()))
    elif app.local_entrypoints:
        raise WarmbootError(f"{file} has several local entrypoints; pick one: {file}::NAME")
    else:
        raise WarmbootError(f"{file} has no @app.local_entrypoint(); name a function to call: {file}::NAME")
    with contextlib.ExitStack() as running:
        with console.status(f"Deploying {path.name} ...") as status:

            def deploying(line: str) -> None:
                console.print(f"[dim]{escape(line)}[/dim]", highlight=False, soft_wrap=True)
                status.update(line[:100])

            result = running.enter_context(ephemeral(app, path, on_log=deploying, on_line=_show_line))
        show_web_endpoints(result)
        value = fn()
        if inspect.iscoroutine(value):  # an `async def` entrypoint: run it on an event loop of its own
            value = asyncio.run(value)
        if value is not None:
            print(value)


def _show_line(line: str) -> None:
    console.print(printable(line), highlight=False, markup=False, soft_wrap=True)
