"""Commands that inspect and manage what the server runs: apps, containers, logs, secrets, the server."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import time

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from warmboot import config, errors
from warmboot.cli.tables import Col, fit_table
from warmboot.errors import WarmbootError
from warmboot.sdk import client
from warmboot.worker import runtime_lib

console = Console()


#: C0 and C1 control characters but tab: what a container writes must not drive the reader's terminal.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(line: str) -> str:
    """A log line as text for a terminal: control characters (escape sequences, carriage returns, NULs) that a
    container wrote are shown as ``\\xNN`` instead of acting on the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


def timestamp(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


# ----- apps and containers ---------------------------------------------------------------------------

apps = typer.Typer(help="Deployed and running apps.", no_args_is_help=True)


@apps.command("list")
def app_list() -> None:
    """List running apps (deployed, and ephemeral ones under `warmboot run`).

    Example:

        warmboot app list
    """
    console.print(render_apps(client.request("app_list"), width=console.width))


#: `warmboot app list`: the name and state always; the id, counts and times as the width allows.
APP_COLUMNS = [
    Col("name"), Col("app id", 3), Col("state"), Col("version", 5), Col("functions", 2, wrap=True),
    Col("containers", 4), Col("created", 7, wrap=True), Col("next scheduled run", 6, wrap=True),
]  # fmt: skip


def render_apps(rows: list[dict], *, width: int) -> Table:
    """The table of `warmboot app list` for the server's ``app_list`` reply, fitted to ``width`` columns."""
    cells = []
    for r in rows:
        # One line per scheduled function: "f: 2026-01-01 09:00:00 (every 1d)"; the times are local, as "created".
        scheduled = "\n".join(
            f"{s['function']}: {timestamp(s['next_tick'])} ({s['schedule']})" for s in r.get("schedules") or []
        )
        cells.append(
            [
                r["name"],
                r["app_id"],
                r["state"],
                str(r["version"]),
                ", ".join(r["functions"]),
                str(r["containers"]),
                timestamp(r["created_at"]),
                scheduled or "-",
            ]
        )
    return fit_table(APP_COLUMNS, cells, width=width, command="warmboot app list")


@apps.command("stop")
def app_stop(name: str = typer.Argument(..., help="The app's name (or id).")) -> None:
    """Stop an app: its containers shut down (running @exit hooks) and its functions stop taking calls.

    Example:

        warmboot app stop hello
    """
    stopped = client.request("app_stop", app=name)
    console.print(f"Stopped app [bold]{stopped}[/bold]")


containers = typer.Typer(help="Containers the server is running.", no_args_is_help=True)


@containers.command("list")
def container_list() -> None:
    """List running containers: app, function, host PID (or, in a cluster, agent), inputs running, calls served.

    Example:

        warmboot container list
    """
    console.print(render_containers(client.request("container_list"), width=console.width))


def render_containers(rows: list[dict], *, width: int) -> Table:
    """The table of `warmboot container list` for the server's ``container_list`` reply, fitted to ``width``."""
    clustered = any(r.get("agent") for r in rows)
    # The function's label ("app.f") names its app already: the app column is the first to go.
    columns = [
        Col("container"), Col("app", 2), Col("function"), Col("agent", 3) if clustered else Col("pid", 6),
        Col("busy", 4), Col("calls", 5), Col("started", 7, wrap=True),
    ]  # fmt: skip
    cells = []
    for r in rows:
        function = escape(r["function"])  # a parameter set's values are the user's text, not markup
        where = escape(r["agent"] or "") if clustered else str(r["pid"])
        cells.append(
            [r["id"], r["app"], function, where, str(r.get("busy", 0)), str(r["calls"]), timestamp(r["started_at"])]
        )
    return fit_table(columns, cells, width=width, command="warmboot container list")


agents = typer.Typer(help="The machines of a cluster (agents) and their state.", no_args_is_help=True)


@agents.command("list")
def agent_list() -> None:
    """List the agents that registered with this control plane: address, snapshot class, resources, state.

    An agent silent for WARMBOOT_AGENT_LOST_S (5 s) is shown lost; its calls were retried elsewhere.

    Example:

        warmboot agent list
    """
    console.print(render_agents(client.request("agent_list"), width=console.width))


#: `warmboot agent list`: the agent and its state always; its resources, class, URL and last heartbeat as the
#: width allows.
AGENT_COLUMNS = [
    Col("agent"), Col("state"), Col("url", 6), Col("class", 5), Col("CPU", 3), Col("memory", 3), Col("GPUs", 4),
    Col("containers", 2), Col("last seen", 7, wrap=True),
]  # fmt: skip


def render_agents(rows: list[dict], *, width: int) -> Table:
    """The table of `warmboot agent list` for the server's ``agent_list`` reply, fitted to ``width`` columns."""
    cells = []
    for r in rows:
        cells.append([
            escape(r["name"]), r["state"], escape(r["url"]), r["fingerprint"][:24], f"{r['cpus']:g}",
            f"{r['memory_mb'] // 1024} GiB", str(len(r["gpus"])), str(r["containers"]), timestamp(r["last_seen"]),
        ])  # fmt: skip
    return fit_table(AGENT_COLUMNS, cells, width=width, command="warmboot agent list")


@agents.command("drain")
def agent_drain(
    name: str = typer.Argument(..., help="The agent's name (as `warmboot agent list` shows it)."),
    undo: bool = typer.Option(False, "--undo", help="Let the agent take new containers again."),
) -> None:
    """Place no new container on an agent (before maintenance); the containers it runs keep serving.

    Examples:

        warmboot agent drain node-3

        warmboot agent drain node-3 --undo
    """
    client.request("agent_drain", name=name, undo=undo)
    console.print(f"Agent [bold]{escape(name)}[/bold] {'takes new containers again' if undo else 'is draining'}")


def logs(
    app: str = typer.Argument(..., help="The app's name (or id)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines as they come."),
) -> None:
    """Print an app's log: its containers' output and what warmboot did (starts, restores, errors).

    Example:

        warmboot logs hello --follow
    """
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends --follow
        for event in client.stream("logs", app=app, follow=follow):
            if "line" in event:
                console.print(printable(event["line"]), highlight=False, markup=False, soft_wrap=True)


# ----- secrets ---------------------------------------------------------------------------------------

secrets = typer.Typer(help="Named secrets: environment variables for containers.", no_args_is_help=True)


@secrets.command("create")
def secret_create(
    name: str = typer.Argument(..., help="The secret's name."),
    pairs: list[str] = typer.Argument(..., help="KEY=VALUE pairs."),
) -> None:
    """Create (or replace) a named secret; use it with `Secret.from_name(NAME)`.

    Example:

        warmboot secret create openai OPENAI_API_KEY=sk-...
    """
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="PAIRS")
        values[key] = value
    client.request("secret_create", name=name, values=values)
    console.print(f"Created secret [bold]{name}[/bold] with keys {', '.join(sorted(values))}")


