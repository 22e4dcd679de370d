"""Containers: a process tree started from a command in its own PID and mount namespaces.

A container talks to its owner over four pipes (:class:`Channels`) whose other ends the owner holds:
control in (fd 3 inside the container), control out (fd 4), stdout and stderr. Its stdin is /dev/null.

Isolation uses kernel namespaces directly (util-linux ``unshare``) rather than an OCI runtime: measured here,
``runc restore`` adds about 100 ms to every restore compared with a raw CRIU restore of the same process
(docs/snapshot-engine.md). The init of the new PID namespace leads its own session, so CRIU can dump the
whole tree and restore any number of copies concurrently, each in a fresh PID namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from warmboot.errors import ContainerError

#: File descriptor numbers of the control pipes inside every container.
CONTROL_IN_FD = 3
CONTROL_OUT_FD = 4

_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class BindMount:
    """A host directory visible at ``target`` inside the container (volumes, the app's code)."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """What to start: the command, its environment and working directory, and what the container sees."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str = "/"
    mounts: Sequence[BindMount] = ()
    private_tmp: bool = True
    #: A private /dev (a tmpfs with the usual character devices) holding only these extra device nodes.
    private_dev: bool = False
    devices: Sequence[str] = ()
    cgroup: str | None = None  #: a cgroup directory the container's init joins before it execs the command


@dataclass
class Channels:
    """The owner's ends of a container's pipes: write to ``control_in``, read the other three."""

    control_in: BinaryIO
    control_out: BinaryIO
    stdout: BinaryIO
    stderr: BinaryIO

    def close(self) -> None:
        for stream in (self.control_in, self.control_out, self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                stream.close()


@dataclass
class _PipeSet:
    """Fresh pipes for one container: the owner's :class:`Channels` and the container's ends (by role)."""

    channels: Channels
    container_fds: dict[str, int]
    pipe_ids: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls) -> _PipeSet:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        so_r, so_w = os.pipe()
        se_r, se_w = os.pipe()
        for fd in (in_w, out_r, so_r, se_r):
            os.set_inheritable(fd, False)
        channels = Channels(
            control_in=os.fdopen(in_w, "wb", buffering=0),
            control_out=os.fdopen(out_r, "rb", buffering=0),
            stdout=os.fdopen(so_r, "rb", buffering=0),
            stderr=os.fdopen(se_r, "rb", buffering=0),
        )
        container_fds = {"control_in": in_r, "control_out": out_w, "stdout": so_w, "stderr": se_w}
        pipe_ids = {role: f"pipe:[{os.fstat(fd).st_ino}]" for role, fd in container_fds.items()}
        return cls(channels, container_fds, pipe_ids)

    def close_container_ends(self) -> None:
        for fd in self.container_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)


class Container:
    """A running container: the host PID of its init, its channels, and how to wait for or kill it.

    ``pipe_ids`` records the kernel identities (``pipe:[INODE]``) of the container's ends of its channels,
    which a checkpoint stores so that a restore can attach fresh pipes in their place.
    """

    def __init__(
        self,
        pid: int,
        channels: Channels,
        pipe_ids: Mapping[str, str],
        *,
        launcher: subprocess.Popen[bytes] | None = None,
        restored_from: str | None = None,
    ):
        self.pid = pid
        self.channels = channels
        self.pipe_ids = dict(pipe_ids)
        self.restored_from = restored_from
        self._launcher = launcher
        self._returncode: int | None = None
        self.timings: dict[str, float] = {}  #: where a restore's time went (set by the snapshot store)

    def __repr__(self) -> str:
        origin = f" restored_from={self.restored_from}" if self.restored_from else ""
        return f"<Container pid={self.pid}{origin}>"

    @property
    def returncode(self) -> int | None:
        """The exit status once the container has ended, else ``None``."""
        return self._returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the container's init to exit; return its status (negative: killed by that signal)."""
        if self._returncode is not None:
            return self._returncode
        if self._launcher is not None:
            try:
                self._returncode = self._launcher.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                raise TimeoutError(f"container {self.pid} still running after {timeout} s") from exc
            return self._returncode
        # A restored container is not our child but our orphan: restore() made this process a subreaper.
        pidfd = os.pidfd_open(self.pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
            if not ready:
                raise TimeoutError(f"container {self.pid} still running after {timeout} s")
        finally:
            os.close(pidfd)
        try:
            _, status = os.waitpid(self.pid, 0)
            self._returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            self._returncode = -1  # reaped elsewhere: the exit status is not ours to know
        return self._returncode

    def pids(self) -> list[int]:
        """Host PIDs of every process in the container (its init first)."""
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            with contextlib.suppress(OSError):
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
        return found

    def is_running(self) -> bool:
        if self._returncode is not None:
            return False
        try:
            self.wait(timeout=0)
        except TimeoutError:
            return True
        return False

    def kill(self, timeout: float = 10) -> int:
        """Kill every process of the container (SIGKILL to the init of its PID namespace) and reap it."""
        if self._returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        code = self.wait(timeout)
        self.channels.close()
        return code


@functools.cache
def ensure_subreaper() -> None:
    """Make orphaned descendants (restored containers, once CRIU detaches) children of this process.

    Then the worker can reap a restored container and learn its exit status, as it can for one it started.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise ContainerError(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")


def _high_fd(fd: int) -> int:
    """Move ``fd`` above the descriptors the container's layout uses, so the launcher can dup it to 3 and 4."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return moved


_STANDARD_DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0)}


