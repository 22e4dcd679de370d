"""Containers: a process tree in its own namespaces, on its own root filesystem, with least privilege.

A container talks to its owner over four pipes (:class:`Channels`) whose other ends the owner holds:
control in (fd 3 inside the container), control out (fd 4), stdout and stderr. Its stdin is /dev/null.

What a container is (docs/security.md has the threat model, docs/sandbox-choice.md the measurements):

- its own PID, mount, network, IPC and UTS namespaces (util-linux ``unshare``);
- an overlayfs root: the image's layers read-only, a writable layer of its own (``run_dir/upper``) that is
  discarded when it ends; the init ``pivot_root``s into it, so nothing of the host's mount tree is left;
- a /proc of its own PID namespace with the kernel's global knobs read-only, a read-only /sys, a /dev with
  the standard nodes only (they come from the runtime layer), private tmpfs /tmp and /dev/shm, and the
  volumes: the only host directories bind-mounted in;
- cgroups (memory, CPU quota, pids) joined before any of its code runs;
- as PID 1, warmboot's static init (``sandbox/init.c``), which sets ``no_new_privs``, drops capabilities to
  :data:`warmboot.worker.sandbox.capabilities.ALLOWED`, loads the seccomp filter, and runs the command as its
  child (reaping orphans, exiting with the command's status).

The launcher is a bash script run by ``unshare`` rather than an OCI runtime: CRIU is driven by the worker
directly, with fresh pipes per restore (``--inherit-fd``), which runc's restore does not offer for extra fds,
and every fixed cost here is paid again on every restore (measured in docs/sandbox-choice.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import select
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from warmboot.errors import ContainerError
from warmboot.worker import cgroups
from warmboot.worker.images.layers import DEFAULT_PATH
from warmboot.worker.sandbox import entry, rootfs

log = logging.getLogger("warmboot.worker")

#: File descriptor numbers of the control pipes inside every container.
CONTROL_IN_FD = 3
CONTROL_OUT_FD = 4

_PR_SET_CHILD_SUBREAPER = 36

#: /proc entries that reach beyond the container (kernel settings, the sysrq trigger, IRQ and bus knobs):
#: root in the container could otherwise rewrite e.g. kernel.core_pattern and run code as root on the host.
#: Bound read-only over themselves, as Docker does.
READ_ONLY_PROC = ("sys", "sysrq-trigger", "irq", "bus", "fs")


@dataclass(frozen=True)
class BindMount:
    """A host directory visible at ``target`` inside the container (volumes)."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    """What to start: the command, its environment and working directory, and what the container sees."""

    argv: Sequence[str]
    layers: Sequence[Path]  #: overlayfs lower layers, bottom first (the runtime layer among them)
    run_dir: Path  #: the container's own directory on the host: its writable layer; removed when it ends
    env: Mapping[str, str] | None = None
    cwd: str = "/"
    mounts: Sequence[BindMount] = ()  #: volumes
    hostname: str = "warmboot"
    #: Device nodes (host paths) created in the container's /dev at launch (a GPU memory snapshot's GPUs).
    devices: Sequence[str] = ()
    cgroups: Sequence[Path] = ()  #: cgroup directories the container joins before its command runs


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
        run_dir: Path | None = None,
        layers: Sequence[Path] = (),
        mounts: Sequence[BindMount] = (),
    ):
        self.pid = pid
        self.channels = channels
        self.pipe_ids = dict(pipe_ids)
        self.restored_from = restored_from
        self.run_dir = run_dir  #: its writable layer and mount point on the host (see sandbox.rootfs)
        self.layers = tuple(layers)  #: its image's layers, bottom first
        self.mounts = tuple(mounts)  #: its volumes
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

    def resume(self) -> None:
        """Continue every process of a container that a checkpoint left stopped.

        SIGCONT resumes a stopped process even where it is ignored, the namespace's init included.
        """
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def is_running(self) -> bool:
        if self._returncode is not None:
            return False
        try:
            self.wait(timeout=0)
        except TimeoutError:
            return True
        return False

    def kill(self, timeout: float = 10, *, drain: Callable[[], None] | None = None) -> int:
        """Kill every process of the container (SIGKILL to the init of its PID namespace) and reap it.

        ``drain`` runs once the processes are gone and before the pipes are closed: the owner reads what is
        still buffered in stdout/stderr (the last lines before a crash are the ones that explain it).
        """
        if self._returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        code = self.wait(timeout)
        if drain is not None:
            drain()
        self.channels.close()
        if self.run_dir is not None:
            rootfs.remove(self.run_dir)
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


def _launcher_script(spec: ContainerSpec, fds: Mapping[str, int]) -> str:
    """The bash script run as the new PID namespace's first process: the mounts, then the init (which swaps roots).

    bash rather than sh because the fd numbers to remap may have two digits. Each step that runs a program
    costs about 2 ms of every cold start (restores do not run this script): keep them few.
    """
    root = shlex.quote(str(spec.run_dir / rootfs.ROOT))
    steps = ["set -e"]
    for group in spec.cgroups:
        steps.append(f"echo 0 > {shlex.quote(str(group / 'cgroup.procs'))}")
    steps.append(f"mount -t overlay overlay -o {shlex.quote(rootfs.overlay_options(spec.layers, spec.run_dir))} {root}")
    steps.append(f"cd {root}")
    for m in spec.mounts:  # mount points were made in the writable layer by rootfs.prepare
        dst = shlex.quote("." + m.target)
        # nosuid, nodev: a file a function leaves in a volume never gains privileges through it.
        options = "bind,nosuid,nodev" + (",ro" if m.read_only else "")
        steps.append(f"mount -o {options} {shlex.quote(m.source)} {dst}")
    steps += [
        "mount -t proc -o nosuid,nodev,noexec proc proc",
        "mount -t sysfs -o ro,nosuid,nodev,noexec sysfs sys",
        "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs tmp",
        "mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs dev/shm",
        f"echo {shlex.quote(spec.hostname)} > proc/sys/kernel/hostname",
        "ip link set lo up",
    ]
    steps += _device_steps(spec.devices)
    # Absolute paths: mount(8) fails to resolve a relative path to a file under /proc.
    # Kernels built without some of them (no sysrq here) simply lack the entry.
    steps += [f"[ ! -e {root}/proc/{p} ] || mount -o bind,ro {root}/proc/{p} {root}/proc/{p}" for p in READ_ONLY_PROC]
    ci, co = fds["control_in"], fds["control_out"]
    # stdin is the container's own /dev/null: CRIU can only dump files on mounts the container sees.
    steps.append(f"exec <./dev/null {CONTROL_IN_FD}<&{ci} {CONTROL_OUT_FD}>&{co} {ci}<&- {co}>&-")
    # The launcher ran the host's mount and ip; the init looks the command up on the image's PATH.
    path = (spec.env or {}).get("PATH", DEFAULT_PATH)
    steps.append(f"export PATH={shlex.quote(path)}")
    # The init swaps roots (pivot_root) and detaches the host's mount tree: after that the container can name
    # nothing of the host. It is exec'd from inside the new root, where CRIU finds its executable later.
    init = entry.command([], init="." + entry.CONTAINER_INIT, root=".", cwd=spec.cwd)
    steps.append("exec " + " ".join(shlex.quote(a) for a in init) + ' "$@"')
    return "\n".join(steps)


def _device_steps(devices: Sequence[str]) -> list[str]:
    """Steps that create these host device nodes (same type and numbers) in the container's /dev."""
    steps = []
    for node in devices:
        st = os.stat(node)
        kind = "c" if (st.st_mode & 0o170000) == 0o020000 else "b"
        name = shlex.quote("dev/" + os.path.basename(node))
        steps.append(f"mknod -m 666 {name} {kind} {os.major(st.st_rdev)} {os.minor(st.st_rdev)}")
    return steps


