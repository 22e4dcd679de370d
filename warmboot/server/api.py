"""The server's transport: a root-only Unix socket served by one asyncio loop.

An open connection costs a coroutine, not a thread: a caller blocked in ``.remote()`` or
``FunctionCall.get()`` waits on a future that the call's completion resolves. The operations themselves
touch SQLite, the filesystem and the pools, which block, so they run on a bounded pool of threads
(:data:`WORKERS`); streaming operations (deploys, which build images, and ``warmboot logs -f``) run on a
second bounded pool (:data:`MAX_STREAMS`), so a slow build never starves quick requests. Past
:data:`MAX_CONNECTIONS` open connections, or :data:`MAX_STREAMS` streams, a client is told at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmboot import protocol
from warmboot.errors import ServerError, WarmbootError
from warmboot.protocol import Reply
from warmboot.server.calls import Call

if TYPE_CHECKING:
    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.api")

#: Connections open at once (an idle follower of ``warmboot logs -f`` holds one).
MAX_CONNECTIONS = int(os.environ.get("WARMBOOT_MAX_CONNECTIONS", "256"))
#: Streaming operations (deploys, log followers) running at once, each on a thread of its own.
MAX_STREAMS = int(os.environ.get("WARMBOOT_MAX_STREAMS", "32"))
#: Threads for the other operations (each is short: a database write, a lookup, a pool submit).
WORKERS = 16

_END = object()  # marks the end of a streaming operation's events


class ApiServer:
    """Accepts connections on ``socket_path`` and answers each request through ``plane``."""

    def __init__(self, plane: ControlPlane, socket_path: Path):
        self.plane = plane
        self.socket_path = socket_path
        self._quick = ThreadPoolExecutor(WORKERS, thread_name_prefix="api")
        self._streams = ThreadPoolExecutor(MAX_STREAMS, thread_name_prefix="stream")
        self._open = 0
        self._streaming = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    # ----- running ---------------------------------------------------------------------------------------

    def serve_forever(self, on_listening: Callable[[], None] = lambda: None) -> None:
        asyncio.run(self._main(on_listening))

    def stop(self) -> None:
        """Stop accepting (from any thread)."""
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)

    async def _main(self, on_listening: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        old_umask = os.umask(0o177)  # the socket is born root-only
        try:
            server = await asyncio.start_unix_server(self._connection, path=str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        on_listening()
        async with server:
            await self._stopped.wait()

    # ----- one connection --------------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            await self._send(
                writer,
                Reply.error(
                    ServerError(
                        f"the server is busy: {MAX_CONNECTIONS} connections are open (WARMBOOT_MAX_CONNECTIONS); "
                        "retry when some have finished"
                    )
                ),
            )
            writer.close()
            return
        self._open += 1
        op = "?"
        try:
            length = protocol.frame_length(await reader.readexactly(protocol.HEADER_SIZE))
            op, request = protocol.decode_request(await reader.readexactly(length))
            if op in protocol.STREAMING:
                await self._stream(op, request, reader, writer)
            elif op == "call_gen":
                await self._call_gen(request, writer)
            else:
                await self._send(writer, Reply(kind="value", value=await self._answer(op, request)))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away (a liveness probe connects and closes at once)
        except WarmbootError as exc:
            await self._send(writer, Reply.error(exc))
        except Exception as exc:
            log.exception("operation %s failed", op)
            await self._send(writer, Reply.error(ServerError(f"internal error in {op}: {type(exc).__name__}: {exc}")))
        finally:
            self._open -= 1
            with contextlib.suppress(ConnectionError, RuntimeError):
                writer.close()

    async def _send(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.write(protocol.frame(reply))
            await writer.drain()

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._quick, fn, *args)

    async def _answer(self, op: str, request: Any) -> Any:
        if op == "call":
            call = await self._blocking(self.plane.accept_call, request.target, request.args, False)
            await self._finished(call)
            await self._blocking(self.plane.calls.delivered, call)
            return call.outcome
        if op == "get":
            timeout = protocol.wait_seconds("FunctionCall.get", request.timeout)
            call = await self._blocking(self.plane.calls.get, request.call_id)
            if call.done.is_set():
                return call.outcome  # get(timeout=0) polls: wait_for(..., 0) would time out before looking
            try:
                await asyncio.wait_for(self._finished(call), timeout)
            except TimeoutError:
                return None
            return call.outcome
        return await self._blocking(getattr(self.plane, f"op_{op}"), request)

    async def _call_gen(self, request: protocol.CallGen, writer: asyncio.StreamWriter) -> None:
        """A generator call: each yielded value as an ``item`` reply as it comes, then the outcome."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[bytes] = asyncio.Queue()

        def on_item(value: bytes) -> None:
            loop.call_soon_threadsafe(items.put_nowait, value)

        call = await self._blocking(self.plane.accept_call, request.target, request.args, False, on_item)
        finished = asyncio.ensure_future(self._finished(call))
        while True:
            next_item = asyncio.ensure_future(items.get())
            await asyncio.wait({next_item, finished}, return_when=asyncio.FIRST_COMPLETED)
            if next_item.done():
                await self._send(writer, Reply(kind="item", value=next_item.result()))
                continue
            next_item.cancel()
            break
        while not items.empty():  # values that arrived with the outcome, in order
            await self._send(writer, Reply(kind="item", value=items.get_nowait()))
        await self._blocking(self.plane.calls.delivered, call)
        await self._send(writer, Reply(kind="value", value=call.outcome))

    async def _finished(self, call: Call) -> None:
        """Wait, without a thread, until ``call`` is done."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def resolve(_: Call) -> None:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        call.when_done(resolve)
        await done

    # ----- streaming operations --------------------------------------------------------------------------

    async def _stream(self, op: str, request: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._streaming >= MAX_STREAMS:
            raise ServerError(
                f"the server is busy: {MAX_STREAMS} deploys and log followers are running (WARMBOOT_MAX_STREAMS); "
                "retry when some have finished"
            )
        self._streaming += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        gone = threading.Event()  # the client closed its end: a log follower stops

        def emit(key: str, text: str) -> None:
            if gone.is_set():
                raise BrokenPipeError("the client went away")
            loop.call_soon_threadsafe(events.put_nowait, Reply(kind="event", event={key: text}))

        def work() -> None:
            try:
                value = getattr(self.plane, f"op_{op}")(request, emit, gone)
                loop.call_soon_threadsafe(events.put_nowait, Reply(kind="value", value=value))
            except BrokenPipeError:
                pass
            except WarmbootError as exc:
                loop.call_soon_threadsafe(events.put_nowait, Reply.error(exc))
            except Exception as exc:
                log.exception("operation %s failed", op)
                error = ServerError(f"internal error in {op}: {type(exc).__name__}: {exc}")
                loop.call_soon_threadsafe(events.put_nowait, Reply.error(error))
            finally:
                loop.call_soon_threadsafe(events.put_nowait, _END)

        async def watch_client() -> None:
            with contextlib.suppress(ConnectionError):
                await reader.read(1)  # a client sends nothing more: this returns when it closes
            gone.set()

        watcher = asyncio.create_task(watch_client())
        loop.run_in_executor(self._streams, work)
        try:
            while (reply := await events.get()) is not _END:
                if not gone.is_set():
                    await self._send(writer, reply)
        finally:
            watcher.cancel()
            gone.set()
            self._streaming -= 1
