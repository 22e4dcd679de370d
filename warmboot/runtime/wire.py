"""The framing of messages on a container's control pipes (fd 3 in, fd 4 out), shared by both ends.

A frame is an 8-byte header (two big-endian lengths), a JSON object, then the raw bytes of its binary
fields. JSON and not pickle: the worker reads what a container writes, and unpickling bytes that came from
a container would run its code in the worker. User objects (arguments, results, exceptions) travel as
opaque cloudpickle bytes that only the container or the calling process unpickles.
"""

from __future__ import annotations

import dataclasses
import json
import select
import struct
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, ClassVar

_HEADER = struct.Struct(">II")
#: The largest JSON part accepted (binary payloads have their own bound): a frame claiming more is malformed.
MAX_JSON = 16 << 20
#: The largest binary payload accepted (a result): a container must not make the worker buffer unbounded bytes.
MAX_PAYLOAD = 1 << 30

# Message types: runtime -> worker
SNAPSHOT_POINT = "snapshot_point"  # imported, @enter(snap=True) done, no input taken yet: safe to checkpoint
READY = "ready"  # @enter(snap=False) done, waiting for inputs
RESULT = "result"  # the outcome of one call
ITEM = "item"  # one value yielded by a generator call, before its result
INIT_ERROR = "init_error"  # import or an @enter hook failed; the runtime exits after sending it
WEB_SEND = "web_send"  # one ASGI ``send`` event of a web request (response start, body, websocket frames)
# worker -> runtime
START = "start"  # continue after the snapshot point, with this container's identity and environment
CALL = "call"
BATCH = "batch"  # several calls of a @batched function, run as one
WEB_REQUEST = "web_request"  # an HTTP request or websocket for a web endpoint (an ASGI scope and its first body)
WEB_RECEIVE = "web_receive"  # a later ASGI ``receive`` event of that request (body chunks, disconnect, ws frames)
SHUTDOWN = "shutdown"


# ----- the messages, typed -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotPoint:
    """Imported, ``@enter(snap=True)`` done, no input taken: the worker may checkpoint now."""

    TYPE: ClassVar[str] = SNAPSHOT_POINT


@dataclass(frozen=True)
class Ready:
    """``@enter(snap=False)`` done: the container takes inputs."""

    TYPE: ClassVar[str] = READY
    enter_ms: float = 0.0  #: how long the ``@enter(snap=False)`` hooks and a web endpoint's startup took


@dataclass(frozen=True)
class Result:
    """The outcome of the call ``call_id`` (fields as in ``warmboot.protocol.Outcome``)."""

    TYPE: ClassVar[str] = RESULT
    call_id: str
    ok: bool
    value: bytes | None = None
    exception: bytes | None = None
    error_type: str | None = None
    message: str = ""
    traceback: str = ""


@dataclass(frozen=True)
class Item:
    """One value a generator call yielded (``.remote_gen``); its :class:`Result` follows the last one."""

    TYPE: ClassVar[str] = ITEM
    call_id: str
    value: bytes  #: cloudpickled


@dataclass(frozen=True)
class InitError:
    """User code failed while the container started; the runtime exits after sending it."""

    TYPE: ClassVar[str] = INIT_ERROR
    phase: str  #: "import" or "enter"
    traceback: str


@dataclass(frozen=True)
class Start:
    """Go on past the snapshot point as this container, with its current environment."""

    TYPE: ClassVar[str] = START
    container_id: str
    env: dict[str, str] = field(default_factory=dict)
    reseed: bool = False  #: a restored copy: reseed the random generators
    gpus_added: bool = False  #: GPUs appeared at START: forget cached device counts


@dataclass(frozen=True)
class CallInput:
    TYPE: ClassVar[str] = CALL
    call_id: str
    args: bytes  #: cloudpickled (args, kwargs)
    method: str | None = None
    generator: bool = False  #: the caller iterates (``.remote_gen``): send each yielded value as an :class:`Item`


@dataclass(frozen=True)
class BatchInput:
    """Calls of a ``@batched`` function, run as one: one :class:`Result` comes back per call id."""

    TYPE: ClassVar[str] = BATCH
    call_ids: list[str]
    sizes: list[int]  #: the length of each call's cloudpickled (args, kwargs) in ``args``, in order
    args: bytes  #: those pickles, concatenated (a frame carries bytes only as top-level fields)
    method: str | None = None

    def split(self) -> list[bytes]:
        parts, offset = [], 0
        for size in self.sizes:
            parts.append(self.args[offset : offset + size])
            offset += size
        return parts


@dataclass(frozen=True)
class WebRequest:
    """One HTTP request or websocket for a web endpoint, as an ASGI connection: ``scope`` is its ASGI scope with
    header names and values as latin-1 strings (JSON has no bytes); ``body`` is the first request body chunk.

    The container answers with :class:`WebSend` events and then a :class:`Result` (the ASGI app returned)."""

    TYPE: ClassVar[str] = WEB_REQUEST
    call_id: str
    scope: dict[str, Any]
    body: bytes = b""
    more_body: bool = False
    method: str | None = None  #: a class's web method


@dataclass(frozen=True)
class WebReceive:
    """An ASGI ``receive`` event for the request ``call_id``: ``http.request`` (more body), ``http.disconnect``,
    ``websocket.receive`` (``body`` or ``text``) or ``websocket.disconnect``."""

    TYPE: ClassVar[str] = WEB_RECEIVE
    call_id: str
    event: str
    body: bytes = b""
    text: str | None = None
    more_body: bool = False
    code: int | None = None


