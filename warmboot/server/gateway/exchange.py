"""A request to an ASGI, WSGI or FastAPI endpoint: the ASGI connection carried over the container's pipes.

The request becomes an input of the function's pool (``Call.run``). When a container takes it, its slot thread
runs :meth:`FunctionContainer.web_call`, which sends the scope and first body chunk, forwards the client's later
events (posted here into the call's inbox), and hands each of the container's ``send`` events back to this
request's task on the gateway's loop. The request's task only awaits: it never blocks the loop.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import queue
from collections.abc import Awaitable, Callable
from typing import Any

from warmboot.errors import FunctionTimeoutError, ProtocolViolationError, WarmbootError
from warmboot.protocol import Outcome
from warmboot.runtime import wire
from warmboot.server.calls import Call
from warmboot.server.pool import FunctionPool, Lease
from warmboot.worker.runner import CLIENT

_request_numbers = itertools.count(1)
_PROCESS = f"{os.getpid():x}"


def next_request_id() -> str:
    """A web request's id: unique in this server (its log lines and frames name it), and cheap to make."""
    return f"wr-{_PROCESS}-{next(_request_numbers)}"


Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
#: Submits a web input to its endpoint's pool and returns the call (``Gateway.submit``).
Submit = Callable[[Callable[[Any, float], Outcome], str], Call]


def json_scope(scope: dict[str, Any], path: str, root_path: str) -> dict[str, Any]:
    """The parts of an ASGI scope that travel to the container (JSON: header bytes as latin-1 strings)."""
    out: dict[str, Any] = {
        "type": scope["type"],
        "http_version": scope.get("http_version", "1.1"),
        "scheme": scope.get("scheme", "http"),
        "path": path,
        "raw_path": path,
        "root_path": root_path,
        "query_string": scope.get("query_string", b"").decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope.get("headers", [])],
        "client": list(scope["client"]) if scope.get("client") else None,
        "server": list(scope["server"]) if scope.get("server") else None,
    }
    if scope["type"] == "http":
        out["method"] = scope["method"]
    else:
        out["subprotocols"] = list(scope.get("subprotocols", []))
    return out


def _asgi_event(message: wire.WebSend) -> dict[str, Any]:
    """A container's send event, as the gateway's own ASGI server takes it."""
    event: dict[str, Any] = {"type": message.event}
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in message.headers or []]
    if message.event == "http.response.start":
        event.update(status=message.status or 200, headers=headers)
    elif message.event == "http.response.body":
        event.update(body=message.body, more_body=message.more_body)
    elif message.event == "websocket.accept":
        event.update(subprotocol=message.subprotocol, headers=headers)
    elif message.event == "websocket.send":
        if message.text is not None:
            event["text"] = message.text
        else:
            event["bytes"] = message.body
    elif message.event == "websocket.close":
        event.update(code=message.code or 1000, reason=message.reason or "")
    return event