@secrets.command("list")
def secret_list() -> None:
    """List named secrets (their keys, never their values).

    Example:

        warmboot secret list
    """
    console.print(render_secrets(client.request("secret_list"), width=console.width))


SECRET_COLUMNS = [Col("name"), Col("keys", 2, wrap=True), Col("updated", 3, wrap=True)]


def render_secrets(rows: list[dict], *, width: int) -> Table:
    """The table of `warmboot secret list` for the server's ``secret_list`` reply, fitted to ``width`` columns."""
    cells = [[r["name"], ", ".join(r["keys"]), timestamp(r["updated_at"])] for r in rows]
    return fit_table(SECRET_COLUMNS, cells, width=width, command="warmboot secret list")


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent to reap it has stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


# ----- the server ------------------------------------------------------------------------------------

server = typer.Typer(help="The local server (started in the background on first use).", no_args_is_help=True)


@server.command("start")
def server_start(
    background: bool = typer.Option(False, "--background", "-b", help="Start it in the background and return."),
) -> None:
    """Run the local server in the foreground (Ctrl-C stops it), or in the background with --background.

    Example:

        warmboot server start --background
    """
    if background:
        client.ensure_server()
        console.print(f"Server running (socket {config.server_socket()})")
        return
    from warmboot.server.daemon import run_forever

    run_forever()


@server.command("status")
def server_status() -> None:
    """Say whether the server runs, its PID and what it holds.

    Example:

        warmboot server status
    """
    try:
        info = client.request_existing("ping")
    except (FileNotFoundError, ConnectionRefusedError):
        console.print("Server not running")
        raise typer.Exit(3) from None
    console.print(
        f"Server running: pid {info['pid']}, version {info['version']}, home {info['home']}, "
        f"{info['apps']} app(s), up since {timestamp(info['started_at'])}"
    )
    if info["code"] != runtime_lib.code_digest():
        console.print(
            "[yellow]The server runs older warmboot code than is installed now:[/yellow] restart it "
            "(`warmboot server stop`; the next command starts it again)"
        )


@server.command("stop")
def server_stop() -> None:
    """Stop the server: every container shuts down. Deployed apps stay deployed for the next start.

    Example:

        warmboot server stop
    """
    try:
        pid = client.request_existing("ping")["pid"]
        with contextlib.suppress(errors.ServerError):  # it may exit before replying
            client.request_existing("server_stop")
    except (FileNotFoundError, ConnectionRefusedError):
        console.print("Server not running")
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not _alive(pid):
            console.print("Server stopped")
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    console.print("Server did not stop within 60 s; killed it")


# ----- volumes ---------------------------------------------------------------------------------------

volumes = typer.Typer(help="Volumes: named directories that persist across containers.", no_args_is_help=True)


@volumes.command("put")
def volume_put(
    name: str = typer.Argument(..., help="The volume's name (created if missing)."),
    local_path: str = typer.Argument(..., help="A local file or directory to copy in."),
    remote_path: str = typer.Argument("/", help="Where it goes, relative to the volume's root."),
) -> None:
    """Copy a local file or directory into a volume (creating the volume if needed).

    Example:

        warmboot volume put models ./all-MiniLM-L6-v2 /all-MiniLM-L6-v2
    """
    import shutil
    from pathlib import Path

    from warmboot.sdk.volume import Volume

    Volume.from_name(name)
    src = Path(local_path)
    if not src.exists():
        raise WarmbootError(f"no such file or directory: {local_path}")
    root = config.volume_dir(name)
    dest = (root / remote_path.lstrip("/")).resolve()
    if not dest.is_relative_to(root.resolve()):
        raise WarmbootError(f"{remote_path} leaves the volume")
    if src.is_dir():
        shutil.copytree(src, dest if remote_path not in ("", "/") else root / src.name, dirs_exist_ok=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest if not dest.is_dir() else dest / src.name)
    console.print(f"Copied {local_path} into volume [bold]{name}[/bold] at {remote_path}")
