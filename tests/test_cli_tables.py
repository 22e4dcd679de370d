"""The CLI's tables at 80 columns (names in full, the less useful columns left out, with a footnote) and wide
(every column, in order). Fast: made-up rows rendered by the commands' render functions; no server."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from platform_helpers import SNAPSHOT_LIST_COLUMNS
from rich.console import Console
from rich.table import Table

from warmboot.cli import doctor, manage, snapshots, web
from warmboot.cli.tables import Col, fit_table

NAME = "acc-snapshot-service-with-a-very-long-name"  # 42 characters
NOW = time.time()
NOTE = "criu dump failed: [Errno 28] no space left on device"


def render(table: Table, width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    return console.export_text()


def header(text: str) -> list[str]:
    """The table's column headers (a header wrapped over lines joined again)."""
    lines = [line.split("┃")[1:-1] for line in text.splitlines() if line.startswith("┃")]
    return [" ".join(part.strip() for part in parts if part.strip()) for parts in zip(*lines, strict=True)]


def footnote(text: str) -> str:
    """The text under the table's bottom border, on one line."""
    lines = text.splitlines()
    bottom = max(i for i, line in enumerate(lines) if line.startswith("└"))
    return " ".join(line.strip() for line in lines[bottom + 1 :])


@dataclass
class Case:
    """One CLI table: how to render it, the columns it must keep, the cells it must show whole."""

    command: str
    render: Callable[..., Table]
    rows: list[dict[str, Any]]
    columns: list[str]  # every column, in order, as a wide terminal shows them
    essential: list[str]  # the columns kept at 80
    whole: list[str]  # cells shown unbroken, on one line, at 80
    left_out: list[str]  # columns left out at 80 with these rows


SNAPSHOT_ROWS = [
    {
        "app_name": NAME, "tag": "embed", "key": "3f2a9c1e5b7d0a11ffee", "state": "ready", "size_bytes": 123e6,
        "created_at": NOW, "create_seconds": 1.5, "restores": 12, "restore_p50_ms": 120.0, "restore_p95_ms": 250.0,
        "cold_p50_ms": 900.0, "reason": None, "boots_cold": False, "retry_at": None,
    },
    {
        "app_name": "hello", "tag": "square", "key": "aa2a9c1e5b7d0a11ffee", "state": "failed", "size_bytes": 0,
        "created_at": NOW, "create_seconds": 0, "restores": 0, "reason": NOTE, "boots_cold": True,
        "retry_at": NOW + 600,
    },
]  # fmt: skip
APP_ROWS = [
    {
        "name": NAME, "app_id": "ap-0123456789ab", "state": "deployed", "version": 3, "functions": ["embed", "square"],
        "containers": 2, "created_at": NOW,
        "schedules": [{"function": "embed", "next_tick": NOW + 60, "schedule": "every 1d"}],
    },
    {
        "name": "hello", "app_id": "ap-ba9876543210", "state": "ephemeral", "version": 1, "functions": ["f"],
        "containers": 0, "created_at": NOW,
    },
]  # fmt: skip
CONTAINER_ROWS = [
    {"id": "wc-0123456789ab", "app": NAME, "function": f"{NAME}.embed", "agent": None, "pid": 4242, "busy": 1,
     "calls": 10, "started_at": NOW},
]  # fmt: skip
CLUSTER_CONTAINER_ROWS = [{**CONTAINER_ROWS[0], "agent": "node-with-a-long-name-3"}]
AGENT_ROWS = [
    {"name": "node-with-a-long-name-3", "state": "alive", "url": "http://10.0.0.3:8701",
     "fingerprint": "x86_64-6.8-criu4.1-abcdefabcdef", "cpus": 16, "memory_mb": 65536, "gpus": ["0", "1"],
     "containers": 3, "last_seen": NOW},
]  # fmt: skip
SECRET_ROWS = [{"name": NAME, "keys": ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "OTHER"], "updated_at": NOW}]
ENDPOINT_ROWS = [
    {"url": f"http://127.0.0.1:8700/{NAME}-embed", "app": NAME, "function": "Model", "method": "embed",
     "kind": "fastapi_endpoint", "requires_proxy_auth": True},
]  # fmt: skip
TOKEN_ROWS = [{"token_id": "wk-0123abcd4567ef89", "created_at": NOW}]
DOCTOR_ROWS = [
    doctor.CheckResult("transparent hugepages", False, False, "madvise: restores fault memory in 4 KB pages "
                       "(measured here: an Embedder restore took 272 ms)",
                       "optional, host-wide: echo always > /sys/kernel/mm/transparent_hugepage/enabled"),
    doctor.CheckResult("criu binary", True, True, "/opt/warmboot/criu/bin/criu (version 4.1.1)"),
]  # fmt: skip

