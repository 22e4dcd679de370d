"""``warmboot run``: run an app ephemerally, call its entrypoint, stream its output, stop it."""

from __future__ import annotations

import threading
import time

import typer
from rich.console import Console
from rich.markup import escape

from warmboot.cli import appfile
from warmboot.cli.deploy import push
from warmboot.cli.manage import printable
from warmboot.errors import WarmbootError
from warmboot.sdk import client
from warmboot.sdk.function import Function

console = Console(stderr=True)


def _stream_logs(app_id: str, stop: threading.Event) -> None:
    try:
        for event in client.stream("logs", app=app_id, from_end=True, follow=True):
            if "line" in event:
                console.print(printable(event["line"]), highlight=False, markup=False, soft_wrap=True)
            if stop.is_set():
                return
    except WarmbootError:
        return


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
    result = push(path, app, name=app.name or path.stem, ephemeral=True)

    app._app_id = result["app_id"]
    stop = threading.Event()
    streamer = threading.Thread(target=_stream_logs, args=(result["app_id"], stop), daemon=True)
    streamer.start()
    try:
        value = fn()
        if value is not None:
            print(value)
    finally:
        try:
            client.request("app_stop", app=result["app_id"])
        except WarmbootError as exc:
            console.print(f"[yellow]Warning:[/yellow] could not stop the app: {escape(str(exc))}")
        time.sleep(0.3)  # the containers are stopped and their output written: let the last lines through
        stop.set()
