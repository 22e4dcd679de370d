"""Modal's exception names (``modal.exception``), mapped onto warmboot's one error hierarchy.

Each name is the :mod:`warmboot.errors` class that warmboot raises in that situation (an alias), so that
``except modal.exception.NotFoundError:`` in a Modal app catches what warmboot raises. Names for situations
warmboot never meets (authentication, client versions, sandboxes) are subclasses of :class:`Error` that nothing
raises: an ``except`` clause naming them still works.

=========================  =====================================================================
``modal.exception`` name   warmboot class
=========================  =====================================================================
``Error``                  :class:`~warmboot.errors.WarmbootError` (every warmboot error)
``NotFoundError``          :class:`~warmboot.errors.NotFoundError`
``InvalidError``           :class:`~warmboot.errors.InvalidOptionError`
``RequestSizeError``       :class:`~warmboot.errors.InvalidOptionError` (a message over the frame limit)
``RemoteError``            :class:`~warmboot.errors.RemoteError` (a remote exception that cannot be re-created)
``ExecutionError``         :class:`~warmboot.errors.ContainerError` (a container crashed or failed to boot)
``TimeoutError``           :class:`~warmboot.errors.WarmbootTimeoutError` (also the built-in ``TimeoutError``)
``FunctionTimeoutError``   :class:`~warmboot.errors.FunctionTimeoutError`
``OutputExpiredError``     :class:`~warmboot.errors.NotFoundError` (a result past ``WARMBOOT_RESULT_TTL``)
``InputCancellation``      :class:`~warmboot.errors.InputCancelledError` (``FunctionCall.cancel()``)
``ConnectionError``        :class:`~warmboot.errors.ServerError` (the local server cannot be reached)
``InternalFailure``        :class:`~warmboot.errors.ServerRestartedError` (the server restarted mid-call)
``SerializationError``     :class:`~warmboot.errors.SerializationError`
``DeserializationError``   :class:`~warmboot.errors.DeserializationError`
=========================  =====================================================================

Unlike Modal's, ``InputCancellation`` is an ``Exception`` (not a ``BaseException``): here it is only raised to
a caller (by ``FunctionCall.get()`` of a cancelled call), never inside a running function.
"""

from __future__ import annotations

from warmboot.errors import (
    ContainerError,
    DeserializationError,
    FunctionTimeoutError,
    InputCancelledError,
    InvalidOptionError,
    NotFoundError,
    RemoteError,
    SerializationError,
    ServerError,
    ServerRestartedError,
    WarmbootError,
    WarmbootTimeoutError,
)

Error = WarmbootError
InvalidError = InvalidOptionError
RequestSizeError = InvalidOptionError
ExecutionError = ContainerError
TimeoutError = WarmbootTimeoutError  # shadows the built-in here on purpose: Modal's name
OutputExpiredError = NotFoundError
InputCancellation = InputCancelledError
ConnectionError = ServerError  # likewise
InternalFailure = ServerRestartedError


class AuthError(Error):
    """Not raised by warmboot (no accounts: only root reaches the server's socket); here for ``except`` clauses."""


class VersionError(Error):
    """Not raised by warmboot (the client and the server are one package); here for ``except`` clauses."""


class SandboxTimeoutError(WarmbootTimeoutError):
    """Not raised by warmboot (no sandboxes yet); here for ``except`` clauses."""


class SandboxTerminatedError(Error):
    """Not raised by warmboot (no sandboxes yet); here for ``except`` clauses."""


class DeprecationError(UserWarning):
    """The warning category Modal uses for deprecated features; warmboot emits none."""


class PendingDeprecationError(UserWarning):
    """The warning category Modal uses for features soon deprecated; warmboot emits none."""


__all__ = [
    "AuthError",
    "ConnectionError",
    "DeprecationError",
    "DeserializationError",
    "Error",
    "ExecutionError",
    "FunctionTimeoutError",
    "InputCancellation",
    "InternalFailure",
    "InvalidError",
    "NotFoundError",
    "OutputExpiredError",
    "PendingDeprecationError",
    "RemoteError",
    "RequestSizeError",
    "SandboxTerminatedError",
    "SandboxTimeoutError",
    "SerializationError",
    "TimeoutError",
    "VersionError",
]