async def serve(
    submit: Submit,
    scope: dict[str, Any],
    receive: Receive,
    send: Send,
    *,
    path: str,
    root_path: str,
    method: str | None,
    error_page: Callable[[Send, int, str], Awaitable[None]],
    lease: Callable[[], tuple[FunctionPool, Lease] | None] | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    call_id = next_request_id()
    is_http = scope["type"] == "http"
    body, more_body = b"", False
    if is_http:
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        body, more_body = first.get("body", b""), first.get("more_body", False)
    else:
        await receive()  # websocket.connect: the container's app gets its own
    request = wire.WebRequest(
        call_id, json_scope(scope, path, root_path), body=body, more_body=more_body, method=method
    )
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
    events: asyncio.Queue[wire.WebSend | Call] = asyncio.Queue()

    def on_send(message: wire.WebSend) -> None:
        loop.call_soon_threadsafe(events.put_nowait, message)

    lent = lease() if lease is not None and is_http and not more_body else None
    if lent is not None:
        pool, slot = lent
        container = slot.handle
        if container.web_begin(request, on_send, on_send):  # type: ignore[attr-defined]
            await _serve_on_lease(pool, slot, request, receive, send, events, error_page)  # type: ignore[arg-type]
            return
        pool.release(slot)

    def run(container: Any, timeout: float) -> Outcome:
        return container.web_call(request, inbox, on_send, timeout)

    call = submit(run, call_id)
    call.when_done(lambda done: loop.call_soon_threadsafe(events.put_nowait, done))

    async def pump_client() -> None:
        """The client's later events, to the container (through the call's inbox)."""
        while True:
            event = await receive()
            kind = event["type"]
            if kind == "http.request":
                inbox.put((CLIENT, wire.WebReceive(call_id, kind, body=event.get("body", b""),
                                                   more_body=event.get("more_body", False))))  # fmt: skip
            elif kind == "websocket.receive":
                inbox.put((CLIENT, wire.WebReceive(call_id, kind, body=event.get("bytes") or b"",
                                                   text=event.get("text"))))  # fmt: skip
            else:  # http.disconnect, websocket.disconnect
                inbox.put((CLIENT, wire.WebReceive(call_id, kind, code=event.get("code"))))
                return

    # The client's later events matter to a request whose body is still coming, to a websocket, and to a
    # streamed response (a client that leaves an event stream must stop it); a plain request and response
    # needs no task listening for them.
    pump = loop.create_task(pump_client()) if more_body or not is_http else None
    started = False
    try:
        while True:
            item = await events.get()
            if isinstance(item, Call):
                break
            started = started or item.event in ("http.response.start", "websocket.accept", "websocket.close")
            if pump is None and item.more_body and item.event == "http.response.body":
                pump = loop.create_task(pump_client())
            await send(_asgi_event(item))
        outcome = item.outcome
        if outcome is not None and not outcome.ok and not started:
            status = 504 if outcome.error_type == FunctionTimeoutError.__name__ else 500
            if outcome.error_type and outcome.error_type != FunctionTimeoutError.__name__:
                status = 502  # the platform failed (the container did not start, or died): not the app's answer
            message = outcome.message or "the endpoint failed"
            if is_http:
                await error_page(send, status, message)
            else:
                await send({"type": "websocket.close", "code": 1011, "reason": message[:120]})
    except OSError:
        pass  # the client went away; the pump tells the container
    finally:
        if pump is not None:
            pump.cancel()
        if not call.done.is_set():
            inbox.put((CLIENT, wire.WebReceive(call_id, "http.disconnect" if is_http else "websocket.disconnect")))


async def _serve_on_lease(
    pool: FunctionPool,
    slot: Lease,
    request: wire.WebRequest,
    receive: Receive,
    send: Send,
    events: asyncio.Queue[Any],
    error_page: Callable[[Send, int, str], Awaitable[None]],
) -> None:
    """The fast path: a plain HTTP request on a slot lent by its pool, whose frames this task wrote itself; the
    container's reader thread hands its answer straight here. No thread of the pool is woken."""
    loop = asyncio.get_running_loop()
    container: Any = slot.handle
    call_id = request.call_id
    broken = False
    started = False
    pump: asyncio.Task[None] | None = None

    async def pump_client() -> None:  # a streamed response: the client leaving must reach the app
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                message = wire.WebReceive(call_id, "http.disconnect")
                await loop.run_in_executor(None, container.send_input, message)
                return

    try:
        async with asyncio.timeout(pool.settings.timeout):
            while True:
                item = await events.get()
                if isinstance(item, wire.WebSend):
                    started = started or item.event == "http.response.start"
                    if pump is None and item.more_body and item.event == "http.response.body":
                        pump = loop.create_task(pump_client())
                    await send(_asgi_event(item))
                    continue
                if isinstance(item, wire.Result):
                    if item.call_id != call_id:
                        broken = True  # the reader routes by call id: this cannot be for another request
                        raise ProtocolViolationError(f"a result for {item.call_id} reached web request {call_id}")
                    if not item.ok and not started:
                        await error_page(send, 500, item.message or "the endpoint failed")
                    return
                # The container broke (its reader put the error here), or answered out of turn: it stops, and
                # the pool replaces it.
                broken = True
                if not isinstance(item, WarmbootError):
                    item = ProtocolViolationError(
                        f"{pool.settings.label} answered web request {call_id} with a {item.TYPE!r} message; "
                        "its container was stopped"
                    )
                    await loop.run_in_executor(None, container.kill)
                if not started:
                    await error_page(send, 502, str(item))
                return
    except TimeoutError:
        broken = True
        await loop.run_in_executor(None, container.kill)
        if not started:
            message = f"{pool.settings.label} web request {call_id} exceeded the function's timeout"
            await error_page(send, 504, f"{message} of {pool.settings.timeout:g} s; the container was stopped")
    except OSError:
        pass  # the client went away
    finally:
        if pump is not None:
            pump.cancel()
        container.web_end(call_id, served=not broken)
        pool.release(slot, broken=broken)
