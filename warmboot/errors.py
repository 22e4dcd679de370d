"""The one error hierarchy of warmboot.

Every error a user can meet derives from :class:`WarmbootError` and says what went wrong and what to do.
"""

from __future__ import annotations


class WarmbootError(Exception):
    """Base class of every warmboot error."""


class HostSetupError(WarmbootError):
    """The host lacks something warmboot needs (CRIU, root, a kernel feature)."""


class ContainerError(WarmbootError):
    """A container could not be started, or died in a way the caller must hear about."""


class SnapshotError(WarmbootError):
    """A checkpoint or restore failed.

    Carries the snapshot id (when there is one) and CRIU's own error lines from its log, so that the
    message says exactly what CRIU refused.
    """

    def __init__(self, message: str, *, snapshot_id: str | None = None, criu_errors: list[str] | None = None):
        self.snapshot_id = snapshot_id
        self.criu_errors = list(criu_errors or [])
        text = message if snapshot_id is None else f"snapshot {snapshot_id}: {message}"
        if self.criu_errors:
            text += "\nCRIU said:\n" + "\n".join(f"  {line}" for line in self.criu_errors)
        super().__init__(text)


class CheckpointError(SnapshotError):
    """CRIU could not dump the container; no snapshot was published."""


class RestoreError(SnapshotError):
    """CRIU could not restore the snapshot."""


class SnapshotFileChangedError(RestoreError):
    """A file the snapshot holds open or mapped was changed or deleted since the snapshot was made."""


class SnapshotIncompatibleError(RestoreError):
    """The snapshot was made on another host fingerprint (CPU model/flags, kernel or CRIU); refused before CRIU runs."""


class SnapshotCorruptError(RestoreError):
    """The snapshot's images do not match their recorded checksums (or its manifest is unreadable); refused."""


class GpuSnapshotError(SnapshotError):
    """A CUDA process could not be locked, checkpointed, restored or unlocked for a GPU memory snapshot."""


class SnapshotNotFoundError(SnapshotError):
    """No published snapshot has that id."""


class InvalidOptionError(WarmbootError, TypeError):
    """A decorator or SDK call got an option that does not exist or a value it cannot take."""


class UnsupportedOptionError(WarmbootError):
    """An option this machine cannot honour (``gpu=`` with no GPU present), named at deploy or call time."""


class AppFileError(WarmbootError):
    """The app file could not be loaded (missing, syntax error, exception at import, no App in it)."""


class ServerError(WarmbootError):
    """The local server could not be reached or started, or answered with an error."""


class NotFoundError(WarmbootError):
    """An app, function, class, volume or secret of that name does not exist."""


class ImageBuildError(WarmbootError):
    """A step of an image build failed; the message holds the tail of its output."""


class RemoteError(WarmbootError):
    """User code raised in the container, and its exception could not be re-created here."""


class WarmbootTimeoutError(WarmbootError, TimeoutError):
    """Base class of warmboot's timeouts (``modal.exception.TimeoutError``); also the built-in ``TimeoutError``."""


class FunctionTimeoutError(WarmbootTimeoutError):
    """A call ran longer than its function's ``timeout``; the container was stopped."""


class OutputTimeoutError(WarmbootTimeoutError):
    """``FunctionCall.get(timeout=)`` waited that long and the call has not finished (it goes on running)."""


class InputCancelledError(WarmbootError):
    """The call was cancelled with ``FunctionCall.cancel()`` (``modal.exception.InputCancellation``)."""


class SerializationError(InvalidOptionError):
    """A call's arguments cannot be pickled (cloudpickle) to travel to its container."""


class DeserializationError(WarmbootError):
    """A call's result (or its exception) cannot be unpickled here: a module it needs is missing locally."""


class ContainerCrashedError(ContainerError):
    """The container running a call died before returning a result."""


class GpuAllocationCancelledError(ContainerError):
    """A container's start was cancelled (its pool stopped) while it waited for free GPUs."""


class ContainerBootError(ContainerError):
    """User code failed while the container started (import of the app file, or an ``@enter`` hook)."""

    def __init__(self, message: str, traceback_text: str = ""):
        super().__init__(message + ("\n" + traceback_text.rstrip() if traceback_text else ""))
        self.traceback_text = traceback_text


class ServerRestartedError(WarmbootError):
    """The server stopped or crashed while a call ran; the call did not finish (its function may have run in part)."""


class ProtocolViolationError(ContainerCrashedError):
    """A container wrote something malformed or out of turn on its control channel; it was stopped."""


class AgentLostError(ContainerCrashedError):
    """The agent running a container stopped answering (its machine died, or the network to it): the call is
    retried on another agent if it has retries left, else it fails with this, naming the agent."""


class UnauthorizedError(WarmbootError):
    """A request to the control plane's agent API, or to an agent, without the right token."""


class PeerUnreachableError(ServerError):
    """The control plane or an agent did not answer: it is down, or the network to it is."""
