"""The messages between a client (the SDK and the CLI) and the local server, as typed dataclasses.

A frame on the server's socket is a 4-byte big-endian length and a msgpack document
``{"op": NAME, "body": REQUEST}`` (client to server) or a :class:`Reply` (server to client). The server
checks every request against its dataclass before acting on it (:func:`decode_request`), so a malformed or
mistyped request is refused with an error naming the field, whoever sent it.

msgpack through ``msgspec``, not pickle: it carries bytes natively (arguments and results stay opaque
cloudpickle bytes that only the caller and the container unpickle), and it validates while it decodes.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgspec

from warmboot.errors import InvalidOptionError, WarmbootError

_LENGTH = struct.Struct(">I")
#: The largest frame either side accepts: arguments and results travel inside frames.
MAX_FRAME = 1 << 30


# ----- what calls carry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Which function (or class method) a call runs: in an app by id (``warmboot run``) or by deployed name."""

    tag: str
    app_id: str | None = None
    app_name: str | None = None
    method: str | None = None
    #: ``modal.parameter()`` values of the class's instance (str, int, bool or bytes); checked by the server
    parameters: dict[str, Any] | None = None
    #: ``with_options`` overrides (``sdk.parameter.OVERRIDABLE``); checked by the server like a deploy's options
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class Outcome:
    """How one call ended: its cloudpickled result, or its error (a remote exception or a warmboot error)."""

    ok: bool
    value: bytes | None = None  #: cloudpickled return value (``ok``)
    exception: bytes | None = None  #: cloudpickled exception raised by user code, when it could be pickled
    error_type: str | None = None  #: the exception's class name (a warmboot error's class for platform failures)
    message: str = ""
    traceback: str = ""  #: the remote traceback, formatted in the container

    @classmethod
    def failure(cls, exc: WarmbootError) -> Outcome:
        """The outcome of a call the platform could not complete (timeout, crash, restart)."""
        return cls(ok=False, error_type=type(exc).__name__, message=str(exc))


# ----- requests ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Deploy:
    spec: dict[str, Any]  #: ``App.spec()``; its shape is checked by the server's deploy (``server.specs``)
    source: bytes  #: the app file's contents
    filename: str
    name: str | None = None  #: overrides the spec's name (``warmboot deploy --name``)
    ephemeral: bool = False  #: an app that lives as long as the ``warmboot run`` that made it


@dataclass(frozen=True)
class Call:
    """Run a call and wait for its outcome (``.remote()``)."""

    target: Target
    args: bytes  #: cloudpickled ``(args, kwargs)``


@dataclass(frozen=True)
class CallGen:
    """Run a generator call, streaming its values (``.remote_gen()``): ``item`` replies, then its outcome."""

    target: Target
    args: bytes


@dataclass(frozen=True)
class Submit:
    """Accept a call and return its id at once (``.spawn()``, ``.map()``)."""

    target: Target
    args: bytes


@dataclass(frozen=True)
class Get:
    """The outcome of a submitted call; ``None`` if it has not finished within ``timeout`` seconds."""

    call_id: str
    timeout: float | None = None


@dataclass(frozen=True)
class Cancel:
    """End a call with ``InputCancelledError`` (``FunctionCall.cancel()``); a running one's container is stopped.

    Answers whether the call was still unfinished (``False``: it had already ended, nothing changed).
    """

    call_id: str
    terminate_containers: bool = False  #: Modal's flag; accepted, a running call's container is always stopped


@dataclass(frozen=True)
class AppList:
    pass


@dataclass(frozen=True)
class AppStop:
    app: str  #: name or id


@dataclass(frozen=True)
class ContainerList:
    pass


@dataclass(frozen=True)
class AgentList:
    pass


@dataclass(frozen=True)
class DashboardUrl:
    renew: bool = False  #: a new login token first (the old URL and cookies stop working)


@dataclass(frozen=True)
class AgentDrain:
    name: str
    undo: bool = False


@dataclass(frozen=True)
class SecretCreate:
    name: str
    values: dict[str, Any]  #: checked by ``validation.environment`` (the message names the bad key)


@dataclass(frozen=True)
class SecretList:
    pass


@dataclass(frozen=True)
class Logs:
    app: str  #: name or id; never a path
    from_end: bool = False
    follow: bool = False


@dataclass(frozen=True)
class SnapshotList:
    pass


@dataclass(frozen=True)
class SnapshotRm:
    key: str


@dataclass(frozen=True)
class ServerStop:
    pass


@dataclass(frozen=True)
class StartLogList:
    """Every container start kept in the start log (of one snapshot key), with its phases."""

    key: str | None = None


@dataclass(frozen=True)
class WebUrl:
    """The URL of a function's (or a class method's) web endpoint."""

    target: Target


