"""Endpoint labels and URLs: which function a request is for.

A request names its endpoint by the first path segment (``http://127.0.0.1:8700/<label>/...``; the app sees the
rest of the path, with ``root_path`` set to ``/<label>``) or by its host name (``http://<label>.localhost:8700/...``,
the whole path), as Modal's URLs do. Labels come from the decorators (``label=``) or default to
``<app>-<function>[-<method>]``; an ephemeral app's (``warmboot run``/``serve``) end in ``-dev``, as on Modal.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from warmboot.errors import InvalidOptionError
from warmboot.sdk.web import default_label

if TYPE_CHECKING:
    from warmboot.server.apps import RunningApp


@dataclass(frozen=True)
class Endpoint:
    """One web endpoint of a running app."""

    label: str
    app_id: str
    app_name: str
    tag: str
    method: str | None  #: a class's web method
    kind: str  #: fastapi_endpoint | asgi_app | wsgi_app | web_server
    requires_proxy_auth: bool
    port: int | None = None  #: web_server
    startup_timeout: float | None = None

    @property
    def where(self) -> str:
        return f"{self.app_name}.{self.tag}" + (f".{self.method}" if self.method else "")


def endpoints_of(app_name: str, app_id: str, spec: dict[str, Any], *, ephemeral: bool) -> list[Endpoint]:
    """The endpoints an app spec declares, with their final labels."""
    found = []
    for tag, fspec in spec["functions"].items():
        for web in fspec.get("web") or []:
            label = web.get("label") or default_label(app_name, tag, web.get("method"))
            if ephemeral:
                label = label[:59].rstrip("-") + "-dev"
            found.append(
                Endpoint(
                    label=label,
                    app_id=app_id,
                    app_name=app_name,
                    tag=tag,
                    method=web.get("method"),
                    kind=web["kind"],
                    requires_proxy_auth=bool(web.get("requires_proxy_auth")),
                    port=web.get("port"),
                    startup_timeout=web.get("startup_timeout"),
                )
            )
    return found


class RouteTable:
    """The endpoints of the running apps by label, rebuilt when the set of running apps changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._apps_seen: frozenset[str] = frozenset()
        self._by_label: dict[str, Endpoint] = {}

    def lookup(self, label: str, apps: dict[str, RunningApp]) -> Endpoint | None:
        ids = frozenset(apps)
        if ids != self._apps_seen:
            with self._lock:
                self._by_label = self._build(list(apps.values()))
                self._apps_seen = ids
        return self._by_label.get(label)

    def all(self, apps: dict[str, RunningApp]) -> list[Endpoint]:
        return list(self._build(list(apps.values())).values())

    @staticmethod
    def _build(apps: Iterable[RunningApp]) -> dict[str, Endpoint]:
        by_label: dict[str, Endpoint] = {}
        # Oldest first: while `warmboot serve` swaps versions, the newest of an app takes the label.
        for app in sorted(apps, key=lambda a: (a.record.created_at, a.record.version)):
            record = app.record
            for endpoint in endpoints_of(record.name, record.app_id, record.spec, ephemeral=record.state != "deployed"):
                by_label[endpoint.label] = endpoint
        return by_label


def check_conflicts(app_name: str, spec: dict[str, Any], ephemeral: bool, apps: Iterable[RunningApp]) -> None:
    """Refuse a deploy whose endpoint labels another running app already serves (a label is a URL)."""
    taken = {}
    for app in apps:
        if app.record.name == app_name:
            continue  # its own earlier version: replaced
        for endpoint in endpoints_of(
            app.record.name, app.record.app_id, app.record.spec, ephemeral=app.record.state != "deployed"
        ):
            taken[endpoint.label] = endpoint
    for endpoint in endpoints_of(app_name, "", spec, ephemeral=ephemeral):
        other = taken.get(endpoint.label)
        if other is not None:
            raise InvalidOptionError(
                f"web endpoint {endpoint.where} has the label {endpoint.label!r}, which app {other.app_name!r} "
                f"already serves ({other.where}); give it another label= or stop that app"
            )
