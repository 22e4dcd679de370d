"""``warmboot snapshot list|rm``: the memory snapshots the server holds."""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from warmboot.cli.manage import console, timestamp
from warmboot.cli.tables import Col, fit_table
from warmboot.errors import InvalidOptionError
from warmboot.sdk import client

snapshots = typer.Typer(help="Memory snapshots of deployed functions.", no_args_is_help=True)


@snapshots.command("list")
def snapshot_list() -> None:
    """List memory snapshots: function, key, state, size, when made, restores, the restore time (p50/p95) and
    the cold boot time (p50) measured for the function, and why a snapshot is not in use (its state's reason,
    when it is tried again after a back-off, or that the function boots cold because that is faster).

    Example:

        warmboot snapshot list
    """
    console.print(render_snapshots(client.request("snapshot_list"), width=console.width))


#: `warmboot snapshot list`: the function, key (for `snapshot rm`) and state always, then why it is not in use;
#: the counts, times and timestamps as the width allows. Tests read this table with all its columns, in this order.
SNAPSHOT_COLUMNS = [
    Col("function"), Col("key"), Col("state"), Col("size", 4), Col("created", 8, wrap=True), Col("made in", 7),
    Col("restores", 3), Col("restore p50/p95", 5, wrap=True), Col("cold p50", 6),
    Col("note", 2, wrap=True, min_width=16),
]  # fmt: skip


def render_snapshots(rows: list[dict], *, width: int) -> Table:
    """The table of `warmboot snapshot list` for the server's ``snapshot_list`` reply, fitted to ``width``."""
    cells = [
        [
            # A parameter set's values are the user's text; on a cluster, each agent's snapshot names the agent.
            escape(f"{r['app_name']}.{r['tag']}" + (f" @{r['agent']}" if r.get("agent") else "")),
            r["key"][:12],
            r["state"],
            f"{r['size_bytes'] / 1e6:.0f} MB" if r["size_bytes"] else "-",
            timestamp(r["created_at"]),
            f"{r['create_seconds']:.2f} s" if r["create_seconds"] else "-",
            str(r["restores"]),
            f"{r['restore_p50_ms']:.0f}/{r['restore_p95_ms']:.0f} ms" if r.get("restore_p50_ms") else "-",
            f"{r['cold_p50_ms']:.0f} ms" if r.get("cold_p50_ms") else "-",
            escape(_note(r)),
        ]
        for r in rows
    ]
    return fit_table(SNAPSHOT_COLUMNS, cells, width=width, command="warmboot snapshot list")


def _note(row: dict) -> str:
    note = (row["reason"] or "")[:100]
    if row.get("boots_cold"):
        note = (note + "; " if note else "") + "boots cold: faster than a restore here (rechecked now and then)"
    retry_at = row.get("retry_at")
    if retry_at and retry_at > time.time():
        note += f" (tried again after {timestamp(retry_at)})"
    return note


@snapshots.command("rm")
def snapshot_rm(key: str = typer.Argument(..., help="The snapshot's key (or a unique prefix of it).")) -> None:
    """Delete a memory snapshot; the function's next cold start boots and makes a fresh one.

    Example:

        warmboot snapshot rm 3f2a9c1e
    """
    if not key.strip():
        # A prefix of every key: the server would take it for whichever snapshot happens to be the only one.
        raise InvalidOptionError(
            "snapshot rm: give a snapshot key or a unique prefix of it, not an empty key; "
            "`warmboot snapshot list` shows them"
        )
    record = client.request("snapshot_rm", key=key)
    console.print(f"Deleted snapshot {record['key'][:12]} of {record['app_name']}.{record['tag']}")
