"""Typed messages over HTTP/1.1 between the control plane and its agents, with bearer tokens.

A request is ``POST /v1/<name>`` with a msgpack body (one :mod:`~warmboot.cluster.messages` dataclass, checked
field by field as it is decoded) and ``Authorization: Bearer <token>``; the reply is a stream of frames (a
4-byte big-endian length and a msgpack document ``{"kind": ..., "body": ...}``), so that a generator's values
can travel before its outcome. A failed request is one ``failure`` frame, re-raised on the caller's side as the
warmboot error it names.

Why the standard library's HTTP server and client rather than uvicorn/httpx: every handler here blocks (it
starts a container, or waits for a call's outcome) and every caller is a thread of a pool that waits for one
reply, so a thread per request is the model either way; these are internal, token-checked endpoints with a
handful of peers, and the stdlib keeps the agent's imports (and start) small.
"""

from __future__ import annotations

import contextlib
import hmac
import http.client
import http.server
import logging
import socket
import struct
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from warmboot import errors
from warmboot.cluster import messages
from warmboot.errors import InvalidOptionError, PeerUnreachableError, ServerError, WarmbootError
from warmboot.errors import UnauthorizedError as Unauthorized

log = logging.getLogger("warmboot.cluster")

T = TypeVar("T")
_LENGTH = struct.Struct(">I")
MAX_FRAME = 1 << 30
_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(dict[str, Any])


