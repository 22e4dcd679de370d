"""The gateway's fast layer: routing by path and by host, labels, tokens, and who must show one.

The Gateway ASGI app runs here against a fake control plane (no containers): what is checked is the decision
it takes before a request reaches any pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from warmboot.errors import InvalidOptionError
from warmboot.sdk.web import default_label
from warmboot.server.db import Database
from warmboot.server.gateway import routes
from warmboot.server.gateway.asgi import Gateway
from warmboot.server.gateway.serve import is_loopback
from warmboot.server.gateway.tokens import ProxyTokens


def _spec(**web: Any) -> dict[str, Any]:
    return {"functions": {"f": {"web": [{"kind": "asgi_app", "method": None, "label": None, **web}]}}}


def _app(name: str, spec: dict[str, Any], *, state: str = "deployed", version: int = 1) -> Any:
    record = SimpleNamespace(name=name, app_id=f"ap-{name}-{version}", spec=spec, state=state, version=version,
                             created_at=float(version))  # fmt: skip
    return SimpleNamespace(record=record)


@pytest.fixture
def tokens(open_db: Callable[[], Database]) -> ProxyTokens:
    return ProxyTokens(open_db(), threading.Lock())


def _request(gateway: Gateway, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    scope = {"type": "http", "method": "GET", "path": path, "headers": headers or [], "query_string": b""}
    asyncio.run(gateway(scope, receive, send))
    return sent[0]["status"], b"".join(e.get("body", b"") for e in sent[1:])


def _gateway(apps: dict[str, Any], tokens: ProxyTokens, *, require_all: bool = False) -> tuple[Gateway, list[Any]]:
    submitted: list[Any] = []
    # No pool has a warm container here: the fast path finds no slot to borrow, and requests go to submit().
    plane = SimpleNamespace(apps=apps, running_app=lambda **_: SimpleNamespace(pools={}))
    gateway = Gateway(plane, tokens, require_all=require_all)  # type: ignore[arg-type]

    def submitter(endpoint: Any) -> Any:  # stands in for the pools: records the endpoint, then refuses (503)
        def submit(run: Any, call_id: str) -> Any:
            submitted.append(endpoint)
            raise InvalidOptionError("fake pool")

        return submit

    gateway._submitter = submitter  # type: ignore[method-assign]
    return gateway, submitted


def test_labels_default_to_app_function_method_as_a_dns_name() -> None:
    assert default_label("My_App", "embed", None) == "my-app-embed"
    assert default_label("a", "Model", "predict") == "a-model-predict"
    long = default_label("x" * 80, "f", None)
    assert len(long) <= 63 and routes.endpoints_of("x" * 80, "ap-1", _spec(), ephemeral=False)[0].label == long


def test_ephemeral_apps_serve_dev_labels_and_the_newest_version_wins() -> None:
    old = _app("svc", _spec(), state="ephemeral", version=1)
    new = _app("svc", _spec(), state="ephemeral", version=2)
    table = routes.RouteTable()
    endpoint = table.lookup("svc-f-dev", {"a": old, "b": new})
    assert endpoint is not None and endpoint.app_id == "ap-svc-2"
    assert table.lookup("svc-f", {"a": old, "b": new}) is None


def test_a_label_another_app_serves_is_refused_but_a_redeploy_of_the_same_app_is_not() -> None:
    running = [_app("one", _spec(label="shared"))]
    with pytest.raises(InvalidOptionError, match="which app 'one' already serves"):
        routes.check_conflicts("two", _spec(label="shared"), False, running)
    routes.check_conflicts("one", _spec(label="shared"), False, running)


def test_requests_route_by_path_segment_or_by_host_name(tokens: ProxyTokens) -> None:
    gateway, submitted = _gateway({"a": _app("svc", _spec())}, tokens)
    assert gateway._route({"path": "/svc-f/x/y", "headers": []}) == ("svc-f", "/x/y", "/svc-f")
    assert gateway._route({"path": "/x/y", "headers": [(b"host", b"svc-f.localhost:8700")]}) == ("svc-f", "/x/y", "")
    assert gateway._route({"path": "/", "headers": [(b"host", b"127.0.0.1:8700")]}) == (None, "/", "")
    status, body = _request(gateway, "/nothing-here/")
    assert status == 404 and b"no web endpoint is labelled 'nothing-here'" in body
    status, _ = _request(gateway, "/svc-f/")
    assert status == 503 and [e.label for e in submitted] == ["svc-f"]


def test_protected_endpoints_need_a_valid_token_and_never_see_it(tokens: ProxyTokens) -> None:
    gateway, submitted = _gateway({"a": _app("svc", _spec(requires_proxy_auth=True))}, tokens)
    assert _request(gateway, "/svc-f/")[0] == 401 and not submitted
    token = tokens.create()
    good = [(b"modal-key", token["token_id"].encode()), (b"modal-secret", token["token_secret"].encode())]
    bad = [(b"modal-key", token["token_id"].encode()), (b"modal-secret", b"ws-wrong")]
    assert _request(gateway, "/svc-f/", bad)[0] == 401
    assert _request(gateway, "/svc-f/", good)[0] == 503 and len(submitted) == 1
    tokens.delete(token["token_id"])
    assert _request(gateway, "/svc-f/", good)[0] == 401


def test_a_gateway_bound_beyond_loopback_asks_every_endpoint_for_a_token(tokens: ProxyTokens) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    gateway, submitted = _gateway({"a": _app("svc", _spec())}, tokens, require_all=True)
    assert _request(gateway, "/svc-f/")[0] == 401 and not submitted
