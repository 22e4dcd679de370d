"""``warmboot deploy`` and the deploy step that ``warmboot run`` shares with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from warmboot.cli import appfile
from warmboot.sdk import client
from warmboot.sdk.app import App

console = Console(stderr=True)


def push(path: Path, app: App, *, name: str | None, ephemeral: bool) -> dict[str, Any]:
    """Send the app to the server (building its images, streaming progress) and return the server's reply."""
    result: dict[str, Any] = {}
    with console.status(f"Deploying {path.name} ...") as status:
        for event in client.stream(
            "deploy", spec=app.spec(), source=path.read_bytes(), filename=path.name, name=name, ephemeral=ephemeral
        ):
            if "log" in event:
                console.print(f"[dim]{escape(event['log'])}[/dim]", highlight=False, soft_wrap=True)
                status.update(event["log"][:100])
            if event.get("done"):
                result = event["value"]
    return result


def deploy(
    file: str = typer.Argument(..., help="The app file (a .py file that defines a warmboot App)."),
    name: str = typer.Option(None, "--name", help="Deploy under this name instead of the App's own."),
) -> None:
    """Deploy an app: its functions stay callable (by name) until stopped, across server restarts.

    Example:

        warmboot deploy examples/hello.py

        python -c "import warmboot; print(warmboot.Function.from_name('hello', 'square').remote(7))"
    """
    path, _, app = appfile.load(file)
    result = push(path, app, name=name or app.name or path.stem, ephemeral=False)
    console.print(
        f"[green]Deployed[/green] app [bold]{result['name']}[/bold] version {result['version']}: "
        + ", ".join(result["functions"])
    )
    show_web_endpoints(result)


def show_web_endpoints(result: dict[str, Any]) -> None:
    """One line per web endpoint of a deploy's reply: where it is served, and whether it needs a token."""
    for endpoint in result.get("web_endpoints") or []:
        where = endpoint["function"] + (f".{endpoint['method']}" if endpoint["method"] else "")
        url = endpoint["url"] or "(the HTTP gateway is not running: see `warmboot server status`)"
        auth = "  [dim](requires a proxy auth token)[/dim]" if endpoint["requires_proxy_auth"] else ""
        console.print(f"  {escape(where)} => [cyan]{escape(url)}[/cyan]{auth}", highlight=False)
