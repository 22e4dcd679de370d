"""The dashboard's pages as HTML. Every value from the server's state goes through :func:`h` (escaped) or
:func:`link` (escaped and URL-quoted): an app named ``<script>`` is shown as that text, never run."""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from warmboot.server.dashboard import charts
from warmboot.server.dashboard.views import FunctionView, median_or_none

PREFIX = "/_dashboard"
KIND_LABELS = {"cold": "cold boot", "restore": "snapshot restore", "warm": "warm container", "none": "no container"}


def h(value: Any) -> str:
    return escape("" if value is None else str(value))


def link(text: Any, *parts: str) -> str:
    href = PREFIX + "/" + "/".join(quote(p, safe="") for p in parts)
    return f'<a href="{escape(href)}">{h(text)}</a>'


def when(ts: float | None) -> str:
    if not ts:
        return ""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def table(
    headers: Sequence[str], rows: Iterable[Sequence[str]], *, ident: str = "", numeric: set[int] = frozenset()
) -> str:
    """A table of already-rendered cells (each cell made with :func:`h`, :func:`link` or a formatter)."""
    head = "".join(f"<th>{h(x)}</th>" for x in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>" for i, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    attr = f' id="{ident}"' if ident else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str, *, script: bool = False) -> str:
    nav = "".join(
        f'<a href="{PREFIX}/{path}">{name}</a>'
        for path, name in (("", "Apps"), ("containers", "Containers"), ("snapshots", "Snapshots"),
                           ("secrets", "Secrets"), ("volumes", "Volumes"))
    )  # fmt: skip
    tail = f'<script src="{PREFIX}/static/tail.js"></script>' if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{h(title)} · warmboot</title>"
        f'<link rel="stylesheet" href="{PREFIX}/static/style.css"></head>'
        f"<body><header>{nav}</header><main><h1>{h(title)}</h1>{body}</main>{tail}</body></html>"
    )


def apps_page(data: dict[str, list[dict[str, Any]]]) -> str:
    running = table(
        ["app", "state", "version", "functions", "containers", "deployed", "logs"],
        (
            [link(a["name"], "apps", a["name"]), h(a["state"]), h(a["version"]),
             ", ".join(link(f, "functions", a["name"], f) for f in a["functions"]), h(a["containers"]),
             h(when(a["created_at"])), link("logs", "logs", a["name"])]
            for a in data["running"]
        ),
        ident="apps",
        numeric={2, 4},
    )  # fmt: skip
    stopped = table(
        ["app", "version", "stopped"],
        ([link(a["name"], "apps", a["name"]), h(a["version"]), h(when(a["stopped_at"]))] for a in data["stopped"]),
        ident="stopped-apps",
    )
    empty = "<p class='muted'>No app is running: <code>warmboot deploy app.py</code> deploys one.</p>"
    return page("Apps", (running if data["running"] else empty) + "<h2>Recently stopped</h2>" + stopped)


def app_page(data: dict[str, Any]) -> str:
    rows = (
        [link(f["tag"], "functions", data["name"], f["tag"]), h(f["kind"]), "yes" if f["snapshot"] else "no",
         h(f["gpu"] or ""), h(f["calls"]), h(when(f["last_call"]))]
        for f in data["functions_detail"]
    )  # fmt: skip
    body = (
        f"<p>{h(data['state'])}, version {h(data['version'])}, from <code>{h(data['app_file'])}</code>, deployed "
        f"{h(when(data['created_at']))}; {h(data['containers'])} container(s) running. "
        f"{link('Logs', 'logs', data['name'])}</p>"
        + table(["function", "kind", "memory snapshot", "gpu", "calls (recent)", "last call"], rows, ident="functions")
    )
    return page(f"App {data['name']}", body)


def function_page(view: FunctionView) -> str:
    options = table(
        ["option", "value"], ([h(k), f"<code>{h(v)}</code>"] for k, v in sorted(view.options.items())), ident="config"
    )
    urls = "".join(
        f'<li><a href="{h(e["url"])}">{h(e["url"])}</a> ({h(e["kind"])})</li>' for e in view.web_urls if e["url"]
    )
    snaps = table(
        ["snapshot", "state", "why", "size", "made", "restores", "restore p50", "restore p95", "cold boot p50"],
        (
            [link(s["key"][:12], "snapshots", s["key"]), h(s["state"]), h(s.get("reason") or ""),
             h(size(s["size_bytes"])), h(when(s["created_at"])), h(s["restores"]), h(ms(s["restore_p50_ms"])),
             h(ms(s["restore_p95_ms"])), h(ms(s["cold_p50_ms"]))]
            for s in view.snapshots
        ),
        ident="snapshots",
    )  # fmt: skip
    medians = ", ".join(
        f"{KIND_LABELS.get(k, k)} {ms(median_or_none(v))} (n={len(v)})" for k, v in sorted(view.durations.items())
    )
    calls = table(
        ["call", "status", "start", "time to result", "container", "finished"],
        (
            [h(c.call_id), f'<span class="{"ok" if c.status == "ok" else "bad"}">{h(c.status)}</span>',
             h(KIND_LABELS.get(c.start_kind, c.start_kind)), h(ms(c.duration_ms)), h(c.container_id or ""),
             h(when(c.finished_at))]
            for c in view.calls
        ),
        ident="calls",
        numeric={3},
    )  # fmt: skip
    chart = charts.by_kind(view.durations, f"{view.app_name}.{view.tag}: time to result by start kind")
    body = (
        f"<p>{h(view.kind)} in app {link(view.app_name, 'apps', view.app_name)}; image <code>{h(view.image[:19])}"
        f"</code>{'; methods: ' + h(', '.join(view.methods)) if view.methods else ''}. "
        f"{link('Logs', 'logs', view.app_name)}</p>"
        + (f"<h2>Web endpoint</h2><ul id='web-urls'>{urls}</ul>" if urls else "")
        + "<h2>Cold starts</h2>" + chart
        + (f"<p>Median time to result: {h(medians)}</p>" if medians else "")
        + "<h2>Memory snapshot</h2>"
        + (snaps if view.snapshots else "<p class='muted'>No snapshot (enable_memory_snapshot=True makes one at the "
           "first cold boot of a deployed app).</p>")
        + "<h2>Configuration</h2>" + options
        + f"<h2>Recent calls ({len(view.calls)})</h2>" + calls
    )  # fmt: skip
    return page(f"{view.app_name}.{view.tag}", body)


