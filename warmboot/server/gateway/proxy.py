"""A request to a ``web_server`` endpoint: HTTP/1.1 forwarded to the server the function started in its container.

The container has no port on the host. A container's slot connects into its network namespace
(``FunctionContainer.connect``) and hands the connected socket to this request's task, which speaks HTTP/1.1 to
it with h11 (uvicorn's own HTTP parser) and streams both bodies; the slot stays taken until the exchange ends,
so ``@modal.concurrent`` and ``max_containers`` bound web traffic as they bound calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from warmboot.errors import FunctionTimeoutError
from warmboot.protocol import Outcome
from warmboot.server.calls import Call
from warmboot.server.gateway.exchange import Receive, Send, Submit, next_request_id

#: Connection-level headers: they describe one hop, so they are not forwarded (RFC 9110, 7.6.1).
_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"transfer-encoding",
}


async def serve(
    submit: Submit,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    *,
    port: int,
    path: str,
    error_page: Callable[[Send, int, str], Awaitable[None]],
) -> None:
    if scope["type"] != "http":
        await send({"type": "websocket.close", "code": 1003, "reason": "web_server endpoints take HTTP only"})
        return
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[Any] = loop.create_future()
    finished = threading.Event()

    def hand_over(result: Any) -> None:
        if not connected.done():
            connected.set_result(result)

    def run(container: Any, timeout: float) -> Outcome:
        try:
            sock = container.connect(port)
        except OSError as exc:
            return Outcome(ok=False, error_type="ContainerError", message=f"cannot reach port {port}: {exc}")
        loop.call_soon_threadsafe(hand_over, sock)
        if not finished.wait(timeout):
            timed_out = f"the request exceeded the function's timeout of {timeout:g} s"
            return Outcome(ok=False, error_type=FunctionTimeoutError.__name__, message=timed_out)
        return Outcome(ok=True)

    call: Call = submit(run, next_request_id())
    call.when_done(lambda done: loop.call_soon_threadsafe(hand_over, done))
    try:
        got = await connected
        if isinstance(got, Call):  # it ended before a connection: the container did not start, or the port is shut
            outcome = got.outcome
            await error_page(send, 502, (outcome.message if outcome else "") or "the web server is unreachable")
            return
        await _exchange(got, scope, receive, send, path, error_page)
    finally:
        finished.set()


async def _exchange(
    sock: Any,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    path: str,
    error_page: Callable[[Send, int, str], Awaitable[None]],
) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    conn = h11.Connection(h11.CLIENT)
    started = False
    try:
        query = scope.get("query_string", b"")
        target = path.encode("latin-1") + (b"?" + query if query else b"")
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _HOP_BY_HOP]
        body_headers = {k.lower() for k, _ in headers}
        chunked = any(k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in scope["headers"])
        if chunked and b"content-length" not in body_headers:
            headers.append((b"transfer-encoding", b"chunked"))
        if b"host" not in body_headers:
            headers.append((b"host", b"localhost"))
        headers.append((b"connection", b"close"))
        writer.write(conn.send(h11.Request(method=scope["method"], target=target, headers=headers)))
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                return
            body = event.get("body", b"")
            if body:
                writer.write(conn.send(h11.Data(data=body)))
            if not event.get("more_body", False):
                break
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                headers = [(k, v) for k, v in event.headers if k.lower() not in _HOP_BY_HOP]
                await send({"type": "http.response.start", "status": event.status_code, "headers": headers})
                started = True
            elif isinstance(event, h11.Data):
                await send({"type": "http.response.body", "body": bytes(event.data), "more_body": True})
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
    except h11.ProtocolError as exc:
        if not started:
            await error_page(send, 502, f"the web server's response is not valid HTTP/1.1: {exc}")
    finally:
        writer.close()
