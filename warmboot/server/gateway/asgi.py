"""The gateway's ASGI app: find the endpoint, check its token, and hand the request to its container."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from warmboot.errors import NotFoundError, WarmbootError
from warmboot.protocol import Outcome
from warmboot.server.calls import Call
from warmboot.server.dashboard.app import Dashboard
from warmboot.server.gateway import exchange, proxy
from warmboot.server.gateway.routes import Endpoint, RouteTable
from warmboot.server.gateway.tokens import KEY_HEADER, SECRET_HEADER, ProxyTokens
from warmboot.server.pool import FunctionPool, Lease

if TYPE_CHECKING:
    from collections.abc import Callable

    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.gateway")


async def error_page(send: exchange.Send, status: int, message: str) -> None:
    """A JSON error response that says what went wrong and what to do.

    A container's start failure carries its traceback: the page shows its first line (what failed) and its last
    (why); the whole traceback is in the app's log (`warmboot logs APP`).
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) > 1:
        message = f"{lines[0]} {lines[-1]} (the app's log has the traceback: `warmboot logs APP`)"
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Gateway:
    """The ASGI app uvicorn serves: one per server."""

    def __init__(self, plane: ControlPlane, tokens: ProxyTokens, *, domain: str = "localhost", require_all: bool):
        self.plane = plane
        self.tokens = tokens
        self.routes = RouteTable()
        self.domain = domain  #: host names ``<label>.<domain>`` name an endpoint
        self.require_all = require_all  #: bound beyond loopback without WARMBOOT_GATEWAY_ALLOW_PUBLIC: every endpoint
        self._dashboard: Dashboard | None = None

    @property
    def dashboard(self) -> Dashboard:
        """The web dashboard, under /_dashboard with its own login token (made on first use)."""
        if self._dashboard is None:
            self._dashboard = Dashboard(self.plane)
        return self._dashboard

    async def __call__(self, scope: dict[str, Any], receive: exchange.Receive, send: exchange.Send) -> None:
        if scope["type"] == "lifespan":
            return
        if Dashboard.handles(scope.get("path", "")):  # no endpoint label starts with "_"
            await self.dashboard(scope, receive, send)
            return
        label, path, root_path = self._route(scope)
        endpoint = self.routes.lookup(label, self.plane.apps) if label else None
        if endpoint is None:
            if scope["type"] == "http":
                what = f"no web endpoint is labelled {label!r}" if label else "no web endpoint here"
                await error_page(
                    send,
                    404,
                    f"{what}: endpoint URLs look like http://HOST:PORT/LABEL/ (`warmboot deploy` prints them, "
                    "and `warmboot app list` shows the running apps)",
                )
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": "no such endpoint"})
            return
        if (endpoint.requires_proxy_auth or self.require_all) and not self._authorised(scope):
            if scope["type"] == "http":
                await error_page(
                    send,
                    401,
                    f"{endpoint.label} requires a proxy auth token: create one with `warmboot token create` and "
                    "send it in the Modal-Key and Modal-Secret headers",
                )
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": "proxy auth token required"})
            return
        if getattr(self.plane, "cluster", None) is not None:
            # The gateway speaks to a container's pipes on this machine; a cluster's containers are on agents.
            if scope["type"] == "http":
                await error_page(
                    send, 501, f"{endpoint.label}: web endpoints do not run on a cluster yet (its containers run on "
                    "agents); serve it from a single-machine warmboot server (no WARMBOOT_CLUSTER_LISTEN)",
                )  # fmt: skip
            else:
                await send({"type": "websocket.close", "code": 1011, "reason": "web endpoints do not run on a cluster"})
            return
        # The token is for the gateway: it never reaches the app.
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k not in (KEY_HEADER, SECRET_HEADER)]}
        submit = self._submitter(endpoint)
        try:
            if endpoint.kind == "web_server":
                assert endpoint.port is not None
                await proxy.serve(submit, scope, receive, send, port=endpoint.port, path=path, error_page=error_page)
            else:
                await exchange.serve(
                    submit, scope, receive, send, path=path, root_path=root_path, method=endpoint.method,
                    error_page=error_page, lease=self._leaser(endpoint),
                )  # fmt: skip
        except WarmbootError as exc:  # the app stopped, or its pool refused the request
            if scope["type"] == "http":
                status = 404 if isinstance(exc, NotFoundError) else 503
                await error_page(send, status, str(exc).splitlines()[0])

    def _route(self, scope: dict[str, Any]) -> tuple[str | None, str, str]:
        """The endpoint's label, the path the app sees, and its root path."""
        path: str = scope.get("path", "/")
        for name, value in scope.get("headers", []):
            if name == b"host":
                host = value.decode("latin-1").rsplit(":", 1)[0].lower()
                suffix = "." + self.domain
                if host.endswith(suffix) and host != suffix[1:]:
                    return host[: -len(suffix)], path, ""
                break
        segment, _, rest = path.lstrip("/").partition("/")
        if not segment:
            return None, path, ""
        return segment, "/" + rest, "/" + segment

    def _authorised(self, scope: dict[str, Any]) -> bool:
        headers = dict(scope.get("headers", []))
        key, secret = headers.get(KEY_HEADER), headers.get(SECRET_HEADER)
        return self.tokens.verify(key.decode("latin-1") if key else None, secret.decode("latin-1") if secret else None)

    def _leaser(self, endpoint: Endpoint) -> Callable[[], tuple[FunctionPool, Lease] | None]:
        """The fast path's first step: an idle slot of a running container of the endpoint's pool, if any."""

        def lease() -> tuple[FunctionPool, Lease] | None:
            app = self.plane.running_app(app_id=endpoint.app_id)
            pool = app.pools.get(endpoint.tag)  # the default variant's pool (a parametrized one's key differs)
            if pool is None:
                return None
            slot = pool.try_lease()
            return (pool, slot) if slot is not None else None

        return lease

    def _submitter(self, endpoint: Endpoint) -> Callable[[Callable[[Any, float], Outcome], str], Call]:
        def submit(run: Callable[[Any, float], Outcome], call_id: str) -> Call:
            app = self.plane.running_app(app_id=endpoint.app_id)
            call = Call(app_id=endpoint.app_id, tag=endpoint.tag, method=endpoint.method, args=b"", call_id=call_id)
            call.run = run
            app.submit(app.variant(endpoint.tag), call)
            return call

        return submit
