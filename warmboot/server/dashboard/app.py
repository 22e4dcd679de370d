"""The dashboard's ASGI app, mounted by the gateway under ``/_dashboard``.

Every request needs the login token: ``?token=`` (exchanged at once for an HttpOnly, SameSite=Strict cookie and
a redirect that drops it from the address bar), or that cookie, or ``Authorization: Bearer``. Pages are built on
a worker thread (they read the database) and sent with a Content-Security-Policy that allows only the
dashboard's own script and stylesheet: even a value that escaped escaping could not run.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from warmboot import validation
from warmboot.errors import InvalidOptionError, NotFoundError, WarmbootError
from warmboot.server.dashboard import pages, static, views
from warmboot.server.dashboard.auth import COOKIE, DashboardAuth

if TYPE_CHECKING:
    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.dashboard")

PREFIX = pages.PREFIX
Send = Callable[[dict[str, Any]], Awaitable[None]]
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                 b"connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),  # the token may be in the address: never sent on to another site
    (b"cache-control", b"no-store"),
]  # fmt: skip


class Dashboard:
    def __init__(self, plane: ControlPlane):
        self.plane = plane
        self.auth = DashboardAuth(plane.home)

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008, "reason": "the dashboard speaks HTTP"})
            return
        path = scope["path"][len(PREFIX) :] or "/"
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = query.get("token", [None])[0]
        if given is not None:
            if not self.auth.valid(given):
                why = "That token is not valid (it may have been renewed): `warmboot dashboard` prints the URL."
                await self._respond(send, 401, pages.message_page("Not signed in", why))
                return
            cookie = f"{COOKIE}={self.auth.token}; Path={PREFIX}; HttpOnly; SameSite=Strict"
            await self._respond(send, 303, b"", headers=[(b"location", (PREFIX + path).encode()),
                                                          (b"set-cookie", cookie.encode())])  # fmt: skip
            return
        if not self._signed_in(scope):
            why = "Open the URL that `warmboot dashboard` prints: every page needs its token."
            await self._respond(send, 401, pages.message_page("Not signed in", why))
            return
        if scope["method"] not in ("GET", "HEAD"):
            await self._respond(send, 405, pages.message_page("Read only", "The dashboard only shows."))
            return
        try:
            status, body, content_type = await asyncio.to_thread(self._route, path, query)
        except NotFoundError as exc:
            await self._respond(send, 404, pages.message_page("Not found", str(exc)))
            return
        except WarmbootError as exc:
            await self._respond(send, 400, pages.message_page("Cannot show this", str(exc)))
            return
        except Exception:  # a bug must answer, and the gateway go on serving
            log.exception("dashboard page %s failed", path)
            await self._respond(send, 500, pages.message_page("Error", "This page failed; the server log says why."))
            return
        await self._respond(send, status, body, content_type=content_type)

    def _signed_in(self, scope: dict[str, Any]) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"cookie":
                jar = SimpleCookie()
                jar.load(value.decode("latin-1"))
                if COOKIE in jar and self.auth.valid(jar[COOKIE].value):
                    return True
            elif name == b"authorization":
                text = value.decode("latin-1")
                if text.startswith("Bearer ") and self.auth.valid(text[7:]):
                    return True
        return False

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[int, str | bytes, bytes]:
        # The ASGI path is decoded already: decoding it again would let "%252F" become a "/" inside a name.
        parts = path.strip("/").split("/") if path.strip("/") else []
        html = b"text/html; charset=utf-8"
        p = self.plane
        match parts:
            case []:
                return 200, pages.apps_page(views.apps(p)), html
            case ["apps", name]:
                return 200, pages.app_page(views.app(p, name)), html
            case ["functions", app_name, tag]:
                return 200, pages.function_page(views.function(p, app_name, tag)), html
            case ["containers"]:
                return 200, pages.containers_page(views.containers(p)), html
            case ["snapshots"]:
                return 200, pages.snapshots_page(views.snapshots(p)), html
            case ["snapshots", key]:
                return 200, pages.snapshot_page(*views.snapshot(p, key)), html
            case ["logs", app_name]:
                lines, offset = views.log_tail(p, validation.name("app", app_name), None)
                return 200, pages.logs_page(app_name, lines, offset), html
            case ["api", "logs", app_name]:
                text = query.get("after", ["0"])[0] or "0"
                if not text.isdigit():
                    raise InvalidOptionError(f"after={text!r}: give the byte offset the last answer's 'next' said")
                lines, offset = views.log_tail(p, validation.name("app", app_name), int(text))
                return 200, json.dumps({"lines": lines, "next": offset}), b"application/json"
            case ["secrets"]:
                return 200, pages.secrets_page(views.secrets(p)), html
            case ["volumes"]:
                return 200, pages.volumes_page(views.volumes(p)), html
            case ["volumes", name]:
                return 200, pages.volume_page(name, views.volume(p, validation.name("volume", name))), html
            case ["static", "style.css"]:
                return 200, static.STYLE, b"text/css; charset=utf-8"
            case ["static", "tail.js"]:
                return 200, static.TAIL, b"text/javascript; charset=utf-8"
        raise NotFoundError(f"no dashboard page at {PREFIX}{path}")

    async def _respond(
        self,
        send: Send,
        status: int,
        body: str | bytes,
        *,
        content_type: bytes = b"text/html; charset=utf-8",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(data)).encode()),
                    *SECURITY_HEADERS,
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})