def _private_dev_steps(devices: Sequence[str]) -> list[str]:
    """Shell steps that give the container its own /dev with the standard nodes plus ``devices``."""
    from warmboot.worker.gpus import node_commands

    steps = ["mount -t tmpfs -o mode=755,nosuid tmpfs /dev"]
    for name, (major, minor) in _STANDARD_DEVICES.items():
        steps.append(f"mknod /dev/{name} c {major} {minor} && chmod 666 /dev/{name}")
    steps += [
        "mkdir /dev/shm /dev/pts",
        "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm",
        "ln -s /proc/self/fd /dev/fd",
        "ln -s /proc/self/fd/0 /dev/stdin",
        "ln -s /proc/self/fd/1 /dev/stdout",
        "ln -s /proc/self/fd/2 /dev/stderr",
    ]
    steps += node_commands(tuple(devices))
    if not devices:
        # GPUs withheld until after the snapshot point: a read-only /dev also stops the CUDA driver, which
        # creates missing /dev/nvidia* nodes itself when it initialises as root.
        steps.append("mount -o remount,ro /dev")
    return steps


def _launcher_script(spec: ContainerSpec, fds: Mapping[str, int]) -> str:
    """The bash script run as the namespace's init: it sets up mounts and descriptors, then becomes its init.

    bash rather than sh because the fd numbers to remap may have two digits.
    """
    # A /proc of the container's own PID namespace: it sees its processes only (as a restored copy would).
    # unshare has made the mount tree private and mounted this PID namespace's own /proc (--mount-proc).
    # Each step that runs a program costs about 2 ms of every cold start: keep them few.
    steps = ["set -e"]
    if spec.cgroup:
        steps.append(f"echo 0 > {shlex.quote(spec.cgroup + '/cgroup.procs')}")
    # Every mount in the namespace is one more for CRIU to recreate at each restore (tmpfs ones through tar):
    # drop the host's cgroup tree (the container joined its cgroup already) and its /dev/shm (which may be
    # stacked twice, hence twice), in one umount.
    if spec.private_dev:
        steps.append("umount -R /sys/fs/cgroup /dev 2>/dev/null || true")
        steps.extend(_private_dev_steps(spec.devices))
    else:
        steps.append("umount -R /sys/fs/cgroup /dev/shm /dev/shm 2>/dev/null || true")
        steps.append("mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm")
    for m in spec.mounts:  # before /tmp is covered: sources may live under the host's /tmp
        src, dst = shlex.quote(m.source), shlex.quote(m.target)
        steps.append(f"mkdir -p {dst} && mount --bind {src} {dst}")
        if m.read_only:
            steps.append(f"mount -o remount,bind,ro {dst}")
    if spec.private_tmp:
        steps.append("mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp")
    steps.append(f"cd {shlex.quote(spec.cwd)}")
    ci, co = fds["control_in"], fds["control_out"]
    # stdin is opened here, inside the namespace: a /dev/null opened on the host sits on a mount
    # the container cannot reach, which CRIU refuses to dump.
    steps.append(f"exec </dev/null {CONTROL_IN_FD}<&{ci} {CONTROL_OUT_FD}>&{co} {ci}<&- {co}>&-")
    # The namespace's init is a bash that leads its own session and waits for the command: the command must
    # not be PID 1 itself, which the kernel shields from signals sent inside the namespace (a function could
    # not even SIGKILL itself) and which would inherit every orphan to reap. bash reaps them, and exits with
    # the command's status (128+N when a signal N killed it). `; exit $?` keeps bash from exec'ing the command.
    steps.append('exec setsid /bin/bash -c \'"$@"; exit $?\' warmboot-init "$@"')
    return "\n".join(steps)


def start(spec: ContainerSpec, *, ready_timeout: float = 5.0) -> Container:
    """Start ``spec`` as a new container and return it (the command is running, its output is on the pipes)."""
    pipes = _PipeSet.create()
    fds = {role: _high_fd(fd) for role, fd in pipes.container_fds.items()}
    pipes.container_fds = fds
    script = _launcher_script(spec, fds)
    argv = ["unshare", "--pid", "--fork", "--mount-proc", "--", "bash", "-c", script, "warmboot-init", *spec.argv]
    env = dict(spec.env) if spec.env is not None else dict(os.environ)
    try:
        launcher = subprocess.Popen(
            argv,
            pass_fds=(fds["control_in"], fds["control_out"]),
            stdin=subprocess.DEVNULL,
            stdout=fds["stdout"],
            stderr=fds["stderr"],
            env=env,
            close_fds=True,
        )
    except OSError as exc:
        pipes.close_container_ends()
        pipes.channels.close()
        raise ContainerError(f"cannot start container for {spec.argv[0]!r}: {exc}") from exc
    finally:
        pipes.close_container_ends()
    pid = _wait_for_init(launcher, ready_timeout)
    return Container(pid, pipes.channels, pipes.pipe_ids, launcher=launcher)


def _wait_for_init(launcher: subprocess.Popen[bytes], timeout: float) -> int:
    """The host PID of the namespace's init: the one child of ``unshare --fork``."""
    children = f"/proc/{launcher.pid}/task/{launcher.pid}/children"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(children) as f:
                kids = f.read().split()
        except FileNotFoundError:
            kids = []
        if kids:
            return int(kids[0])
        if launcher.poll() is not None:
            raise ContainerError(f"container launcher exited with status {launcher.returncode} before its init started")
        time.sleep(0.0005)
    launcher.kill()
    raise ContainerError(f"container init did not start within {timeout} s")


def new_pipes() -> _PipeSet:
    """Fresh channels for a restored container (used by the snapshot engine)."""
    return _PipeSet.create()
