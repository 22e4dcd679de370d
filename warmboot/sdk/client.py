"""The SDK's connection to the local server: a root-only Unix socket, started on first use.

Requests and replies are the typed messages of :mod:`warmboot.protocol` (msgpack frames, never pickle); user
objects inside them travel as cloudpickle bytes that only this process and the container unpickle. Only root
can open the socket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from warmboot import config, errors

if os.environ.get("WARMBOOT_IN_CONTAINER"):
    # A container has no way to the control plane but its own control pipes (docs/security.md), and its
    # runtime library holds no client: say so where a function first reaches for one (.remote() and friends).
    raise errors.UnsupportedOptionError(
        "calling warmboot functions (.remote, .map, .spawn, lookups) from inside a function's container is "
        "not supported yet: containers cannot reach the server. Call them from your local code, or do the "
        "work in this function"
    )

from warmboot import protocol  # after the check above: containers do not have msgspec

_START_TIMEOUT = 30.0


def connect_existing() -> socket.socket:
    """A connection to a running server; ``FileNotFoundError``/``ConnectionRefusedError`` when none runs."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(config.server_socket()))
    except BaseException:
        sock.close()
        raise
    return sock


_connect_once = connect_existing


def ensure_server() -> None:
    """Start the local server in the background unless one answers already."""
    try:
        _connect_once().close()
        return
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    log_path = config.home() / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        subprocess.Popen(
            [sys.executable, "-m", "warmboot.server", "--background"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            _connect_once().close()
            return
        except (FileNotFoundError, ConnectionRefusedError):
            time.sleep(0.05)
    raise errors.ServerError(f"the warmboot server did not start within {_START_TIMEOUT:.0f} s; see {log_path}")


def connect() -> socket.socket:
    """A connection to the server, starting it first if needed."""
    try:
        return _connect_once()
    except (FileNotFoundError, ConnectionRefusedError):
        ensure_server()
        return _connect_once()


def _raise_from(reply: protocol.Reply) -> None:
    cls = getattr(errors, reply.error_type or "", None)
    if not (isinstance(cls, type) and issubclass(cls, errors.WarmbootError)):
        cls = errors.ServerError
    message = reply.message
    op = message.split("'")[1] if message.startswith("unknown server operation '") else None
    if op in protocol.REQUESTS:
        # This SDK knows the operation, so the server is older: one started before warmboot was upgraded.
        message += (
            "\nThe running server is from an older warmboot than this client: stop it (`warmboot server stop`) "
            "and the next command starts the new one"
        )
    raise cls(message)


def _recv_exact(sock: socket.socket, n: int, op: str) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise errors.ServerError(f"the server closed the connection during {op!r}; see its log (server.log)")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _recv_reply(sock: socket.socket, op: str) -> protocol.Reply:
    length = protocol.frame_length(_recv_exact(sock, protocol.HEADER_SIZE, op))
    return protocol.decode_reply(_recv_exact(sock, length, op))


def _op_and_body(message: Any, payload: dict[str, Any]) -> tuple[str, Any]:
    """A typed request (a :mod:`warmboot.protocol` dataclass), or an operation name and its fields."""
    if isinstance(message, str):
        return message, payload  # the server checks the fields against the operation's dataclass
    for op, kind in protocol.REQUESTS.items():
        if type(message) is kind:
            return op, message
    raise TypeError(f"not a request message: {message!r}")


def request(message: Any, **payload: Any) -> Any:
    """One request, one reply: the reply's value, or the server's error re-raised as its warmboot class."""
    return _request(connect, message, payload)


def request_existing(message: Any, **payload: Any) -> Any:
    """Like :func:`request`, without starting a server: ``FileNotFoundError``/``ConnectionRefusedError``
    when none runs."""
    return _request(connect_existing, message, payload)


def _request(connector: Any, message: Any, payload: dict[str, Any]) -> Any:
    op, body = _op_and_body(message, payload)
    with connector() as sock:
        sock.sendall(protocol.request_frame(op, body))
        reply = _recv_reply(sock, op)
    if reply.kind == "error":
        _raise_from(reply)
    return reply.value


def stream(message: Any, **payload: Any) -> Iterator[dict[str, Any]]:
    """A request whose reply is a stream of events (``{"log": ...}``, ``{"line": ...}``), then
    ``{"done": True, "value": ...}``; a server error is raised as its warmboot class."""
    op, body = _op_and_body(message, payload)
    with connect() as sock:
        sock.sendall(protocol.request_frame(op, body))
        while True:
            reply = _recv_reply(sock, op)
            if reply.kind == "error":
                _raise_from(reply)
            if reply.kind == "value":
                yield {"done": True, "value": reply.value}
                return
            yield dict(reply.event)


# ----- calls -------------------------------------------------------------------------------------------


def _pickle_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    import cloudpickle

    try:
        return cloudpickle.dumps((args, kwargs))
    except Exception as exc:
        named = [(str(i), v) for i, v in enumerate(args)] + [(repr(k), v) for k, v in kwargs.items()]
        for name, value in named:
            try:
                cloudpickle.dumps(value)
            except Exception:  # noqa: BLE001
                raise errors.SerializationError(
                    f"argument {name} ({type(value).__name__}) cannot be pickled: {exc}"
                ) from exc
        raise errors.SerializationError(f"the arguments cannot be pickled: {exc}") from exc


def unpack_outcome(outcome: protocol.Outcome) -> Any:
    """A call's result, or its remote exception re-raised here with the remote traceback attached."""
    import cloudpickle

    if outcome.ok:
        try:
            return cloudpickle.loads(outcome.value or b"")
        except Exception as exc:
            raise errors.DeserializationError(
                f"the call's result cannot be unpickled here: {type(exc).__name__}: {exc}; install locally what "
                "the result's type needs (the module it comes from), or return plain data"
            ) from exc
    remote_tb = outcome.traceback
    exc: BaseException | None = None
    if outcome.exception is not None:
        try:
            exc = cloudpickle.loads(outcome.exception)
        except Exception:  # noqa: BLE001 - the class may not exist here; fall back to RemoteError below
            exc = None
    if exc is None:
        cls = getattr(errors, outcome.error_type or "", None)
        if isinstance(cls, type) and issubclass(cls, errors.WarmbootError):
            exc = cls(outcome.message or "remote error")
        else:
            exc = errors.RemoteError((outcome.message or "remote error") + ("\n" + remote_tb if remote_tb else ""))
            remote_tb = ""
    if remote_tb and hasattr(exc, "add_note"):
        exc.add_note("Remote traceback (from the container):\n" + remote_tb.rstrip())
    raise exc


def _target(target: dict[str, Any]) -> protocol.Target:
    return protocol.Target(**target)


def call(target: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    reply = request(protocol.Call(target=_target(target), args=_pickle_args(args, kwargs)))
    return unpack_outcome(protocol.to_outcome(reply))


def call_gen(target: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[Any]:
    """A generator call (``.remote_gen``): each value the function yields, as it yields it; then its error, if any."""
    import cloudpickle

    request_ = protocol.CallGen(target=_target(target), args=_pickle_args(args, kwargs))
    with connect() as sock:
        sock.sendall(protocol.request_frame("call_gen", request_))
        while True:
            reply = _recv_reply(sock, "call_gen")
            if reply.kind == "error":
                _raise_from(reply)
            if reply.kind == "item":
                yield cloudpickle.loads(reply.value)
                continue
            unpack_outcome(protocol.to_outcome(reply.value))  # raises the call's error, if it failed
            return


def submit(target: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return request(protocol.Submit(target=_target(target), args=_pickle_args(args, kwargs)))


def get_result(call_id: str, timeout: float | None) -> Any:
    reply = request(protocol.Get(call_id=call_id, timeout=protocol.wait_seconds("FunctionCall.get", timeout)))
    if reply is None:
        raise errors.OutputTimeoutError(
            f"call {call_id} has not finished within {timeout} s (it goes on running; .get() again to wait more)"
        )
    return unpack_outcome(protocol.to_outcome(reply))
