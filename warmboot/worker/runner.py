"""Function containers: boot the in-container runtime, drive its phases, and run calls on it.

The control plane decides *when* to start, reuse or stop containers; this module knows *how*: the launch
(or, with issue 4, the restore), the handshake at the snapshot point, calls with timeouts, and shutdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import queue
import signal
import socket
import struct
import termios
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from warmboot.errors import (
    ContainerBootError,
    ContainerCrashedError,
    ContainerError,
    FunctionTimeoutError,
    GpuSnapshotError,
    ProtocolViolationError,
    WarmbootError,
)
from warmboot.protocol import Outcome
from warmboot.runtime import wire
from warmboot.worker import cgroups, cuda_checkpoint, netinfo, runtime_lib
from warmboot.worker import container as containers
from warmboot.worker import gpus as gpu_devices
from warmboot.worker.sandbox import netns, network
from warmboot.worker.snapshot import Snapshot, SnapshotStore

MessageT = TypeVar("MessageT")  #: the message type a container is expected to send next

log = logging.getLogger("warmboot.worker")

OutputSink = Callable[[str, str, str], None]

#: Defaults every container starts with; the image's and the function's env override them.
CONTAINER_DEFAULT_ENV = {
    # Containers share the machine's cores. OpenMP's default spin-waiting (torch, numpy's BLAS) then burns
    # the cores other containers need: measured here, a MiniLM embedding took 0.49 s instead of 0.02 s with
    # another process busy on the second core. Passive waiting costs nothing measurable when idle.
    "OMP_WAIT_POLICY": "PASSIVE",
}  # (container id, "stdout" | "stderr", line)


@dataclass
class LaunchPlan:
    """Everything needed to start one function's container, resolved once at deploy (nothing is built here)."""

    python: str  #: the image's interpreter, inside the container
    app_file: str  #: the app file, as a path inside the container
    tag: str  #: the function or class to serve
    env: Mapping[str, str]
    layers: Sequence[Path]  #: the root filesystem's layers, bottom first (image, local files, code, runtime)
    containers_dir: Path  #: where containers' run directories go (their writable layers)
    workdir: str = "/root"
    mounts: Sequence[containers.BindMount] = ()  #: volumes
    limits: cgroups.Limits = field(default_factory=cgroups.Limits)
    network: bool = True  #: outbound network after the snapshot point (False: ``block_network=True``)
    boot_timeout: float = 600.0
    label: str = ""  #: "app.function", for logs
    gpus: gpu_devices.GpuInventory | None = None  #: the GPUs a gpu= function gets
    #: CPU memory snapshot of a GPU function: no GPU before the snapshot point, its GPUs after.
    gpus_after_snapshot: bool = False


class _Unclosed(io.RawIOBase):
    """A raw view of a pipe that a buffered reader may wrap without closing it (its owner closes it)."""

    def __init__(self, raw: Any):
        self._raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._raw.readinto(buffer)


class _Deliver:
    """An inbox that hands each message on at once (to an event loop) instead of queueing it for a thread."""

    def __init__(self, deliver: Callable[[Any], None]):
        self.put = deliver


#: The largest request frame the gateway's fast path writes from its event loop (larger ones take a slot thread).
_FAST_FRAME_MAX = 16 << 10

#: Marks the gateway's events in a web request's inbox (``FunctionContainer.web_call``).
CLIENT = object()


def _outcome(reply: wire.Result) -> Outcome:
    return Outcome(
        ok=reply.ok,
        value=reply.value,
        exception=reply.exception,
        error_type=reply.error_type,
        message=reply.message,
        traceback=reply.traceback,
    )