@dataclass(frozen=True)
class WebSend:
    """An ASGI ``send`` event of the request ``call_id`` (fields as in the ASGI spec; headers as latin-1 strings)."""

    TYPE: ClassVar[str] = WEB_SEND
    call_id: str
    event: str
    status: int | None = None
    headers: list[list[str]] | None = None
    body: bytes = b""
    text: str | None = None
    more_body: bool = False
    subprotocol: str | None = None
    code: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Shutdown:
    TYPE: ClassVar[str] = SHUTDOWN


Message = (
    SnapshotPoint
    | Ready
    | Result
    | Item
    | InitError
    | WebSend
    | Start
    | CallInput
    | BatchInput
    | WebRequest
    | WebReceive
    | Shutdown
)
MESSAGES: dict[str, type] = {
    kind.TYPE: kind
    for kind in (
        SnapshotPoint,
        Ready,
        Result,
        Item,
        InitError,
        WebSend,
        Start,
        CallInput,
        BatchInput,
        WebRequest,
        WebReceive,
        Shutdown,
    )
}


class ChannelClosed(EOFError):
    """The other end closed the pipe (the container or the worker is gone)."""


class ProtocolError(ValueError):
    """The other end wrote something that is not a well-formed message."""


def send(stream: BinaryIO, message: dict[str, Any]) -> None:
    stream.write(encode(message))
    stream.flush()


def encode(message: dict[str, Any]) -> bytes:
    """One frame's bytes (several can go in one write: see :func:`send_messages`)."""
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    binary: dict[str, int] = {}
    for key, value in message.items():
        if isinstance(value, bytes | bytearray | memoryview):
            binary[key] = len(value)
            blobs.append(bytes(value))
        else:
            header[key] = value
    if binary:
        header["_binary"] = binary  # field name -> length, in the order the bytes follow
    body = json.dumps(header, separators=(",", ":")).encode()
    payload = b"".join(blobs)
    return _HEADER.pack(len(body), len(payload)) + body + payload


def _read_exact(stream: BinaryIO, n: int, deadline: float | None = None) -> bytes:
    chunks = []
    while n:
        if deadline is not None:
            # Wait for bytes with the caller's deadline: a peer that writes half a frame and stops must not
            # hold the reader past it.
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([stream], [], [], left)[0]:
                raise TimeoutError("no complete message before the deadline")
        chunk = stream.read(n)
        if not chunk:
            raise ChannelClosed("channel closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(stream: BinaryIO, timeout: float | None = None) -> dict[str, Any]:
    """The next message; :class:`ChannelClosed` at EOF, :class:`ProtocolError` for anything malformed.

    With ``timeout`` (seconds), :class:`TimeoutError` when the whole message has not arrived by then; ``stream``
    must then be unbuffered, so that select() sees every byte still to read.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    json_len, blob_len = _HEADER.unpack(_read_exact(stream, _HEADER.size, deadline))
    if json_len > MAX_JSON:
        raise ProtocolError(f"message header of {json_len} bytes exceeds {MAX_JSON}")
    if blob_len > MAX_PAYLOAD:
        raise ProtocolError(f"message payload of {blob_len} bytes exceeds {MAX_PAYLOAD}")
    try:
        message = json.loads(_read_exact(stream, json_len, deadline))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"message is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("message is not an object with a 'type'")
    payload = _read_exact(stream, blob_len, deadline)
    binary = message.pop("_binary", {})
    if not isinstance(binary, dict) or sum(v for v in binary.values() if isinstance(v, int)) != blob_len:
        raise ProtocolError("message's binary fields do not add up to its payload")
    offset = 0
    for key, length in binary.items():
        if not isinstance(length, int) or length < 0:
            raise ProtocolError(f"binary field {key!r} has no valid length")
        message[key] = payload[offset : offset + length]
        offset += length
    return message


def as_dict(message: Message) -> dict[str, Any]:
    return {"type": message.TYPE, **{f.name: getattr(message, f.name) for f in dataclasses.fields(message)}}


def take_messages(buffer: bytearray) -> list[Message]:
    """The complete frames at the start of ``buffer``, removed from it (for a reader fed by non-blocking reads);
    checked as :func:`recv_message` checks them."""
    import io

    found = []
    while len(buffer) >= _HEADER.size:
        json_len, blob_len = _HEADER.unpack_from(buffer)
        if json_len > MAX_JSON or blob_len > MAX_PAYLOAD:
            raise ProtocolError("message too large")
        end = _HEADER.size + json_len + blob_len
        if len(buffer) < end:
            break
        frame = bytes(buffer[:end])
        del buffer[:end]
        found.append(recv_message(io.BytesIO(frame)))
    return found


def send_message(stream: BinaryIO, message: Message) -> None:
    send(stream, as_dict(message))


def send_messages(stream: BinaryIO, messages: list[Message]) -> None:
    """Several frames in one write: the reader takes them in one wake-up (a web response and its result)."""
    stream.write(b"".join(encode(as_dict(m)) for m in messages))
    stream.flush()


def recv_message(stream: BinaryIO, timeout: float | None = None) -> Message:
    """The next message as its dataclass; :class:`ProtocolError` for an unknown type, or missing or extra fields.

    Field *types* are not checked here (the container trusts the worker); the worker checks what a container
    sends against these dataclasses (``worker.runner``).
    """
    fields_ = recv(stream, timeout)
    type_ = fields_.pop("type")
    kind = MESSAGES.get(type_)
    if kind is None:
        raise ProtocolError(f"unknown message type {type_[:40]!r}")
    try:
        return kind(**fields_)
    except TypeError as exc:
        raise ProtocolError(f"malformed {kind.TYPE!r} message: {exc}") from None
