"""What the dashboard's pages show, read from the server's state (the same sources as the CLI's tables)."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmboot import protocol
from warmboot.errors import NotFoundError
from warmboot.server.call_log import LoggedCall

if TYPE_CHECKING:
    from warmboot.server.daemon import ControlPlane

#: The most files a volume's page lists (a volume of a million files still renders).
MAX_VOLUME_FILES = 500
#: The log lines a log page starts with; the live tail adds the rest.
LOG_LINES = 300


@dataclass
class FunctionView:
    app_name: str
    tag: str
    kind: str  #: function or cls
    options: dict[str, Any]
    image: str
    methods: list[str]
    web_urls: list[dict[str, Any]]
    snapshots: list[dict[str, Any]]
    calls: list[LoggedCall]
    durations: dict[str, list[float]] = field(default_factory=dict)  #: start kind -> time to result (ms)


def apps(plane: ControlPlane) -> dict[str, list[dict[str, Any]]]:
    running = plane.op_app_list(protocol.AppList())
    stopped = plane.state.recent_stopped_apps(20)
    return {"running": sorted(running, key=lambda a: a["name"]), "stopped": stopped}


def app(plane: ControlPlane, name: str) -> dict[str, Any]:
    """A running app, or else the newest stopped one of that name (its calls and snapshots stay worth seeing)."""
    found = next((a for a in plane.op_app_list(protocol.AppList()) if a["name"] == name), None)
    if found is not None:
        record = plane.running_app(app_id=found["app_id"]).record
    else:
        record = plane.state.latest_app(name)
        found = {
            "app_id": record.app_id, "name": record.name, "state": record.state, "version": record.version,
            "created_at": record.created_at, "functions": list(record.spec["functions"]), "containers": 0,
        }  # fmt: skip
    functions = []
    for tag, fspec in record.spec["functions"].items():
        calls = function_calls(plane, name, tag, limit=1000)
        functions.append(
            {
                "tag": tag,
                "kind": fspec["kind"],
                "snapshot": bool(fspec["options"].get("enable_memory_snapshot")),
                "gpu": fspec["options"].get("gpu"),
                "calls": len(calls),
                "last_call": calls[0].finished_at if calls else None,
            }
        )
    return {**found, "functions_detail": functions, "app_file": record.app_file, "record": record}


def function_calls(plane: ControlPlane, app_name: str, tag: str, limit: int = 200) -> list[LoggedCall]:
    return plane.call_log.recent(app_name, tag, limit=limit)


def function(plane: ControlPlane, app_name: str, tag: str) -> FunctionView:
    record = app(plane, app_name)["record"]
    fspec = record.spec["functions"].get(tag)
    if fspec is None:
        raise NotFoundError(f"app {app_name!r} has no function {tag!r}")
    calls = function_calls(plane, app_name, tag)
    durations: dict[str, list[float]] = {}
    for c in calls:
        if c.status == "ok":
            durations.setdefault(c.start_kind, []).append(c.duration_ms)
    snaps = [s for s in snapshots(plane) if s["app_name"] == app_name and s["tag"].split("(")[0].split(".")[0] == tag]
    return FunctionView(
        app_name=app_name,
        tag=tag,
        kind=fspec["kind"],
        options={k: v for k, v in fspec["options"].items() if v not in (None, {}, [], "")},
        image=fspec.get("image_digest", "?"),
        methods=list((fspec.get("lifecycle") or {}).get("methods") or []),
        web_urls=[e for e in plane.web_endpoints() if e["app"] == app_name and e["function"] == tag],
        snapshots=snaps,
        calls=calls,
        durations=durations,
    )


def containers(plane: ControlPlane) -> list[dict[str, Any]]:
    return plane.op_container_list(protocol.ContainerList())


def snapshots(plane: ControlPlane) -> list[dict[str, Any]]:
    return plane.op_snapshot_list(protocol.SnapshotList())


def snapshot(plane: ControlPlane, key: str) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    found = next((s for s in snapshots(plane) if s["key"] == key), None)
    if found is None:
        raise NotFoundError(f"no snapshot with key {key!r}")
    restores = [(r["at"], r["total_ms"]) for r in plane.starts.rows(key) if r["kind"] == "restore"]
    return found, restores


def log_tail(plane: ControlPlane, app_name: str, after: int | None) -> tuple[list[str], int]:
    """The app log's lines after byte ``after`` (None: its last LOG_LINES lines), and the offset to ask from next.

    A log rotated since (smaller than ``after``) is read from its start."""
    path = plane.logs.path(app_name)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return [], 0
    with open(path, "rb") as f:
        if after is None:
            f.seek(max(0, size - 256 * 1024))
            data = f.read()
            lines = data.decode(errors="replace").splitlines()[-LOG_LINES:]
            return lines, size
        if after > size:
            after = 0
        f.seek(after)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
    return complete.decode(errors="replace").splitlines(), after + len(complete)


def secrets(plane: ControlPlane) -> list[dict[str, Any]]:
    return [{"name": s["name"], "keys": s["keys"], "updated_at": s["updated_at"]} for s in plane.state.list_secrets()]


def volumes(plane: ControlPlane) -> list[dict[str, Any]]:
    root = plane.home / "volumes"
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir():
            files = volume_files(entry, limit=MAX_VOLUME_FILES)
            out.append({"name": entry.name, "files": len(files), "bytes": sum(size for _, size in files)})
    return out


def volume_files(path: Path, limit: int = MAX_VOLUME_FILES) -> list[tuple[str, int]]:
    """Files of a volume (relative path, size), at most ``limit``; symbolic links are listed, never followed."""
    found: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            try:
                size = full.lstat().st_size
            except OSError:
                continue
            found.append((str(full.relative_to(path)), size))
            if len(found) >= limit:
                return found
    return found


def volume(plane: ControlPlane, name: str) -> list[tuple[str, int]]:
    path = plane.volume_dir(name)
    if "/" in name or name.startswith(".") or not path.is_dir():
        raise NotFoundError(f"no volume named {name!r}")
    return volume_files(path)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