@dataclass(frozen=True)
class WebList:
    """Every web endpoint of the running apps, with its URL."""


@dataclass(frozen=True)
class TokenCreate:
    """A new proxy auth token (for ``requires_proxy_auth=True`` endpoints); its secret is shown once."""


@dataclass(frozen=True)
class TokenList:
    pass


@dataclass(frozen=True)
class TokenRm:
    token_id: str


#: Operation name -> its request type. Streaming operations answer with :class:`Reply` events first.
REQUESTS: dict[str, type] = {
    "ping": Ping,
    "deploy": Deploy,
    "call": Call,
    "call_gen": CallGen,
    "submit": Submit,
    "get": Get,
    "cancel": Cancel,
    "app_list": AppList,
    "app_stop": AppStop,
    "container_list": ContainerList,
    "agent_list": AgentList,
    "agent_drain": AgentDrain,
    "dashboard_url": DashboardUrl,
    "secret_create": SecretCreate,
    "secret_list": SecretList,
    "logs": Logs,
    "snapshot_list": SnapshotList,
    "snapshot_rm": SnapshotRm,
    "server_stop": ServerStop,
    "start_log": StartLogList,
    "web_url": WebUrl,
    "web_list": WebList,
    "token_create": TokenCreate,
    "token_list": TokenList,
    "token_rm": TokenRm,
}
STREAMING = frozenset({"deploy", "logs"})


# ----- replies -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One frame from the server: an event of a streaming operation, its final value, or an error."""

    kind: str  #: "value" | "event" | "item" (a generator's value, cloudpickled, in ``value``) | "error"
    value: Any = None
    event: dict[str, str] = field(default_factory=dict)  #: {"log": line} while deploying, {"line": line} for logs
    error_type: str | None = None
    message: str = ""

    @classmethod
    def error(cls, exc: WarmbootError) -> Reply:
        return cls(kind="error", error_type=type(exc).__name__, message=str(exc))


# ----- encoding ----------------------------------------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()


def frame(document: Any) -> bytes:
    """``document`` (dataclasses, dicts, lists, scalars, bytes) as one length-prefixed frame."""
    body = _encoder.encode(document)
    if len(body) > MAX_FRAME:
        raise InvalidOptionError(
            f"the message is {len(body) / 2**20:.0f} MiB, more than the {MAX_FRAME >> 20} MiB a call may carry; "
            "pass large data through a Volume instead"
        )
    return _LENGTH.pack(len(body)) + body


def request_frame(op: str, body: Any) -> bytes:
    return frame({"op": op, "body": body})


def frame_length(header: bytes) -> int:
    """The body length announced by a 4-byte header; :class:`InvalidOptionError` past :data:`MAX_FRAME`."""
    (length,) = _LENGTH.unpack(header)
    if length > MAX_FRAME:
        raise InvalidOptionError(f"a frame of {length} bytes exceeds the limit of {MAX_FRAME}")
    return length


HEADER_SIZE = _LENGTH.size


def decode_request(body: bytes) -> tuple[str, Any]:
    """``(op, request)`` from a frame's body, checked against the request's dataclass.

    Raises :class:`InvalidOptionError` naming the unknown operation or the field that is missing or mistyped.
    """
    try:
        document = msgspec.msgpack.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidOptionError(f"the request is not valid msgpack: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("op"), str):
        raise InvalidOptionError("a request is a map with an 'op' naming the operation")
    op = document["op"]
    kind = REQUESTS.get(op)
    if kind is None:
        raise InvalidOptionError(f"unknown server operation {op!r}; known: {', '.join(REQUESTS)}")
    try:
        return op, msgspec.convert(document.get("body") or {}, kind)
    except msgspec.ValidationError as exc:
        raise InvalidOptionError(f"request {op!r} is malformed: {exc}") from None


def decode_reply(body: bytes) -> Reply:
    try:
        return msgspec.msgpack.decode(body, type=Reply)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidOptionError(f"the server's reply is malformed: {exc}") from None


def to_outcome(value: Any) -> Outcome:
    """An :class:`Outcome` from a reply's value (a decoded map)."""
    return msgspec.convert(value, Outcome)


def wait_seconds(what: str, timeout: Any) -> float | None:
    """A wait's ``timeout=``: ``None`` (no limit) or a finite number of seconds >= 0."""
    if timeout is None or timeout == math.inf:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 <= timeout < math.inf:
        raise InvalidOptionError(f"{what}(timeout=): a number of seconds >= 0, or None; got {timeout!r}")
    return float(timeout)


def as_dict(message: Any) -> dict[str, Any]:
    """A dataclass message as a plain dict (for logging and for the CLI's tables)."""
    return dataclasses.asdict(message)