CASES = [
    Case("snapshot list", snapshots.render_snapshots, SNAPSHOT_ROWS, SNAPSHOT_LIST_COLUMNS,
         ["function", "key", "state"], [f"{NAME}.embed", "3f2a9c1e5b7d", "hello.square"],
         ["created", "made in", "restore p50/p95", "cold p50", "note"]),
    Case("app list", manage.render_apps, APP_ROWS,
         ["name", "app id", "state", "version", "functions", "containers", "created", "next scheduled run"],
         ["name", "state", "functions"], [NAME, "deployed", "ephemeral"], ["app id", "created", "next scheduled run"]),
    Case("container list", manage.render_containers, CONTAINER_ROWS,
         ["container", "app", "function", "pid", "busy", "calls", "started"],
         ["container", "function", "busy"], ["wc-0123456789ab", f"{NAME}.embed"], ["app", "pid", "started"]),
    Case("container list", manage.render_containers, CLUSTER_CONTAINER_ROWS,
         ["container", "app", "function", "agent", "busy", "calls", "started"],
         ["container", "function", "busy"], ["wc-0123456789ab", f"{NAME}.embed"], ["app", "agent", "started"]),
    Case("agent list", manage.render_agents, AGENT_ROWS,
         ["agent", "state", "url", "class", "CPU", "memory", "GPUs", "containers", "last seen"],
         ["agent", "state", "containers", "CPU", "memory"], ["node-with-a-long-name-3"], ["url", "last seen"]),
    Case("secret list", manage.render_secrets, SECRET_ROWS, ["name", "keys", "updated"],
         ["name", "keys", "updated"], [NAME, "ANTHROPIC_API_KEY,"], []),
    Case("endpoint list", web.render_endpoints, ENDPOINT_ROWS, ["url", "app", "function", "kind", "auth"],
         ["url"], [f"http://127.0.0.1:8700/{NAME}-embed"], ["app", "kind"]),
    Case("token list", web.render_tokens, TOKEN_ROWS, ["token id", "created"], ["token id", "created"],
         ["wk-0123abcd4567ef89"], []),
    Case("doctor", doctor.doctor_table, DOCTOR_ROWS, ["Check", "Status", "Detail", "Fix"],
         ["Check", "Status", "Detail", "Fix"], ["transparent hugepages", "WARN"], []),
]  # fmt: skip
IDS = [f"{c.command}{' (cluster)' if c.rows is CLUSTER_CONTAINER_ROWS else ''}" for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_at_80_columns_names_are_whole_and_less_useful_columns_left_out(case: Case) -> None:
    text = render(case.render(case.rows, width=80), 80)
    assert all(len(line) <= 80 for line in text.splitlines()), text
    assert "…" not in text, f"a cell was cut short:\n{text}"
    shown = header(text)
    for column in case.essential:
        assert column in shown, f"{column!r} missing at 80 columns:\n{text}"
    for cell in case.whole:
        assert any(f" {cell} " in line for line in text.splitlines()), f"{cell!r} not whole on one line:\n{text}"
    for column in case.left_out:
        assert column not in shown, f"{column!r} should have been left out at 80 columns:\n{text}"
    assert shown == [c for c in case.columns if c in shown], f"columns out of order: {shown}"
    missing = [c for c in case.columns if c not in shown]
    if missing:
        note = footnote(text)
        assert note.startswith("Not shown at this width (80 columns): " + ", ".join(missing) + "."), note
        assert "COLUMNS=" in note and f"warmboot {case.command}" in note, note
    else:
        assert "Not shown" not in text


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_wide_terminal_shows_every_column_in_order(case: Case) -> None:
    text = render(case.render(case.rows, width=250), 250)
    assert header(text) == case.columns, text
    assert "Not shown" not in text and "…" not in text
    for cell in case.whole:
        assert any(f" {cell} " in line for line in text.splitlines()), f"{cell!r} not whole on one line:\n{text}"


def test_snapshot_list_at_80_keeps_the_note_when_names_leave_room() -> None:
    """Short names: the note (why a snapshot is not used) comes before counts and timestamps, wrapped, not cut."""
    rows = [{**row, "app_name": "hello"} for row in SNAPSHOT_ROWS]
    text = render(snapshots.render_snapshots(rows, width=80), 80)
    shown = header(text)
    assert shown[:3] == ["function", "key", "state"] and "note" in shown, text
    assert "created" not in shown and "cold p50" not in shown, text
    words = " ".join(line.split("│")[shown.index("note") + 1].strip() for line in text.splitlines() if "│" in line)
    assert NOTE in words, f"the note is not all there:\n{text}"
    assert "…" not in text


def test_the_footnote_width_shows_everything() -> None:
    """The COLUMNS=N the footnote suggests is wide enough for every column."""
    text = render(snapshots.render_snapshots(SNAPSHOT_ROWS, width=80), 80)
    wide = int(footnote(text).split("COLUMNS=")[1].split()[0])
    assert wide > 80
    assert header(render(snapshots.render_snapshots(SNAPSHOT_ROWS, width=wide), wide)) == SNAPSHOT_LIST_COLUMNS
    narrower = render(snapshots.render_snapshots(SNAPSHOT_ROWS, width=wide - 1), wide - 1)
    assert header(narrower) == [c for c in SNAPSHOT_LIST_COLUMNS if c != "created"], narrower  # the least useful


# ----- the helper itself ---------------------------------------------------------------------------------------


def test_columns_are_left_out_by_priority_then_rightmost_first() -> None:
    columns = [Col("name"), Col("aaaa", 3), Col("bbbb", 2), Col("cccc", 3), Col("dddd", 4)]
    rows = [["n" * 20, "a" * 10, "b" * 10, "c" * 10, "d" * 10]]
    # name 20 + 3 + 1 = 24; each other column 13: 76 in all.
    assert header(render(fit_table(columns, rows, width=76, command="x"), 76)) == [
        "name",
        "aaaa",
        "bbbb",
        "cccc",
        "dddd",
    ]
    assert header(render(fit_table(columns, rows, width=75, command="x"), 75)) == ["name", "aaaa", "bbbb", "cccc"]
    assert header(render(fit_table(columns, rows, width=62, command="x"), 62)) == ["name", "aaaa", "bbbb"]
    assert header(render(fit_table(columns, rows, width=49, command="x"), 49)) == ["name", "bbbb"]
    assert header(render(fit_table(columns, rows, width=36, command="x"), 36)) == ["name"]


def test_a_narrow_column_left_out_earlier_comes_back_when_a_wide_one_goes() -> None:
    columns = [Col("name"), Col("n", 3), Col("wide", 2), Col("last")]
    rows = [["n" * 20, "1", "w" * 40, "z"]]
    # All: 24 + 4 + 43 + 7 = 78. At 60 "n" goes first, then "wide"; "n" then fits again, in its place.
    text = render(fit_table(columns, rows, width=60, command="x"), 60)
    assert header(text) == ["name", "n", "last"], text
    assert "Not shown at this width (60 columns): wide." in footnote(text)


def test_wrapping_columns_wrap_before_any_column_is_left_out() -> None:
    columns = [Col("name"), Col("text", 2, wrap=True), Col("n", 3)]
    rows = [["n" * 20, "word " * 20, "1"]]
    text = render(fit_table(columns, rows, width=60, command="x"), 60)
    assert header(text) == ["name", "text", "n"], text
    assert "Not shown" not in text and all(len(line) <= 60 for line in text.splitlines())
    assert sum(line.count("word") for line in text.splitlines()) == 20, text


def test_names_fold_rather_than_being_cut_when_even_they_do_not_fit() -> None:
    columns = [Col("name"), Col("id"), Col("more", 2)]
    rows = [[NAME, "ap-0123456789ab", "x"]]
    text = render(fit_table(columns, rows, width=40, command="x"), 40)
    assert "…" not in text and all(len(line) <= 40 for line in text.splitlines()), text
    body = [line.split("│")[1:-1] for line in text.splitlines() if line.startswith("│")]
    assert "".join(cells[0].strip() for cells in body) == NAME, text
    assert "".join(cells[1].strip() for cells in body) == "ap-0123456789ab", text
    assert header(text) == ["name", "id"]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id=i) for c, i in zip(CASES, IDS, strict=True) if c.rows is not CLUSTER_CONTAINER_ROWS]
)
def test_an_empty_table_wraps_its_headers_rather_than_leave_columns_out(case: Case) -> None:
    text = render(case.render([], width=80), 80)
    # Ten headers cannot all fit in 80 columns, even wrapped between words: the least useful goes.
    expected = [c for c in case.columns if c != "created"] if case.command == "snapshot list" else case.columns
    assert header(text) == expected, text
    assert ("Not shown" in text) == (expected != case.columns), text
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines()), text


def test_rows_must_match_the_columns() -> None:
    with pytest.raises(ValueError):
        fit_table([Col("a"), Col("b")], [["1"]], width=80, command="x")


# ----- the commands print through them, at the console's width ------------------------------------------------


@pytest.mark.parametrize(
    ("module", "command", "method", "rows", "first"),
    [
        (snapshots, snapshots.snapshot_list, "snapshot_list", SNAPSHOT_ROWS, "function"),
        (manage, manage.app_list, "app_list", APP_ROWS, "name"),
        (web, web.endpoint_list, "web_list", ENDPOINT_ROWS, "url"),
    ],
)
def test_commands_fit_the_console(monkeypatch, module, command, method, rows, first) -> None:  # type: ignore[no-untyped-def]
    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    monkeypatch.setattr(module, "console", console)
    monkeypatch.setattr(module.client, "request", lambda name, **_: rows if name == method else pytest.fail(name))
    command()
    text = console.export_text()
    assert header(text)[0] == first and "Not shown at this width (80 columns)" in text, text
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines()), text