class FunctionContainer:
    """One running container serving one function or class; not thread-safe (one call at a time)."""

    def __init__(self, plan: LaunchPlan, on_output: OutputSink):
        self.id = "wc-" + uuid.uuid4().hex[:12]
        self.plan = plan
        self.on_output = on_output
        self.container: containers.Container | None = None
        self.started_at = time.time()
        self.calls_served = 0
        self.restored_from: str | None = None
        self.made_snapshot = False  #: this cold boot made its function's snapshot (set by the launcher)
        self.timings: dict[str, float] = {}  #: milliseconds per phase of this container's start
        self._groups: cgroups.Groups | None = None
        self._network: network.Network | None = None
        self._pumps: list[threading.Thread] = []
        self._finished: list[Callable[[], None]] = []
        self._inboxes: dict[str, queue.SimpleQueue[wire.Message | WarmbootError]] = {}  #: call id -> its replies
        self._web_senders: dict[str, Callable[[wire.WebSend], None]] = {}  #: web request id -> where its frames go
        self._inbox_lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._kill_lock = threading.Lock()  # frames of concurrent inputs must not interleave on the pipe
        self._broken: WarmbootError | None = None  #: why the channel is no longer trusted
        self.start_row: int | None = None  #: its start's row in the server's start log (``server.start_log``)

    def __repr__(self) -> str:
        return f"<FunctionContainer {self.id} {self.plan.label}>"

    @property
    def run_dir(self) -> Path:
        return self.plan.containers_dir / self.id

    # ----- lifecycle ---------------------------------------------------------------------------------

    def boot(self, *, snapshot_phase: bool = False) -> None:
        """Start the container cold and run it up to its snapshot point (imports, ``@enter(snap=True)``).

        ``snapshot_phase``: the function makes memory snapshots, so it initialises with loopback only (nothing
        it opens then can end up in a snapshot) and gets its network at :meth:`start`. Otherwise the network,
        if the plan has one, is there from the beginning, as users of functions without snapshots expect.
        """
        env = {
            **CONTAINER_DEFAULT_ENV,
            **self.plan.env,
            "WARMBOOT_APP_FILE": self.plan.app_file,
            "WARMBOOT_TAG": self.plan.tag,
            "WARMBOOT_IN_CONTAINER": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": ":".join(p for p in (runtime_lib.LIB_DIR, self.plan.env.get("PYTHONPATH", "")) if p),
        }
        gpus = self.plan.gpus
        if gpus is not None:
            env.update(gpu_devices.HIDDEN_ENV if self.plan.gpus_after_snapshot else gpus.visible_env())
        self._groups = cgroups.create(self.id, self.plan.limits)
        spec = containers.ContainerSpec(
            argv=[self.plan.python, "-m", "warmboot.runtime"],
            layers=self.plan.layers,
            run_dir=self.run_dir,
            env=env,
            cwd=self.plan.workdir,
            mounts=self.plan.mounts,
            cgroups=self._groups.paths,
            devices=gpus.nodes() if gpus is not None and not self.plan.gpus_after_snapshot else (),
        )
        self.container = containers.start(spec)
        self._start_pumps()
        if self.plan.network and not snapshot_phase:
            self._network = network.Network(self.container.pid)
        self._expect(wire.SnapshotPoint, self.plan.boot_timeout, "booting")

    def restore(self, store: SnapshotStore, snapshot: Snapshot) -> None:
        """Restore a copy of ``snapshot`` (taken at the snapshot point) instead of booting; then call :meth:`start`."""
        creating = time.monotonic()
        self._groups = cgroups.create(self.id, self.plan.limits)
        self.timings["cgroup_ms"] = (time.monotonic() - creating) * 1000
        # Born in its groups: its memory is charged there (a later move would leave it charged to the server).
        self.container = store.restore(
            snapshot, self.run_dir, cgroups=self._groups.paths, layers=self.plan.layers, mounts=self.plan.mounts
        )
        self.restored_from = snapshot.id
        self.timings.update(self.container.timings)
        if snapshot.manifest.get("metadata", {}).get("gpu_snapshot"):
            # A GPU memory snapshot: put the copy's device memory back on the GPU (GpuSnapshotError if not).
            resumed = time.monotonic()
            cuda_checkpoint.resume(self.container.pids())
            self.timings["cuda_restore_ms"] = (time.monotonic() - resumed) * 1000
        self._start_pumps()

    @property
    def gpu_snapshot(self) -> bool:
        """Whether a snapshot of this container holds its GPU state (experimental ``enable_gpu_snapshot``)."""
        return self.plan.gpus is not None and not self.plan.gpus_after_snapshot

    def checkpoint(self, store: SnapshotStore, **metadata: Any) -> Snapshot:
        """Snapshot this container at its snapshot point; it goes on running afterwards.

        For a GPU memory snapshot its CUDA processes are locked and checkpointed around CRIU's dump, then
        restored; a failure there raises :class:`GpuSnapshotError` (the snapshot is not kept).
        """
        assert self.container is not None
        if not self.gpu_snapshot:
            return store.checkpoint(self.container, leave_running=True, metadata=metadata)
        suspended = cuda_checkpoint.suspend(self.container.pids())
        try:
            snap = store.checkpoint(self.container, leave_running=True, metadata={**metadata, "gpu_snapshot": True})
        except BaseException:
            self._resume_cuda(suspended)
            raise
        try:
            self._resume_cuda(suspended)
        except GpuSnapshotError:
            with contextlib.suppress(WarmbootError, OSError):
                store.delete(snap.id)  # not recorded anywhere once this raises
            raise
        return snap

    def _resume_cuda(self, suspended: list[int]) -> None:
        """Give the original its GPU state back after the dump; kill it if that fails (it cannot serve)."""
        if not suspended:
            return
        try:
            cuda_checkpoint.resume(suspended)
        except GpuSnapshotError:
            self.kill()  # start() then reports the container dead
            raise

    def open_connections(self) -> list[str]:
        """Network connections (not listening sockets) held by the container's processes, as "proto peer"."""
        assert self.container is not None
        return netinfo.open_connections(self.container.pids())

    def start(self, env: Mapping[str, str], *, reseed: bool = False) -> None:
        """Continue past the snapshot point with this container's environment; run ``@enter(snap=False)``.

        ``reseed``: reseed the random generators (a restored copy must not repeat its siblings' draws).
        """
        started = time.monotonic()
        env = dict(env)
        assert self.container is not None
        if self.plan.network and self._network is None:
            self._network = network.Network(self.container.pid)
        if self.plan.gpus is not None and self.plan.gpus_after_snapshot:
            gpu_devices.add_to_container(self.container.pid, self.plan.gpus.nodes())
            env.update(self.plan.gpus.visible_env())
        gpus_added = self.plan.gpus is not None and self.plan.gpus_after_snapshot
        attached = time.monotonic()
        self._send(wire.Start(container_id=self.id, env=env, reseed=reseed, gpus_added=gpus_added))
        ready = self._expect(wire.Ready, self.plan.boot_timeout, "running @enter hooks")
        self._start_reader()
        done = time.monotonic()
        self.timings["start_ms"] = (done - started) * 1000
        # The parts of start_ms: outbound network and GPUs attached; the runtime resumed (environment, reseed);
        # @enter(snap=False) (and a web endpoint's startup), as the container measured it.
        self.timings["network_ms"] = (attached - started) * 1000
        self.timings["enter_ms"] = min(ready.enter_ms, (done - attached) * 1000)
        self.timings["resume_ms"] = (done - attached) * 1000 - self.timings["enter_ms"]

    @property
    def restored(self) -> bool:
        """Whether it was restored from a memory snapshot (else it booted cold)."""
        return self.restored_from is not None

    @property
    def pid(self) -> int | None:
        return self.container.pid if self.container is not None else None

    def healthy(self) -> bool:
        """Whether the container can take an input: running, and silent except for replies to its inputs.

        A container that wrote anything else on its control channel spoke out of turn: its reader stopped it, so
        that its words are never read as another caller's result.
        """
        if self._broken is not None:
            return False
        return self.container is not None and self.container.is_running()

    def call(
        self,
        call_id: str,
        method: str | None,
        args: bytes,
        timeout: float,
        on_item: Callable[[bytes], None] | None = None,
    ) -> Outcome:
        """Run one input and return its outcome; with ``on_item``, a generator call whose yielded values (cloudpickle
        bytes) go to ``on_item`` as they come. Thread-safe: a container with input concurrency runs several at once.

        The timeout is the worker's, whatever the container does: silence, half a message or a flood all end
        the call by then. Raises :class:`FunctionTimeoutError` (the container is killed),
        :class:`ProtocolViolationError` (it wrote something malformed or out of turn; killed) or
        :class:`ContainerCrashedError`.
        """
        inbox: queue.SimpleQueue[wire.Message | WarmbootError] = queue.SimpleQueue()
        with self._inbox_lock:
            if self._broken is not None:
                raise self._broken
            self._inboxes[call_id] = inbox
        try:
            self._send(wire.CallInput(call_id=call_id, args=args, method=method, generator=on_item is not None))
            deadline = time.monotonic() + timeout
            while True:
                reply = self._next_reply(inbox, deadline, timeout, f"call {call_id}")
                answers = isinstance(reply, wire.Result | wire.Item) and reply.call_id == call_id
                if answers and isinstance(reply, wire.Item) and on_item is not None:
                    on_item(reply.value)
                    continue
                if answers and isinstance(reply, wire.Result):
                    break
                other = f" for call {reply.call_id!r}" if isinstance(reply, wire.Result | wire.Item) else ""
                raise self._out_of_turn(f"answered call {call_id} with a {reply.TYPE!r} message{other}")
        finally:
            with self._inbox_lock:
                self._inboxes.pop(call_id, None)
        with self._inbox_lock:
            self.calls_served += 1
        return _outcome(reply)

    def call_batch(self, calls: Sequence[tuple[str, bytes]], method: str | None, timeout: float) -> list[Outcome]:
        """Run calls of a ``@batched`` function as one input; each call's outcome, in order.

        A timeout or a dead container ends every call of the batch (raised); a reply for a call that is not in
        the batch is a protocol violation (raised).
        """
        inboxes: dict[str, queue.SimpleQueue[wire.Message | WarmbootError]] = {}
        with self._inbox_lock:
            if self._broken is not None:
                raise self._broken
            for call_id, _ in calls:
                inboxes[call_id] = self._inboxes[call_id] = queue.SimpleQueue()
        outcomes: list[Outcome] = []
        try:
            self._send(
                wire.BatchInput(
                    call_ids=[call_id for call_id, _ in calls],
                    sizes=[len(args) for _, args in calls],
                    args=b"".join(args for _, args in calls),
                    method=method,
                )
            )
            deadline = time.monotonic() + timeout
            for call_id, _ in calls:
                reply = self._next_reply(inboxes[call_id], deadline, timeout, f"batch of {len(calls)} calls")
                if not isinstance(reply, wire.Result) or reply.call_id != call_id:
                    raise self._out_of_turn(f"answered call {call_id} of a batch with a {reply.TYPE!r} message")
                outcomes.append(_outcome(reply))
        finally:
            with self._inbox_lock:
                for call_id in inboxes:
                    self._inboxes.pop(call_id, None)
        with self._inbox_lock:
            self.calls_served += len(calls)
        return outcomes

    def _out_of_turn(self, what: str) -> ProtocolViolationError:
        """Stop the container for a reply out of turn (``what`` it did); the error for its caller."""
        violation = ProtocolViolationError(f"container {self.id} of {self.plan.label} {what}; it was stopped")
        self._break(violation)
        self.kill()
        return violation

    def _next_reply(self, inbox: queue.SimpleQueue[Any], deadline: float, timeout: float, what: str) -> Any:
        """The next message for an input, by its deadline. Past the deadline the container is killed and
        :class:`FunctionTimeoutError` raised; an error that broke the channel is raised once the kill is complete
        (output drained), so that the caller hears why only after it stopped."""
        try:
            reply = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            self.kill()
            raise FunctionTimeoutError(
                f"{self.plan.label} {what} exceeded its timeout of {timeout:g} s; the container was stopped"
            ) from None
        if isinstance(reply, WarmbootError):
            self.kill()
            raise reply
        return reply

    def web_call(
        self,
        request: wire.WebRequest,
        inbox: queue.SimpleQueue[Any],
        on_send: Callable[[wire.WebSend], None],
        timeout: float,
    ) -> Outcome:
        """Serve one web request (an ASGI connection) in the container.

        ``inbox`` is this request's: the client's later events arrive there as ``(CLIENT, wire.WebReceive)`` from
        the gateway (a tuple, so nothing the container writes can pass for them) and go to the container; the
        container's ``WebSend`` frames go to ``on_send``; its ``Result`` ends the request. Raises like :meth:`call`.
        """
        call_id = request.call_id
        with self._inbox_lock:
            if self._broken is not None:
                raise self._broken
            self._inboxes[call_id] = inbox
            # The reader hands this request's WebSend frames straight to on_send: one thread hop less per frame
            # than through the inbox (what a gateway round trip costs is mostly such hops).
            self._web_senders[call_id] = on_send
        try:
            self._send(request)
            deadline = time.monotonic() + timeout
            while True:
                reply = self._next_reply(inbox, deadline, timeout, f"web request {call_id}")
                if isinstance(reply, tuple) and reply[0] is CLIENT:
                    self._send(reply[1])
                    continue
                if isinstance(reply, wire.WebSend) and reply.call_id == call_id:
                    on_send(reply)
                    continue
                if isinstance(reply, wire.Result) and reply.call_id == call_id:
                    break
                kind = getattr(reply, "TYPE", type(reply).__name__)
                raise self._out_of_turn(f"answered web request {call_id} with a {kind!r} message")
        finally:
            with self._inbox_lock:
                self._inboxes.pop(call_id, None)
                self._web_senders.pop(call_id, None)
        with self._inbox_lock:
            self.calls_served += 1
        return _outcome(reply)

    def web_begin(
        self, request: wire.WebRequest, deliver: Callable[[Any], None], on_send: Callable[[wire.WebSend], None]
    ) -> bool:
        """Send a web request from an event loop, never blocking it (the gateway's fast path, on a lent slot).

        The frame is written only if no other writer holds the pipe and the pipe has room for all of it; then the
        container's ``WebSend`` frames go to ``on_send`` and its ``Result`` (or the error that broke the
        container) to ``deliver``, until :meth:`web_end`. False: nothing was sent; use :meth:`web_call`.
        """
        assert self.container is not None
        data = wire.encode(wire.as_dict(request))
        if len(data) > _FAST_FRAME_MAX or not self._send_lock.acquire(blocking=False):
            return False
        try:
            pipe = self.container.channels.control_in
            unread = struct.unpack("i", fcntl.ioctl(pipe, termios.FIONREAD, b"\0\0\0\0"))[0]
            if unread + len(data) > fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ):
                return False
            with self._inbox_lock:
                if self._broken is not None:
                    return False
                self._inboxes[request.call_id] = _Deliver(deliver)  # type: ignore[assignment]
                self._web_senders[request.call_id] = on_send
            try:
                os.write(pipe.fileno(), data)  # room was checked: this does not block
            except OSError:
                self.web_end(request.call_id, served=False)
                return False
            return True
        finally:
            self._send_lock.release()

    def send_input(self, message: wire.WebReceive) -> None:
        """A client event for a web request started with :meth:`web_begin` (blocking: from a thread)."""
        with contextlib.suppress(ContainerCrashedError):
            self._send(message)

    def web_end(self, call_id: str, *, served: bool = True) -> None:
        """The end of a request started with :meth:`web_begin`."""
        with self._inbox_lock:
            self._inboxes.pop(call_id, None)
            self._web_senders.pop(call_id, None)
            if served:
                self.calls_served += 1

    def connect(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A connection to ``port`` inside the container (a ``web_server`` function's server)."""
        assert self.container is not None
        return netns.connect(self.container.pid, port, timeout)

    def _start_reader(self) -> None:
        """From READY on, one thread reads the container's replies and hands each to the call it answers."""
        threading.Thread(target=self._read_replies, name=f"{self.id}-replies", daemon=True).start()

    def _read_replies(self) -> None:
        assert self.container is not None
        # From READY on this thread is the pipe's only reader and reads without deadlines, so it can read through
        # a buffer: one read() takes every frame the container wrote at once (a web response is three).
        stream = io.BufferedReader(_Unclosed(self.container.channels.control_out), 1 << 16)  # type: ignore[arg-type]
        while True:
            try:
                message = self._recv(None, kill_on_violation=False, stream=stream)
            except ContainerCrashedError as exc:  # EOF, or a malformed frame (ProtocolViolationError)
                self._break(exc)
                return
            call_id = message.call_id if isinstance(message, wire.Result | wire.Item | wire.WebSend) else None
            with self._inbox_lock:
                sender = self._web_senders.get(call_id) if isinstance(message, wire.WebSend) else None
                inbox = self._inboxes.get(call_id) if call_id is not None else None
                if sender is None and inbox is None and len(self._inboxes) == 1:
                    # One input waits: whatever the container says is its answer, judged (and refused) there.
                    [inbox] = self._inboxes.values()
            if sender is not None:
                sender(message)
                continue
            if inbox is None:
                self._break(
                    ProtocolViolationError(
                        f"container {self.id} of {self.plan.label} sent a {message.TYPE!r} message"
                        + (f" for call {call_id!r}" if call_id is not None else "")
                        + " that no input of it waits for; it was stopped"
                    )
                )
                return
            inbox.put(message)

    def _break(self, exc: WarmbootError) -> None:
        """The channel cannot be trusted any more: stop the container, fail every input waiting on it."""
        with self._inbox_lock:
            first = self._broken is None
            if first:
                self._broken = exc
            inboxes = list(self._inboxes.values())
        if first and isinstance(exc, ProtocolViolationError):
            log.warning("%s", exc)
        if self.container is not None:
            with contextlib.suppress(OSError):
                os.kill(self.container.pid, signal.SIGKILL)  # the full kill (cgroups, pipes) is its owner's job
        for inbox in inboxes:
            inbox.put(self._broken or exc)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the runtime to run ``@exit`` hooks and stop; kill it if it does not within ``timeout``."""
        if self.container is None or not self.container.is_running():
            self.kill()
            return
        with contextlib.suppress(OSError, ContainerCrashedError):
            self._send(wire.Shutdown())
        with contextlib.suppress(TimeoutError):
            self.container.wait(timeout)
        self.kill()

    def on_finished(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when this container has been killed (:meth:`kill`, which ends :meth:`shutdown`)."""
        self._finished.append(callback)

    def kill(self) -> None:
        """Kill the container (if still running), wait for its output to drain, release its cgroup and GPUs.

        What :meth:`on_finished` was given runs here, once, even if releasing the cgroup fails.
        """
        with self._kill_lock:  # the inputs of a concurrent container may all end here at once
            self._kill_locked()

    def _kill_locked(self) -> None:
        try:
            if self.container is not None:
                with contextlib.suppress(OSError, TimeoutError):
                    self.container.kill(drain=self._drain_output)
            if self._network is not None:
                self._network.close()
                self._network = None
            self._drain_output()
            if self._groups is not None:
                self._groups.remove()
                self._groups = None
        finally:
            finished, self._finished = self._finished, []
            for callback in finished:
                callback()

    def _drain_output(self) -> None:
        """Let the pumps read the container's output to its end (its processes are gone: EOF comes soon)."""
        for pump in self._pumps:
            # Its writers are dead, so EOF is certain; what is left is bounded by the pipe's size (1 MiB at most
            # by default), which takes a moment to write out line by line.
            pump.join(timeout=30)

    # ----- plumbing ----------------------------------------------------------------------------------

    def _start_pumps(self) -> None:
        assert self.container is not None
        for stream_name in ("stdout", "stderr"):
            stream = getattr(self.container.channels, stream_name)
            pump = threading.Thread(
                target=self._pump, args=(stream, stream_name), name=f"{self.id}-{stream_name}", daemon=True
            )
            pump.start()
            self._pumps.append(pump)

    def _pump(self, stream: Any, stream_name: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            for raw in iter(stream.readline, b""):
                self.on_output(self.id, stream_name, raw.decode(errors="replace").rstrip("\n"))

    def _send(self, message: wire.Message) -> None:
        assert self.container is not None
        try:
            with self._send_lock:
                wire.send_message(self.container.channels.control_in, message)
        except (BrokenPipeError, ValueError, OSError) as exc:
            raise ContainerCrashedError(self._death_note("before the input could be sent")) from exc

    def _recv(self, timeout: float | None, *, kill_on_violation: bool = True, stream: Any = None) -> wire.Message:
        """The container's next message, its fields checked against its dataclass (what a container writes is
        untrusted: a wrong type is as malformed as a broken frame)."""
        assert self.container is not None
        try:
            message = wire.recv_message(stream or self.container.channels.control_out, timeout)
            return msgspec.convert(
                {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}, type(message)
            )
        except wire.ChannelClosed:
            raise ContainerCrashedError(self._death_note("while running")) from None
        except (wire.ProtocolError, msgspec.ValidationError) as exc:
            if kill_on_violation:
                self.kill()  # what it says next cannot be trusted either
            raise ProtocolViolationError(
                f"container {self.id} of {self.plan.label} wrote a malformed control message ({exc}); it was stopped"
            ) from None

    def _death_note(self, when: str) -> str:
        code = None
        if self.container is not None:
            with contextlib.suppress(TimeoutError):
                code = self.container.wait(timeout=2)
        if code is not None and code < 0:
            how = f"killed by signal {-code}"
        elif code is not None and code > 128:  # the container's init reports a command killed by signal N as 128+N
            how = f"killed by signal {code - 128}"
        else:
            how = f"exit status {code}"
        if self._groups is not None and self._groups.oom_kills():
            how = f"out of memory: the kernel killed it for exceeding memory={self.plan.limits.memory_mib} MiB"
        return f"container {self.id} of {self.plan.label} died {when} ({how})"

    def _expect(self, kind: type[MessageT], timeout: float, doing: str) -> MessageT:
        try:
            message = self._recv(timeout)
        except TimeoutError:
            self.kill()
            raise ContainerError(
                f"{self.plan.label}: container {self.id} did not finish {doing} within {timeout:g} s"
            ) from None
        except ContainerCrashedError:
            # Not ContainerBootError: a restored copy dying here is the snapshot's failure (the pool boots
            # cold instead), while user code failing in a hook arrives as INIT_ERROR below.
            self.kill()
            raise
        if isinstance(message, wire.InitError):
            self.kill()
            phase = {"import": "importing the app", "web": "starting its web endpoint"}.get(
                message.phase, "running @enter hooks"
            )
            raise ContainerBootError(f"{self.plan.label} failed while {phase}:", message.traceback)
        if not isinstance(message, kind):
            self.kill()
            raise ContainerError(
                f"{self.plan.label}: expected {kind.TYPE!r} from the container, got {message.TYPE!r}"  # type: ignore[attr-defined]
            )
        return message
