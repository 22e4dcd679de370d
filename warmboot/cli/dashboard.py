"""`warmboot dashboard`: the web dashboard's URL, with its login token (and a browser, where there is a desktop)."""

from __future__ import annotations

import os
import webbrowser

import typer
from rich.console import Console

from warmboot.sdk import client

console = Console()


def dashboard(
    renew: bool = typer.Option(
        False, "--renew-token", help="Make a new login token: old URLs and cookies stop working."
    ),
    open_browser: bool = typer.Option(
        True, "--open/--no-open", help="Open it in a browser where a desktop is present."
    ),
) -> None:
    """Print the dashboard's URL: apps, functions and their calls, containers, snapshots, logs, secrets, volumes,
    and charts of cold boot, restore and warm start times.

    The URL carries a login token: every page needs it (the first visit trades it for a cookie). The dashboard
    is served by the HTTP gateway, on 127.0.0.1 unless WARMBOOT_GATEWAY_HOST says otherwise.

    Examples:

        warmboot dashboard

        warmboot dashboard --no-open --renew-token
    """
    url = client.request("dashboard_url", renew=renew)
    console.print(f"Dashboard: [link={url}]{url}[/link]", soft_wrap=True, highlight=False)
    if open_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        webbrowser.open(url)
