"""Web endpoints inside the container: each request is an ASGI connection carried over the control pipes.

The gateway (``server/gateway``) turns an HTTP request or websocket into a ``WebRequest`` frame (the ASGI scope
and the first body chunk); later ``receive`` events follow as ``WebReceive`` frames, and every ``send`` event of
the app goes back as a ``WebSend`` frame, then a ``Result`` when the app returns. No port is opened in the
container for these: nothing listens, nothing reaches the container but its worker, and a snapshot holds no
socket. ``web_server`` functions are the exception: they start their own server, which the gateway reaches
through the container's network namespace; here we only wait for its port to accept connections.

ASGI apps run on the container's one asyncio loop (``Executor.loop``), several at once when the function is
``@modal.concurrent``. WSGI apps are adapted with a2wsgi (in the runtime layer); ``fastapi_endpoint``
functions are wrapped in a one-route FastAPI app (FastAPI must be in the image, as on Modal).
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

from warmboot.runtime import wire

if TYPE_CHECKING:
    import asyncio

    from warmboot.runtime.executor import Executor


class WebHost:
    """The container's web endpoints (one per web method of a class, else one), and the requests in flight."""

    def __init__(self, executor: Executor, endpoints: dict[str | None, dict[str, Any]]):
        self._executor = executor
        self._endpoints = endpoints  #: method (None for a function) -> its decorator's settings (``sdk.web``)
        self._apps: dict[str | None, Any] = {}
        self._receivers: dict[str, asyncio.Queue[dict[str, Any]]] = {}
        self._states: dict[str | None, dict[str, Any]] = {}  #: each app's lifespan state
        self._lifespans: list[tuple[asyncio.Queue[dict[str, Any]], asyncio.Task[None]]] = []
        self._tasks: set[asyncio.Task[None]] = set()  #: requests being served

    def prewarm(self) -> None:
        """Before the snapshot point: import what the endpoints will need, so that a restored copy has it.

        Only imports; nothing of the user's runs here (their factories run at START, with the container's
        environment and secrets).
        """
        kinds = {info["kind"] for info in self._endpoints.values()}
        wanted = []
        if kinds & {"fastapi_endpoint", "asgi_app"}:
            wanted.append("fastapi")
        if "wsgi_app" in kinds:
            wanted.append("a2wsgi")
        for name in wanted:
            with contextlib.suppress(ImportError):  # reported at START, where it is needed, with what to install
                __import__(name)

    def start(self, resolve: Any) -> None:
        """At START, after the ``@enter`` hooks: build each endpoint's ASGI app, or start its web server."""
        for method, info in self._endpoints.items():
            fn = resolve(method)
            kind = info["kind"]
            if kind == "web_server":
                self._executor.run_hook(fn)
                _wait_for_port(info["port"], info["startup_timeout"])
                continue
            if kind == "fastapi_endpoint":
                app = _fastapi_wrapper(fn, info)
            else:
                app = self._call_factory(fn)
                if kind == "wsgi_app":
                    app = _wsgi_adapter(app)
                elif not callable(app):
                    raise TypeError(
                        f"@modal.asgi_app function {getattr(fn, '__name__', fn)} returned {type(app).__name__}; "
                        "it must return an ASGI application (for example a FastAPI() instance)"
                    )
            self._apps[method] = app
            self._lifespan_startup(method, app)

    def _call_factory(self, fn: Any) -> Any:
        import inspect

        result = fn()
        if inspect.isawaitable(result):
            import asyncio

            result = asyncio.run_coroutine_threadsafe(_awaited(result), self._executor.loop()).result()
        return result

    def _lifespan_startup(self, method: str | None, app: Any) -> None:
        """Run the app's ASGI lifespan startup (FastAPI's ``lifespan=``/``on_event("startup")``), as uvicorn's
        "auto" mode does: an app that does not speak lifespan is served anyway. What its lifespan puts in its
        ``state`` is copied into each request's scope, as the ASGI spec says."""
        import asyncio

        state: dict[str, Any] = {}
        self._states[method] = state

        async def run() -> None:
            loop = asyncio.get_running_loop()
            started = loop.create_future()
            inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            inbox.put_nowait({"type": "lifespan.startup"})

            async def send(event: dict[str, Any]) -> None:
                if event["type"] == "lifespan.startup.failed" and not started.done():
                    started.set_exception(RuntimeError(f"ASGI lifespan startup failed: {event.get('message', '')}"))
                elif event["type"] == "lifespan.startup.complete" and not started.done():
                    started.set_result(True)

            async def lifespan() -> None:
                with contextlib.suppress(Exception):  # an app without lifespan support is served without it
                    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}, inbox.get, send)
                if not started.done():
                    started.set_result(False)

            task = loop.create_task(lifespan())
            if await started:
                self._lifespans.append((inbox, task))

        asyncio.run_coroutine_threadsafe(run(), self._executor.loop()).result()

    def shutdown(self, timeout: float = 10.0) -> None:
        """At the container's end: the apps' lifespan shutdown (their ``@on_event("shutdown")`` code runs)."""
        import asyncio

        async def run() -> None:
            for inbox, task in self._lifespans:
                inbox.put_nowait({"type": "lifespan.shutdown"})
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, timeout)

        if self._lifespans:
            asyncio.run_coroutine_threadsafe(run(), self._executor.loop()).result()

    # ----- requests -------------------------------------------------------------------------------------------

    def handle(self, request: wire.WebRequest) -> None:
        """Serve ``request`` (called on the loop, by :func:`serve_inputs_on_loop`); frames for it that arrive
        meanwhile go to :meth:`receive`."""
        import asyncio

        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._receivers[request.call_id] = inbox
        if request.scope.get("type") == "websocket":
            inbox.put_nowait({"type": "websocket.connect"})
        else:
            inbox.put_nowait({"type": "http.request", "body": request.body, "more_body": request.more_body})
        task = asyncio.get_running_loop().create_task(self._serve(request, inbox))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drain(self) -> None:
        """Wait (from another thread) for the requests still being served."""
        import asyncio

        async def wait() -> None:
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(wait(), self._executor.loop()).result()

    def receive(self, message: wire.WebReceive) -> None:
        """A later event of a request (called on the loop)."""
        inbox = self._receivers.get(message.call_id)
        if inbox is None:
            return  # the app has returned already: nothing waits for it
        if message.event == "websocket.receive":
            event: dict[str, Any] = {"type": message.event}
            event["text" if message.text is not None else "bytes"] = message.text or message.body
        elif message.event == "websocket.disconnect":
            event = {"type": message.event, "code": message.code or 1000}
        elif message.event == "http.request":
            event = {"type": message.event, "body": message.body, "more_body": message.more_body}
        else:
            event = {"type": "http.disconnect"}
        inbox.put_nowait(event)

    async def _serve(self, request: wire.WebRequest, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        import asyncio

        from warmboot.sdk.context import CALL_ID

        CALL_ID.set(request.call_id)
        call_id = request.call_id
        loop = asyncio.get_running_loop()
        # Frames wait here until there is a reason to write them: a response's start goes with its first body
        # chunk, and its last chunk with the app's result when the app returns at once (one write, one wake-up
        # of the worker, instead of three). Anything else, and a last chunk whose app goes on (background tasks),
        # is written by the end of the loop's current turn.
        pending: list[wire.Message] = []

        def flush() -> None:
            if pending:
                self._executor.send_many(pending[:])
                pending.clear()

        async def send(event: dict[str, Any]) -> None:
            kind = event["type"]
            headers = event.get("headers")
            pending.append(
                wire.WebSend(
                    call_id,
                    kind,
                    status=event.get("status"),
                    headers=[[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers] if headers else None,
                    body=bytes(event.get("body") or event.get("bytes") or b""),
                    text=event.get("text"),
                    more_body=bool(event.get("more_body", False)),
                    subprotocol=event.get("subprotocol"),
                    code=event.get("code"),
                    reason=event.get("reason"),
                )
            )
            if kind == "http.response.start":
                return
            if kind == "http.response.body" and not event.get("more_body", False):
                loop.call_soon(flush)
                return
            flush()

        try:
            app = self._apps[request.method]
            await app(_asgi_scope(request.scope, self._states.get(request.method)), inbox.get, send)
        except Exception as exc:  # noqa: BLE001 - the gateway answers 500; the traceback goes to the app's log
            traceback.print_exc()
            sys.stderr.flush()
            pending.append(wire.Result(call_id, ok=False, message=f"{type(exc).__name__}: {exc}"))
        else:
            pending.append(wire.Result(call_id, ok=True))
        finally:
            self._receivers.pop(call_id, None)
            flush()


def _asgi_scope(scope: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
    """The scope as an ASGI app expects it: bytes where JSON carried latin-1 strings, tuples for addresses."""
    out = dict(scope)
    out["headers"] = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in scope.get("headers", [])]
    out["query_string"] = scope.get("query_string", "").encode("latin-1")
    out["raw_path"] = scope.get("raw_path", scope.get("path", "/")).encode("latin-1")
    for key in ("client", "server"):
        if out.get(key) is not None:
            out[key] = tuple(out[key])
    out["asgi"] = {"version": "3.0", "spec_version": "2.3"}
    out["state"] = dict(state or {})  # a shallow copy per request, as the ASGI lifespan spec says
    return out


def _fastapi_wrapper(fn: Any, info: dict[str, Any]) -> Any:
    try:
        from fastapi import FastAPI
    except ImportError:
        raise ImportError(
            "@modal.fastapi_endpoint needs FastAPI in the function's image: "
            'add .pip_install("fastapi[standard]") to the image'
        ) from None
    docs = bool(info.get("docs"))
    web = FastAPI(docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    web.add_api_route("/", fn, methods=[info.get("http_method") or "GET"])
    return web


def _wsgi_adapter(app: Any) -> Any:
    if not callable(app):
        raise TypeError(f"@modal.wsgi_app function returned {type(app).__name__}; it must return a WSGI application")
    from a2wsgi import WSGIMiddleware  # a well-kept WSGI-in-ASGI adapter, shipped in the runtime layer

    return WSGIMiddleware(app)


def _wait_for_port(port: int, timeout: float) -> None:
    """Until something accepts connections on ``port`` (on loopback, inside this container), within ``timeout``."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=max(0.05, deadline - time.monotonic())):
                return
        except OSError:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"@modal.web_server({port}): nothing accepted connections on port {port} within "
                    f"startup_timeout={timeout:g} s. Start the server from the function, in the background "
                    f"(e.g. subprocess.Popen), listening on 0.0.0.0:{port}, or raise startup_timeout="
                ) from None
            time.sleep(0.02)  # polling a port: there is no event to wait on for another process's listen()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def serve_inputs_on_loop(control_in: Any, executor: Executor, web: WebHost) -> None:
    """A web container's input loop: the pipe is read on the asyncio loop itself, so a request reaches its app
    with no hand-over between threads. Function inputs (a class's other methods) run on threads. Returns at
    SHUTDOWN or end of input, once the requests being served have ended."""
    import asyncio
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    loop = executor.loop()
    fd = control_in.fileno()
    ended = threading.Event()
    buffer = bytearray()
    calls = ThreadPoolExecutor(max(1, executor.max_concurrent), thread_name_prefix="input")

    def stop() -> None:
        loop.remove_reader(fd)
        ended.set()

    def readable() -> None:
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        if not data:
            stop()
            return
        buffer.extend(data)
        try:
            messages = wire.take_messages(buffer)
        except wire.ProtocolError:
            stop()
            return
        for message in messages:
            if isinstance(message, wire.WebRequest):
                web.handle(message)
            elif isinstance(message, wire.WebReceive):
                web.receive(message)
            elif isinstance(message, wire.CallInput):
                executor.track(calls.submit(executor.submit, message))
            else:  # SHUTDOWN
                stop()
                return

    os.set_blocking(fd, False)
    loop.call_soon_threadsafe(loop.add_reader, fd, readable)
    ended.wait()
    web.drain()
    asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result()