def start(spec: ContainerSpec, *, ready_timeout: float = 5.0) -> Container:
    """Start ``spec`` as a new container and return it (the command is running, its output is on the pipes)."""
    rootfs.prepare(spec.run_dir, [m.target for m in spec.mounts], spec.layers)
    pipes = _PipeSet.create()
    fds = {role: _high_fd(fd) for role, fd in pipes.container_fds.items()}
    pipes.container_fds = fds
    script = _launcher_script(spec, fds)
    namespaces = ["--pid", "--fork", "--mount", "--net", "--ipc", "--uts"]
    argv = ["unshare", *namespaces, "--", "bash", "-c", script, "warmboot-launcher", *spec.argv]
    env = dict(spec.env) if spec.env is not None else {}
    # The launcher runs the host's mount and ip, then sets the container's PATH before the init.
    try:
        launcher = subprocess.Popen(
            argv,
            pass_fds=(fds["control_in"], fds["control_out"]),
            stdin=subprocess.DEVNULL,
            stdout=fds["stdout"],
            stderr=fds["stderr"],
            env={**env, "PATH": DEFAULT_PATH},
            close_fds=True,
        )
    except OSError as exc:
        pipes.close_container_ends()
        pipes.channels.close()
        rootfs.remove(spec.run_dir)
        raise ContainerError(f"cannot start container for {spec.argv[0]!r}: {exc}") from exc
    finally:
        pipes.close_container_ends()
    pid = _wait_for_init(launcher, ready_timeout)
    return Container(
        pid,
        pipes.channels,
        pipes.pipe_ids,
        launcher=launcher,
        run_dir=spec.run_dir,
        layers=spec.layers,
        mounts=spec.mounts,
    )


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


def remove_leftovers(containers_dir: Path, left_by: str) -> None:
    """Kill what a dead server or agent (``left_by``) left running under ``containers_dir`` (every process of
    each container, through its cgroup, and a restored copy that never joined one), then remove the run
    directories and their overlays."""
    if containers_dir.is_dir():
        for run_dir in containers_dir.iterdir():
            if killed := cgroups.kill_leftover(run_dir.name):
                log.warning("stopped container %s left by %s (%d processes)", run_dir.name, left_by, killed)
        if strays := kill_rooted_in(containers_dir):
            log.warning("stopped %d process(es) left by %s outside any cgroup", len(strays), left_by)
    rootfs.remove_stale(containers_dir, alive=set())


def kill_rooted_in(containers_dir: Path) -> list[int]:
    """SIGKILL every process whose root filesystem is a container root under ``containers_dir``.

    The last resort after a server died: a container that was being restored when it died may not have joined
    its cgroup yet, but its root is still the overlay mounted for its run directory, in a mount namespace of its
    own, and its mountinfo names that directory. Returns the pids killed.
    """
    ours = os.readlink("/proc/self/ns/mnt")
    marker = str(containers_dir) + "/"
    killed = []
    for proc_entry in os.scandir("/proc"):
        if not proc_entry.name.isdigit():
            continue
        pid = int(proc_entry.name)
        try:
            if os.readlink(f"/proc/{pid}/ns/mnt") == ours:
                continue
            with open(f"/proc/{pid}/mountinfo") as f:
                root = next((line for line in f if line.split()[4] == "/"), "")
        except (OSError, IndexError):
            continue
        if marker in root:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed
