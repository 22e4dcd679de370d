"""The SDK's connection to the local server: a root-only Unix socket, started on first use.

Requests and replies are pickled dicts over ``multiprocessing.connection`` (stdlib, framed, well kept); user
objects inside them travel as cloudpickle bytes. Only root can open the socket, and root trusts itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Client, Connection
from typing import Any

from warmboot import config, errors

_START_TIMEOUT = 30.0


def connect_existing() -> Connection:
    """A connection to a running server; ``FileNotFoundError``/``ConnectionRefusedError`` when none runs."""
    return Client(str(config.server_socket()), family="AF_UNIX")


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


def connect() -> Connection:
    """A connection to the server, starting it first if needed."""
    if os.environ.get("WARMBOOT_IN_CONTAINER"):
        # A container has no way to the control plane but its own control pipes (docs/security.md): starting a
        # server here would only answer with a confusing "app not running".
        raise errors.UnsupportedOptionError(
            "calling warmboot functions (.remote, .map, .spawn, lookups) from inside a function's container is "
            "not supported yet: containers cannot reach the server. Call them from your local code, or do the "
            "work in this function"
        )
    try:
        return _connect_once()
    except (FileNotFoundError, ConnectionRefusedError):
        ensure_server()
        return _connect_once()


def _raise_from(reply: dict[str, Any]) -> None:
    cls = getattr(errors, reply.get("error_type", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.WarmbootError)):
        cls = errors.ServerError
    raise cls(reply["message"])


def request(op: str, **payload: Any) -> Any:
    """One request, one reply: the reply's ``value``, or the server's error re-raised as its warmboot class."""
    with connect() as conn:
        conn.send({"op": op, **payload})
        try:
            reply = conn.recv()
        except EOFError as exc:
            raise errors.ServerError(f"the server closed the connection during {op!r}; see its log") from exc
    if not reply.get("ok"):
        _raise_from(reply)
    return reply.get("value")


def stream(op: str, **payload: Any) -> Iterator[dict[str, Any]]:
    """A request whose reply is a stream of events, ending with ``{"done": True, ...}`` (or an error)."""
    with connect() as conn:
        conn.send({"op": op, **payload})
        while True:
            try:
                event = conn.recv()
            except EOFError as exc:
                raise errors.ServerError(f"the server closed the connection during {op!r}; see its log") from exc
            if event.get("ok") is False:
                _raise_from(event)
            yield event
            if event.get("done"):
                return


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
                raise errors.InvalidOptionError(
                    f"argument {name} ({type(value).__name__}) cannot be pickled: {exc}"
                ) from exc
        raise errors.InvalidOptionError(f"the arguments cannot be pickled: {exc}") from exc


def unpack_outcome(outcome: dict[str, Any]) -> Any:
    """A call's result, or its remote exception re-raised here with the remote traceback attached."""
    import cloudpickle

    if outcome["ok"]:
        return cloudpickle.loads(outcome["value"])
    remote_tb = outcome.get("traceback") or ""
    exc: BaseException | None = None
    if outcome.get("exception") is not None:
        try:
            exc = cloudpickle.loads(outcome["exception"])
        except Exception:  # noqa: BLE001 - the class may not exist here; fall back to RemoteError below
            exc = None
    if exc is None:
        cls = getattr(errors, outcome.get("error_type") or "", None)
        if isinstance(cls, type) and issubclass(cls, errors.WarmbootError):
            exc = cls(outcome.get("message", "remote error"))
        else:
            exc = errors.RemoteError(outcome.get("message", "remote error") + ("\n" + remote_tb if remote_tb else ""))
            remote_tb = ""
    if remote_tb and hasattr(exc, "add_note"):
        exc.add_note("Remote traceback (from the container):\n" + remote_tb.rstrip())
    raise exc


def call(target: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return unpack_outcome(request("call", target=target, args=_pickle_args(args, kwargs)))


def submit(target: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return request("submit", target=target, args=_pickle_args(args, kwargs))


def get_result(call_id: str, timeout: float | None) -> Any:
    outcome = request("get", call_id=call_id, timeout=timeout)
    if outcome is None:
        raise TimeoutError(f"call {call_id} has not finished within {timeout} s")
    return unpack_outcome(outcome)
