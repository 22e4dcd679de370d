"""Web endpoints from the command line: ``warmboot serve``, ``warmboot endpoint list`` and ``warmboot token ...``."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from warmboot.cli import appfile
from warmboot.cli.deploy import show_web_endpoints
from warmboot.cli.manage import printable, timestamp
from warmboot.cli.tables import Col, fit_table
from warmboot.errors import WarmbootError
from warmboot.sdk import client
from warmboot.sdk.running import ephemeral

console = Console(stderr=True)

endpoints = typer.Typer(help="Web endpoints and their URLs.", no_args_is_help=True)
tokens = typer.Typer(help="Proxy auth tokens for requires_proxy_auth=True endpoints.", no_args_is_help=True)


@endpoints.command("list")
def endpoint_list() -> None:
    """List the web endpoints of every running app, with their URLs.

    Example:

        warmboot endpoint list
    """
    console.print(render_endpoints(client.request("web_list"), width=console.width))


#: `warmboot endpoint list`: the URL always (it is what the command is for); the app and function (which the URL
#: usually names anyway), whether it takes a token and its kind as the width allows.
ENDPOINT_COLUMNS = [Col("url"), Col("app", 2), Col("function", 2), Col("kind", 4), Col("auth", 3)]


def render_endpoints(endpoints: list[dict], *, width: int) -> Table:
    """The table of `warmboot endpoint list` for the server's ``web_list`` reply, fitted to ``width`` columns."""
    cells = [
        [
            escape(e["url"] or "(gateway not running)"),
            escape(e["app"]),
            escape(e["function"] + (f".{e['method']}" if e["method"] else "")),
            e["kind"],
            "token" if e["requires_proxy_auth"] else "",
        ]
        for e in endpoints
    ]
    return fit_table(ENDPOINT_COLUMNS, cells, width=width, command="warmboot endpoint list")


@tokens.command("create")
def token_create() -> None:
    """Create a proxy auth token; its secret is shown once. Send both in the Modal-Key and Modal-Secret headers.

    Example:

        warmboot token create

        curl -H "Modal-Key: wk-..." -H "Modal-Secret: ws-..." http://127.0.0.1:8700/my-app-private
    """
    token = client.request("token_create")
    print(f"Modal-Key: {token['token_id']}")
    print(f"Modal-Secret: {token['token_secret']}")
    console.print("[dim]The secret is not stored in a form that can be shown again: keep it now.[/dim]")


@tokens.command("list")
def token_list() -> None:
    """List proxy auth tokens (their ids, never their secrets).

    Example:

        warmboot token list
    """
    console.print(render_tokens(client.request("token_list"), width=console.width))


TOKEN_COLUMNS = [Col("token id"), Col("created", 2, wrap=True)]


def render_tokens(tokens: list[dict], *, width: int) -> Table:
    """The table of `warmboot token list` for the server's ``token_list`` reply, fitted to ``width`` columns."""
    cells = [[escape(t["token_id"]), timestamp(t["created_at"])] for t in tokens]
    return fit_table(TOKEN_COLUMNS, cells, width=width, command="warmboot token list")


@tokens.command("rm")
def token_rm(token_id: str = typer.Argument(..., help="The token's id (wk-...).")) -> None:
    """Delete a proxy auth token: requests that carry it are refused from now on.

    Example:

        warmboot token rm wk-0123abcd4567ef89
    """
    client.request("token_rm", token_id=token_id)
    console.print(f"Deleted proxy auth token {escape(token_id)}")


def serve(
    file: str = typer.Argument(..., help="The app file (a .py file that defines a warmboot App)."),
) -> None:
    """Serve an app's web endpoints until Ctrl-C, and reload it whenever a file next to it changes.

    The app runs ephemerally (its URLs end in -dev); each change deploys the new version, which takes over
    the URLs, and then stops the old one.

    Example:

        warmboot serve examples/web_endpoints.py

        curl http://127.0.0.1:8700/example-web-hello-dev
    """
    from watchfiles import watch

    path, _, app = appfile.load(file)
    stop = threading.Event()
    # Ctrl-C only sets `stop`: raised as KeyboardInterrupt in the middle of a reload (the old version half
    # stopped, a request to the server half sent), it left the command unable to stop the versions it serves.
    previous_handler = signal.signal(signal.SIGINT, lambda _sig, _frame: stop.set())
    with contextlib.ExitStack() as current:
        current.callback(signal.signal, signal.SIGINT, previous_handler)
        current.enter_context(_serve_version(path, app))
        try:
            for changes in watch(path.parent, stop_event=stop, watch_filter=lambda _c, p: p.endswith(".py")):
                names = ", ".join(sorted({Path(p).name for _, p in changes}))
                console.print(f"[yellow]Changed:[/yellow] {escape(names)}; reloading {path.name}")
                try:
                    _, _, app = appfile.load(str(path))
                    new = contextlib.ExitStack()
                    new.enter_context(_serve_version(path, app))
                except WarmbootError as exc:  # a broken edit: keep serving the last good version
                    console.print(f"[red]Not reloaded:[/red] {escape(str(exc))}", highlight=False)
                    continue
                previous = current.pop_all()
                current.push(new.pop_all())
                previous.close()
        except KeyboardInterrupt:  # a second Ctrl-C while the handler was being set
            stop.set()
        if stop.is_set():
            console.print("Stopping ...")


@contextlib.contextmanager
def _serve_version(path: Path, app: object):  # type: ignore[no-untyped-def]
    def show(line: str) -> None:
        console.print(printable(line), highlight=False, markup=False, soft_wrap=True)

    with ephemeral(app, path, on_log=show, on_line=show) as result:  # type: ignore[arg-type]
        console.print(f"[green]Serving[/green] {escape(path.name)} (version {result['version']}); Ctrl-C stops it")
        show_web_endpoints(result)
        yield result
