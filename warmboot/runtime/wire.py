"""The framing of messages on a container's control pipes (fd 3 in, fd 4 out), shared by both ends.

A frame is a 4-byte big-endian length and a pickled dict. Payloads that hold user objects (arguments,
results, exceptions) travel as cloudpickle bytes inside the dict, so the framing itself needs only pickle.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO

_HEADER = struct.Struct(">I")

# Message types: runtime -> worker
SNAPSHOT_POINT = "snapshot_point"  # imported, @enter(snap=True) done, no input taken yet: safe to checkpoint
READY = "ready"  # @enter(snap=False) done, waiting for inputs
RESULT = "result"  # the outcome of one call
INIT_ERROR = "init_error"  # import or an @enter hook failed; the runtime exits after sending it
# worker -> runtime
START = "start"  # continue after the snapshot point, with this container's identity and environment
CALL = "call"
SHUTDOWN = "shutdown"


class ChannelClosed(EOFError):
    """The other end closed the pipe (the container or the worker is gone)."""


def send(stream: BinaryIO, message: dict[str, Any]) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(body)) + body)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            raise ChannelClosed("channel closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(stream: BinaryIO) -> dict[str, Any]:
    (length,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return pickle.loads(_read_exact(stream, length))