def encode(message: Any) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes, kind: type[T]) -> T:
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise InvalidOptionError(f"malformed {kind.__name__}: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise InvalidOptionError(f"undecodable {kind.__name__}: {exc}") from exc


def _frame(kind: str, body: Any) -> bytes:
    data = _encoder.encode({"kind": kind, "body": body})
    return _LENGTH.pack(len(data)) + data


def tokens_match(given: str | None, expected: str) -> bool:
    """Constant-time comparison (a timing difference must not reveal a token a byte at a time)."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


# ----- the server side -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """``POST /v1/<name>``: its request type, its handler, and which token it requires."""

    request: type
    handler: Callable[..., Any]  #: ``handler(request)``, or ``handler(request, emit)`` when ``streams``
    authorized: Callable[[str | None, Any], bool]  #: ``(bearer token, decoded request) -> allowed``
    streams: bool = False  #: the handler gets ``emit(kind, body)`` for frames before its reply


class Listener:
    """An HTTP server answering typed routes on ``host:port`` (port 0: the kernel picks one), a thread each."""

    def __init__(self, host: str, port: int, routes: dict[str, Route], name: str):
        self.routes = routes
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = f"warmboot-{name}"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s: " + format, name, *args)

            def do_POST(self) -> None:
                listener._serve(self)

        self._server = http.server.ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"{name}-http", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        route = self.routes.get(h.path.removeprefix("/v1/")) if h.path.startswith("/v1/") else None
        length = int(h.headers.get("Content-Length") or 0)
        if route is None or not 0 <= length <= MAX_FRAME:
            h.send_error(404 if route is None else 413)
            return
        body = h.rfile.read(length)
        auth = h.headers.get("Authorization") or ""
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        h.send_response(200)
        h.send_header("Content-Type", "application/x-warmboot-frames")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True

        def emit(kind: str, payload: Any) -> None:
            h.wfile.write(_frame(kind, payload))
            h.wfile.flush()

        try:
            try:
                request = decode(body, route.request)
            except InvalidOptionError as exc:
                if not route.authorized(token, None):  # an unauthenticated peer learns nothing, not even the schema
                    raise Unauthorized("refused: wrong or missing token") from None
                raise exc
            if not route.authorized(token, request):
                raise Unauthorized("refused: wrong or missing token")
            reply = route.handler(request, emit) if route.streams else route.handler(request)
            emit("reply", reply)
        except WarmbootError as exc:
            if not isinstance(exc, Unauthorized):
                log.info("%s: %s: %s", h.path, type(exc).__name__, exc)
            with contextlib.suppress(OSError):
                emit("failure", messages.Failure(type(exc).__name__, str(exc)))
        except OSError:  # the caller went away
            log.info("%s: the caller went away before its reply", h.path)
        except Exception as exc:  # a bug must still answer, and the server goes on serving
            log.exception("%s failed", h.path)
            with contextlib.suppress(OSError):
                emit("failure", messages.Failure("ServerError", f"internal error: {type(exc).__name__}: {exc}"))


# ----- the client side -------------------------------------------------------------------------------------


class Peer:
    """The other side, at ``url``, presenting ``token``. Requests in flight can be aborted (:meth:`abort_all`):
    a peer found lost must not leave callers blocked on its sockets."""

    def __init__(self, url: str, token: str, *, name: str, connect_timeout: float = 5.0):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise InvalidOptionError(f"{url!r} is not an http://HOST:PORT URL")
        self.url = url
        self.name = name
        self._host, self._port = parsed.hostname, parsed.port or 80
        self.token = token
        self.connect_timeout = connect_timeout
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._aborted = False

    def request(self, name: str, message: Any, reply: type[T], *, timeout: float | None = 30.0) -> T:
        """Send ``message`` to ``/v1/<name>`` and return its reply; raise the error it answered with."""
        result: list[T] = []
        for kind, body in self.stream(name, message, reply, timeout=timeout):
            if kind == "reply":
                result.append(body)
        return result[0]

    def stream(
        self, name: str, message: Any, reply: type[T], *, timeout: float | None = 30.0
    ) -> Iterator[tuple[str, Any]]:
        """The frames of the reply to ``message``: ``("item", Item)``... then ``("reply", reply)``.

        ``timeout``: the longest wait for any one frame (None: no limit; :meth:`abort_all` still ends it).
        """
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.connect_timeout)
        sock: socket.socket | None = None
        if self._aborted:
            raise PeerUnreachableError(f"{self.name} is lost")
        try:
            try:
                conn.connect()
                # The socket itself is what an abort shuts down: http.client drops its own reference to it once
                # the response headers arrive (the response reads on), long before the reply does.
                sock = conn.sock
                with self._lock:
                    if self._aborted:
                        raise PeerUnreachableError(f"{self.name} is lost")
                    self._open.add(sock)
                sock.settimeout(timeout)
                data = encode(message)
                conn.request(
                    "POST",
                    f"/v1/{name}",
                    body=data,
                    headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/msgpack"},
                )
                response = conn.getresponse()
                if response.status != 200:
                    raise PeerUnreachableError(f"{self.name} answered HTTP {response.status} to {name}")
                while True:
                    header = response.read(_LENGTH.size)
                    if not header:
                        raise PeerUnreachableError(f"{self.name} closed the connection before answering {name}")
                    (length,) = _LENGTH.unpack(header)
                    if length > MAX_FRAME:
                        raise PeerUnreachableError(f"{self.name} sent a frame of {length} bytes")
                    frame = _frame_decoder.decode(response.read(length))
                    kind = frame.get("kind")
                    payload = msgspec.msgpack.encode(frame.get("body"))
                    if kind == "failure":
                        failure = decode(payload, messages.Failure)
                        cls = getattr(errors, failure.error_type, None)
                        if not (isinstance(cls, type) and issubclass(cls, WarmbootError)):
                            cls = ServerError
                        raise cls(failure.message)
                    if kind == "item":
                        yield kind, decode(payload, messages.Item)
                        continue
                    if kind == "reply":
                        yield kind, decode(payload, reply)
                        return
                    raise PeerUnreachableError(f"{self.name} sent a frame of unknown kind {kind!r}")
            except WarmbootError:  # the other side's answer (a FunctionTimeoutError is an OSError too)
                raise
            except (OSError, http.client.HTTPException, msgspec.DecodeError, struct.error) as exc:
                raise PeerUnreachableError(f"{self.name} at {self.url} did not answer {name}: {exc}") from exc
        finally:
            if sock is not None:
                with self._lock:
                    self._open.discard(sock)
            conn.close()

    def abort_all(self) -> None:
        """End every request in flight (their callers get :class:`PeerUnreachableError`), and refuse new ones."""
        with self._lock:
            self._aborted = True
            socks = list(self._open)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