def containers_page(rows: list[dict[str, Any]]) -> str:
    clustered = any(r.get("agent") for r in rows)
    body = table(
        ["container", "app", "function", "agent" if clustered else "pid", "busy", "calls", "started"],
        (
            [h(r["id"]), link(r["app"], "apps", r["app"]), h(r["function"]),
             h(r.get("agent") if clustered else r["pid"]), h(r.get("busy", 0)), h(r["calls"]), h(when(r["started_at"]))]
            for r in rows
        ),
        ident="containers",
        numeric={4, 5},
    )  # fmt: skip
    return page("Containers running now", body if rows else "<p class='muted'>No container is running.</p>")


def snapshots_page(rows: list[dict[str, Any]]) -> str:
    body = table(
        ["function", "key", "state", "why", "size", "made", "made in", "restores", "restore p50", "restore p95",
         "cold boot p50"],
        (
            [h(f"{r['app_name']}.{r['tag']}" + (f" @{r['agent']}" if r.get("agent") else "")),
             link(r["key"][:12], "snapshots", r["key"]), h(r["state"]),
             h(r.get("reason") or ""), h(size(r["size_bytes"])), h(when(r["created_at"])),
             h(f"{r['create_seconds']:.2f} s" if r["create_seconds"] else ""), h(r["restores"]),
             h(ms(r["restore_p50_ms"])), h(ms(r["restore_p95_ms"])), h(ms(r["cold_p50_ms"]))]
            for r in rows
        ),
        ident="snapshots",
        numeric={7},
    )  # fmt: skip
    return page("Memory snapshots", body if rows else "<p class='muted'>No snapshot yet.</p>")


def snapshot_page(row: dict[str, Any], restores: list[tuple[float, float]]) -> str:
    chart = charts.over_time(restores, f"{row['app_name']}.{row['tag']}: restore times")
    facts = table(
        ["", ""],
        [[h("key"), f"<code>{h(row['key'])}</code>"], [h("state"), h(row["state"])],
         [h("why"), h(row.get("reason") or "")], [h("size"), h(size(row["size_bytes"]))],
         [h("made"), h(when(row["created_at"]))], [h("restores"), h(row["restores"])],
         [h("restore p50 / p95"), h(f"{ms(row['restore_p50_ms'])} / {ms(row['restore_p95_ms'])}")]],
        ident="snapshot",
    )  # fmt: skip
    return page(f"Snapshot of {row['app_name']}.{row['tag']}", chart + facts)


def logs_page(app_name: str, lines: list[str], offset: int) -> str:
    api = f"{PREFIX}/api/logs/{quote(app_name, safe='')}"
    body = (
        f"<p>The app's containers and what warmboot did; new lines appear as they are written "
        f"(<span id='tail-state'>connecting</span>).</p>"
        f'<pre id="log" data-api="{h(api)}" data-offset="{offset}">'
        + "".join(h(line) + "\n" for line in lines)
        + "</pre>"
    )
    return page(f"Logs of {app_name}", body, script=True)


def secrets_page(rows: list[dict[str, Any]]) -> str:
    body = table(
        ["secret", "keys", "updated"],
        ([h(r["name"]), h(", ".join(r["keys"])), h(when(r["updated_at"]))] for r in rows),
        ident="secrets",
    )
    note = "<p class='muted'>Names and keys only: values never leave the server.</p>"
    return page("Secrets", note + (body if rows else "<p class='muted'>No secret.</p>"))


def volumes_page(rows: list[dict[str, Any]]) -> str:
    body = table(
        ["volume", "files", "size"],
        ([link(r["name"], "volumes", r["name"]), h(r["files"]), h(size(r["bytes"]))] for r in rows),
        ident="volumes",
        numeric={1},
    )
    return page("Volumes", body if rows else "<p class='muted'>No volume.</p>")


def volume_page(name: str, files: list[tuple[str, int]]) -> str:
    body = table(["file", "size"], ([h(path), h(size(n))] for path, n in files), ident="files", numeric={1})
    return page(f"Volume {name}", body if files else "<p class='muted'>Empty.</p>")


def message_page(title: str, message: str) -> str:
    return page(title, f"<p>{h(message)}</p>")
