"""Escape attempts: each tries one way out of a container and reports whether it got out.

tests/test_security.py runs every attempt inside a deployed function (where each must fail) and, as a
control, on the host as root (where the dangerous ones must succeed, so the container tests are not vacuous).
Stdlib and ctypes only: this file is shipped into ``Image.debian_slim()`` containers with
``add_local_python_source("escapes")``.

Every attempt is a plain function returning ``(succeeded, notes)``; :func:`run` wraps it into a JSON-able
result ``{"attempt", "succeeded", "detail", "crashed", "inconclusive"}`` and never raises. ``crashed`` means
the attempt itself broke (a bug here, not a verdict); ``inconclusive`` means it could not try at all.
Attempts that could harm the host when they succeed write back the value they read (a write of the same
value proves the permission and changes nothing) or only open the file.

Run as a program for the host-side control: ``python escapes.py NAME < JSON_KWARGS`` prints the result as JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

Notes = list[str]
Outcome = tuple[bool, Notes]

ATTEMPTS: dict[str, Callable[..., Outcome]] = {}

#: Capabilities no container may hold (the issue's list plus the two Docker drops warmboot also drops).
FORBIDDEN_CAPS = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_NET_ADMIN": 12,
    "CAP_NET_RAW": 13,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_RAWIO": 17,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_MKNOD": 27,
}

_SYSCALLS = {  # the few syscalls libc has no wrapper for (or Python's ctypes cannot reach by name)
    "x86_64": {
        "init_module": 175,
        "delete_module": 176,
        "add_key": 248,
        "bpf": 321,
        "name_to_handle_at": 303,
        "open_by_handle_at": 304,
        "fsopen": 430,
    },
    "aarch64": {
        "init_module": 105,
        "delete_module": 106,
        "add_key": 217,
        "bpf": 280,
        "name_to_handle_at": 264,
        "open_by_handle_at": 265,
        "fsopen": 430,
    },
}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]

MS_BIND = 4096
MNT_DETACH = 2
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
PTRACE_ATTACH = 16
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
KEY_SPEC_PROCESS_KEYRING = -2


def attempt(fn: Callable[..., Outcome]) -> Callable[..., Outcome]:
    ATTEMPTS[fn.__name__] = fn
    return fn


def run(name: str, **kwargs: Any) -> dict[str, Any]:
    """Run attempt ``name``; never raises."""
    result: dict[str, Any] = {"attempt": name, "succeeded": False, "detail": "", "crashed": False}
    result["inconclusive"] = False
    try:
        succeeded, notes = ATTEMPTS[name](**kwargs)
        result["succeeded"] = bool(succeeded)
        result["inconclusive"] = any(n.startswith("INCONCLUSIVE") for n in notes)
        result["detail"] = "; ".join(notes)
    except BaseException as exc:  # noqa: BLE001 - the verdict must come back whatever happened
        result["crashed"] = True
        result["detail"] = f"attempt crashed: {exc!r}\n{traceback.format_exc()}"
    return result


# ----- helpers ---------------------------------------------------------------------------------------------


def _err(e: int | BaseException) -> str:
    code = e.errno if isinstance(e, OSError) and e.errno is not None else e
    if isinstance(code, int):
        return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
    return repr(e)


def _syscall(name: str, *args: Any) -> tuple[int, int]:
    """(return value, errno) of a raw syscall."""
    numbers = _SYSCALLS.get(platform.machine())
    if numbers is None:
        return -1, errno.ENOSYS
    ctypes.set_errno(0)
    ret = _libc.syscall(ctypes.c_long(numbers[name]), *args)
    return ret, ctypes.get_errno()


def _pids() -> list[int]:
    """The PIDs /proc shows, except this process's own."""
    with contextlib.suppress(OSError):
        return sorted(int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid())
    return []


def _read(path: str, limit: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def _cmdline(pid: int) -> str | None:
    try:
        return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def _mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> int:
    """0 on success, else the errno."""
    ret = _libc.mount(
        source.encode(), target.encode(), fstype.encode() if fstype else None, flags, data.encode() if data else None
    )
    return 0 if ret == 0 else ctypes.get_errno()


def _umount(target: str) -> None:
    _libc.umount2(target.encode(), MNT_DETACH)


def _write_same(path: str) -> str:
    """Open ``path`` for writing and write back what it holds: proves the permission, changes nothing."""
    current = _read(path).strip()
    with open(path, "wb", buffering=0) as f:
        f.write(current + b"\n")
    return current.decode(errors="replace")


# ----- filesystem ------------------------------------------------------------------------------------------


@attempt
def read_host_file(path: str, token: str) -> Outcome:
    """Read a host file outside the container's mounts, directly and through other processes' roots."""
    notes: Notes = []
    candidates = [path, f"/proc/self/root{path}", f"/proc/1/root{path}"]
    candidates += [f"/proc/{pid}/root{path}" for pid in _pids()[:300]]
    errors: dict[str, str] = {}
    for candidate in candidates:
        try:
            data = _read(candidate)
        except OSError as exc:
            errors.setdefault(_err(exc), candidate)
            continue
        if token.encode() in data:
            return True, [f"read the host file's token through {candidate}"]
        notes.append(f"{candidate} exists here but does not hold the token")
    notes += [f"{e} (first at {c})" for e, c in errors.items()]
    return False, notes


@attempt
def write_host_files(create: list[str], append: list[str], token: str) -> Outcome:
    """Create files at host paths (never creating their directories) and append to existing host files."""
    notes: Notes = []
    wrote = False
    for path in create:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            notes.append(f"create {path}: {_err(exc)}")
            continue
        os.write(fd, token.encode())
        os.close(fd)
        wrote = True
        notes.append(f"created {path}")
    for path in append:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            notes.append(f"append to {path}: {_err(exc)}")
            continue
        os.write(fd, token.encode())
        os.close(fd)
        wrote = True
        notes.append(f"appended to {path}")
    return wrote, notes


@attempt
def read_warmboot_home(home: str, secret_value: str, scan_budget_mib: int = 256) -> Outcome:
    """List WARMBOOT_HOME, read state.db and snapshots, and look everywhere visible for another app's secret."""
    notes: Notes = []
    got_in = False
    needle = secret_value.encode()
    for root in (home, f"/proc/1/root{home}"):
        try:
            names = os.listdir(root)
        except OSError as exc:
            notes.append(f"list {root}: {_err(exc)}")
            continue
        got_in = True
        notes.append(f"listed {root}: {sorted(names)[:12]}")
        for sub in ("state.db", "snapshots", "server.sock"):
            target = os.path.join(root, sub)
            try:
                if os.path.isdir(target):
                    notes.append(f"listed {target}: {len(os.listdir(target))} entries")
                elif sub == "state.db":
                    notes.append(f"read {target}: {len(_read(target))} bytes")
            except OSError as exc:
                notes.append(f"{target}: {_err(exc)}")
    found = _scan_for(needle, [home, f"/proc/1/root{home}"], scan_budget_mib << 20)
    for pid in _pids():
        for what in ("environ", "cmdline"):
            with contextlib.suppress(OSError):
                if needle in _read(f"/proc/{pid}/{what}"):
                    found.append(f"/proc/{pid}/{what}")
    if any(secret_value in v for v in os.environ.values()):
        found.append("this container's own environment")
    if found:
        notes.append(f"found the other app's secret value in {found[:5]}")
    with contextlib.suppress(OSError):
        if home.encode() in _read("/proc/self/mountinfo"):
            notes.append(f"(the path {home} appears in /proc/self/mountinfo: its name leaks, not its contents)")
    return got_in or bool(found), notes


def _scan_for(needle: bytes, roots: list[str], budget: int) -> list[str]:
    """Files under ``roots`` (state.db first) holding ``needle``, reading at most ``budget`` bytes in all."""
    found: list[str] = []
    for root in roots:
        paths = [os.path.join(root, "state.db")]
        for dirpath, _dirs, files in os.walk(root):
            paths += [os.path.join(dirpath, f) for f in files]
        for path in paths:
            if budget <= 0 or len(found) >= 5:
                return found
            try:
                if not stat.S_ISREG(os.stat(path).st_mode):
                    continue
                data = _read(path, min(budget, 64 << 20))
            except OSError:
                continue
            budget -= len(data)
            if needle in data:
                found.append(path)
    return found


@attempt
def connect_server_socket(path: str, abstract_name: str) -> Outcome:
    """Connect to the server's Unix socket by path (also via /proc/1/root) and to a host abstract socket."""
    notes: Notes = []
    targets: list[str | bytes] = [path, f"/proc/1/root{path}", b"\0" + abstract_name.encode()]
    with contextlib.suppress(OSError):  # abstract sockets this network namespace lists that look like ours
        for line in _read("/proc/net/unix").decode(errors="replace").splitlines()[1:]:
            name = line.split()[-1] if len(line.split()) >= 8 else ""
            if name.startswith("@") and "warmboot" in name:
                targets.append(b"\0" + name[1:].encode())
    for target in targets:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        try:
            s.connect(target)
        except OSError as exc:
            notes.append(f"connect {target!r}: {_err(exc)}")
            continue
        finally:
            s.close()
        return True, [f"connected to {target!r}"]
    return False, notes


# ----- processes -------------------------------------------------------------------------------------------


def _is_marker(pid: int, marker: str) -> bool | None:
    """Whether ``pid`` here is the host's marker process (None: /proc does not show it)."""
    cmdline = _cmdline(pid)
    return None if cmdline is None else marker in cmdline


@attempt
def see_host_process(pid: int, marker: str) -> Outcome:
    """Find a host process by its unique argv in /proc, and probe its host PID with kill(pid, 0)."""
    notes: Notes = []
    seen = [p for p in _pids() if marker in (_cmdline(p) or "")]
    if seen:
        return True, [f"/proc shows the host process as PID(s) {seen}"]
    notes.append(f"no process with {marker!r} among the {len(_pids())} PIDs in /proc")
    try:
        os.kill(pid, 0)
    except OSError as exc:
        notes.append(f"kill({pid}, 0): {_err(exc)}")
        return False, notes
    if _is_marker(pid, marker) is False:
        notes.append(f"PID {pid} exists here but is another process ({_cmdline(pid)!r})")
        return False, notes
    return True, [f"kill({pid}, 0) found a process /proc does not show"]


@attempt
def signal_host_process(pid: int, marker: str) -> Outcome:
    """Send SIGTERM to a host process (only if what answers at that PID is that process, or unknown)."""
    notes: Notes = []
    for p in [p for p in _pids() if marker in (_cmdline(p) or "")] or [pid]:
        which = _is_marker(p, marker)
        if which is False:
            notes.append(f"PID {p} here is another process ({_cmdline(p)!r}): not signalled")
            continue
        try:
            os.kill(p, signal.SIGTERM if which else 0)
        except OSError as exc:
            notes.append(f"kill({p}): {_err(exc)}")
            continue
        return True, [f"signalled PID {p} ({'the host process' if which else 'a process /proc does not show'})"]
    return False, notes


@attempt
def ptrace_outside(pid: int, marker: str, init_identity: list[str] | None = None) -> Outcome:
    """PTRACE_SEIZE / PTRACE_ATTACH a host process; and PID 1 here, which must not be the host's init."""
    notes: Notes = []
    targets = [(p, "the host process") for p in _pids() if marker in (_cmdline(p) or "")] or [(pid, "host PID")]
    if init_identity:
        if _identity(1) == init_identity:
            targets.append((1, "the host's init (PID 1 here is the host's)"))
        else:
            notes.append(f"PID 1 here is not the host's init ({_cmdline(1)!r})")
    for target, what in targets:
        if _is_marker(target, marker) is False and target != 1:
            notes.append(f"PID {target} here is another process: not traced")
            continue
        for request, name in ((PTRACE_SEIZE, "PTRACE_SEIZE"), (PTRACE_ATTACH, "PTRACE_ATTACH")):
            ctypes.set_errno(0)
            if _libc.ptrace(request, target, None, None) == 0:
                if request == PTRACE_ATTACH:  # stopped by the attach: wait for the stop, then let it go
                    with contextlib.suppress(OSError):
                        os.waitpid(target, 0x40000000)  # __WALL
                _libc.ptrace(PTRACE_DETACH, target, None, None)
                return True, [f"{name} of PID {target} ({what}) succeeded"]
            notes.append(f"{name} of PID {target} ({what}): {_err(ctypes.get_errno())}")
    return False, notes


def _identity(pid: int) -> list[str] | None:
    """A process's cmdline and start time (clock ticks after boot): the same pair means the same process."""
    try:
        fields = _read(f"/proc/{pid}/stat").decode().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return [_cmdline(pid) or "", fields[19]]


# ----- privilege -------------------------------------------------------------------------------------------


def _status() -> dict[str, str]:
    fields = {}
    for line in _read("/proc/self/status").decode().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@attempt
def hold_forbidden_capabilities() -> Outcome:
    """Any forbidden capability in the effective, permitted, inheritable, ambient or bounding set."""
    status = _status()
    held = []
    for field in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):
        bits = int(status.get(field, "0"), 16)
        names = [name for name, bit in FORBIDDEN_CAPS.items() if bits >> bit & 1]
        if names:
            held.append(f"{field} has {', '.join(names)}")
    caps = {f: status.get(f) for f in ("CapEff", "CapPrm", "CapBnd", "CapAmb")}
    return bool(held), held or [f"none of {sorted(FORBIDDEN_CAPS)} held: {caps}"]


@attempt
def run_without_no_new_privs() -> Outcome:
    """The process may gain privileges through exec (setuid files, file capabilities)."""
    value = _status().get("NoNewPrivs", "missing")
    return value != "1", [f"NoNewPrivs: {value}"]


@attempt
def run_without_seccomp() -> Outcome:
    """No seccomp filter holds the process."""
    value = _status().get("Seccomp", "missing")
    return value != "2", [f"Seccomp: {value} (2 = filter mode)"]


@attempt
def raw_socket() -> Outcome:
    """Open a raw IP or packet socket (nothing is sent)."""
    notes: Notes = []
    for family, kind, proto, name in (
        (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, "AF_INET SOCK_RAW"),
        (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6, "AF_INET6 SOCK_RAW"),
        (socket.AF_PACKET, socket.SOCK_RAW, 0x0300, "AF_PACKET SOCK_RAW"),  # htons(ETH_P_ALL)
    ):
        try:
            socket.socket(family, kind, proto).close()
        except OSError as exc:
            notes.append(f"{name}: {_err(exc)}")
            continue
        return True, [f"opened a {name} socket"]
    return False, notes


@attempt
def mount_anything() -> Outcome:
    """mount(2) a tmpfs, a proc, a sysfs and a bind of /; fsopen(2); and the mount command if present."""
    notes: Notes = []
    target = tempfile.mkdtemp(prefix="wbsec-mnt-")
    try:
        for source, fstype, flags in (
            ("wbsec", "tmpfs", 0),
            ("proc", "proc", 0),
            ("sysfs", "sysfs", 0),
            ("/", None, MS_BIND),
        ):
            code = _mount(source, target, fstype, flags)
            if code == 0:
                _umount(target)
                return True, [f"mounted {fstype or 'a bind of ' + source} at {target}"]
            notes.append(f"mount {fstype or 'bind ' + source}: {_err(code)}")
        fd, code = _syscall("fsopen", b"tmpfs", 0)
        if fd >= 0:
            os.close(fd)
            return True, ["fsopen('tmpfs') returned a filesystem context"]
        notes.append(f"fsopen: {_err(code)}")
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "wbsec", target], capture_output=True, text=True, timeout=20, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            notes.append(f"mount command: {exc!r}")
        else:
            if proc.returncode == 0:
                _umount(target)
                return True, ["the mount command mounted a tmpfs"]
            notes.append(f"mount command: exit {proc.returncode}: {proc.stderr.strip()[:200]}")
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(target)
    return False, notes


@attempt
def cgroup_release_agent() -> Outcome:
    """The cgroup v1 release_agent escape: mount a v1 hierarchy and write release_agent/notify_on_release;
    also write those files where /sys/fs/cgroup shows them, and create a cgroup there."""
    notes: Notes = []
    target = tempfile.mkdtemp(prefix="wbsec-cg-")
    try:
        for options in ("rdma", "memory", "pids", "none,name=wbsec"):
            code = _mount("cgroup", target, "cgroup", 0, options)
            if code:
                notes.append(f"mount cgroup -o {options}: {_err(code)}")
                continue
            try:
                wrote = []
                for name in ("release_agent", "notify_on_release"):
                    with contextlib.suppress(OSError):
                        _write_same(os.path.join(target, name))
                        wrote.append(name)
            finally:
                _umount(target)
            return True, [f"mounted a cgroup v1 hierarchy (-o {options}); writable: {wrote or 'none'}"]
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(target)
    for root in ("/sys/fs/cgroup", *(f"/sys/fs/cgroup/{d}" for d in _listdir("/sys/fs/cgroup"))):
        for name in ("release_agent", "notify_on_release"):
            path = os.path.join(root, name)
            if not os.path.exists(path):
                continue
            try:
                _write_same(path)
            except OSError as exc:
                notes.append(f"write {path}: {_err(exc)}")
                continue
            return True, [f"wrote {path}"]
        child = os.path.join(root, f"wbsec-{os.getpid()}")
        try:
            os.mkdir(child)
        except OSError as exc:
            if os.path.isdir(root):
                notes.append(f"mkdir {child}: {_err(exc)}")
            continue
        os.rmdir(child)
        return True, [f"created the cgroup {child}"]
    return False, notes


def _listdir(path: str) -> list[str]:
    try:
        return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    except OSError:
        return []


_LIMIT_FILES = {  # controller: (file, a value that lifts the limit)
    "memory": (("memory.limit_in_bytes", "-1"), ("memory.max", "max")),
    "pids": (("pids.max", "max"),),
    "cpu": (("cpu.cfs_quota_us", "-1"), ("cpu.max", "max")),
}


@attempt
def change_cgroup_limits(avoid: list[str] | None = None) -> Outcome:
    """Lift the memory, pids and CPU limits of its own cgroups: through /sys/fs/cgroup if visible, then
    through a cgroup filesystem it mounts itself. Never touches a group in ``avoid`` (the test runner's own:
    a process without a group of its own must not change the runner's) or the root group."""
    notes: Notes = []
    avoid_set = set(avoid or [])
    own: list[tuple[str, str]] = []  # (controller or "" for v2, path)
    for line in _read("/proc/self/cgroup").decode().splitlines():
        _id, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            if c in ("", *_LIMIT_FILES):
                own.append((c, path))
    notes.append(f"own cgroups: {own}")
    roots = ["/sys/fs/cgroup"]
    mounted: list[str] = []
    try:
        for options, fstype in (("memory", "cgroup"), ("pids", "cgroup"), ("cpu", "cgroup"), ("", "cgroup2")):
            target = tempfile.mkdtemp(prefix="wbsec-cgl-")
            code = _mount("cgroup", target, fstype, 0, options or None)
            if code:
                notes.append(f"mount {fstype} {options}: {_err(code)}")
                os.rmdir(target)
                continue
            mounted.append(target)
            roots.append(target)
        for controller, path in own:
            if path in avoid_set:
                notes.append(f"INCONCLUSIVE: its {controller or 'v2'} group {path} is the test runner's own")
                continue
            if path == "/":
                continue
            for root in roots:
                for base in {os.path.join(root, controller), root, os.path.join(root, "unified")}:
                    for name, lifted in _LIMIT_FILES.get(controller, sum(_LIMIT_FILES.values(), ())):
                        limit = base + path.rstrip("/") + "/" + name
                        if not os.path.exists(limit):
                            continue
                        changed = _lift(limit, lifted, notes)
                        if changed:
                            return True, [changed]
    finally:
        for target in mounted:
            _umount(target)
            with contextlib.suppress(OSError):
                os.rmdir(target)
    return False, notes


def _lift(path: str, lifted: str, notes: Notes) -> str | None:
    """Write ``lifted`` into a limit file and put the old value back; what happened if the write went in."""
    try:
        before = _read(path).decode().strip()
        with open(path, "w") as f:
            f.write(lifted)
    except OSError as exc:
        notes.append(f"write {path}: {_err(exc)}")
        return None
    after = _read(path).decode().strip()
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(before.split()[0] if path.endswith("cpu.max") else before)
    return f"wrote {path}: {before!r} -> {after!r} (restored)"


@attempt
def write_proc_knobs() -> Outcome:
    """Write kernel knobs that reach the host: core_pattern (write back its value), other /proc/sys and /sys
    files (same), /proc/sysrq-trigger (opened only: any byte written there is a command)."""
    notes: Notes = []
    for path in (
        "/proc/sys/kernel/core_pattern",
        "/proc/sys/kernel/modprobe",
        "/proc/sys/vm/overcommit_memory",
        "/proc/sys/kernel/panic_on_oops",
    ):
        if not os.path.exists(path):
            continue
        try:
            value = _write_same(path)
        except OSError as exc:
            notes.append(f"write {path}: {_err(exc)}")
            continue
        return True, [f"wrote {path} (its own value {value!r} back)"]
    # Opened only: a byte written to sysrq-trigger is a command, and a sysfs choice list ("always [madvise]
    # never") cannot be written back verbatim.
    for path in (
        "/proc/sysrq-trigger",
        "/proc/sys/fs/binfmt_misc/register",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ):
        try:
            os.close(os.open(path, os.O_WRONLY))
        except OSError as exc:
            notes.append(f"open {path} for writing: {_err(exc)}")
            continue
        return True, [f"opened {path} for writing"]
    return False, notes


def _node_dirs() -> list[str]:
    return list(dict.fromkeys((tempfile.gettempdir(), "/dev/shm", "/var/tmp", "/root", os.getcwd())))


@attempt
def mknod_block_device(major: int, minor: int) -> Outcome:
    """Make a block device node for the host's disk (CAP_MKNOD), anywhere it can write; removed at once."""
    notes: Notes = []
    for directory in _node_dirs():
        path = os.path.join(directory, f"wbsec-node-{os.getpid()}")
        try:
            os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(major, minor))
        except OSError as exc:
            notes.append(f"mknod in {directory}: {_err(exc)}")
            continue
        os.unlink(path)
        return True, [f"made a node for block device {major}:{minor} in {directory}"]
    return False, notes


@attempt
def read_host_disk(major: int, minor: int, names: list[str] | None = None) -> Outcome:
    """Read the first sector of the host's disk: through /dev/NAME, or through a node it makes itself."""
    notes: Notes = []
    paths = [f"/dev/{name}" for name in names or []]
    made = []
    for directory in _node_dirs():
        path = os.path.join(directory, f"wbsec-disk-{os.getpid()}")
        try:
            os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(major, minor))
        except OSError as exc:
            notes.append(f"mknod in {directory}: {_err(exc)}")
            continue
        made.append(path)
        paths.append(path)
        break
    try:
        for path in paths:
            try:
                data = _read(path, 512)
            except OSError as exc:
                notes.append(f"read {path}: {_err(exc)}")
                continue
            return True, [f"read {len(data)} bytes of {path} (block device {major}:{minor})"]
    finally:
        for path in made:
            os.unlink(path)
    return False, notes


@attempt
def load_kernel_module() -> Outcome:
    """init_module with an empty image and delete_module: EPERM means refused; anything else means allowed."""
    notes: Notes = []
    for name, args in (("init_module", (None, ctypes.c_ulong(0), b"")), ("delete_module", (b"wbsec_none", 0))):
        ret, code = _syscall(name, *args)
        if ret == 0 or code not in (errno.EPERM, errno.EACCES, errno.ENOSYS):
            return True, [f"{name}: got past the permission check ({_err(code)})"]
        notes.append(f"{name}: {_err(code)}")
    return False, notes


@attempt
def use_keyring() -> Outcome:
    """add_key to the process keyring (keyrings are not namespaced)."""
    ret, code = _syscall("add_key", b"user", b"wbsec", b"x", ctypes.c_size_t(1), KEY_SPEC_PROCESS_KEYRING)
    if ret >= 0:
        return True, [f"add_key made key {ret}"]
    return False, [f"add_key: {_err(code)}"]


@attempt
def use_bpf() -> Outcome:
    """bpf(BPF_MAP_CREATE) of a one-entry array map."""
    attr = (ctypes.c_uint32 * 30)(2, 4, 4, 1)  # map_type ARRAY, key_size, value_size, max_entries
    fd, code = _syscall("bpf", 0, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return True, ["bpf(BPF_MAP_CREATE) returned a map"]
    return False, [f"bpf(BPF_MAP_CREATE): {_err(code)}"]


@attempt
def unshare_namespaces() -> Outcome:
    """unshare(CLONE_NEWUSER|CLONE_NEWNS), CLONE_NEWUSER and CLONE_NEWNS, each in a forked child (unshare
    of a user namespace fails in a threaded process), which then tries to mount a tmpfs."""
    notes: Notes = []
    for flags, name in (
        (CLONE_NEWUSER | CLONE_NEWNS, "CLONE_NEWUSER|CLONE_NEWNS"),
        (CLONE_NEWUSER, "CLONE_NEWUSER"),
        (CLONE_NEWNS, "CLONE_NEWNS"),
    ):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report one line and leave without Python's cleanup
            os.close(read_end)
            report = ""
            try:
                if _libc.unshare(flags) != 0:
                    report = f"fail {_err(ctypes.get_errno())}"
                else:
                    report = "ok"
                    if flags & CLONE_NEWNS:
                        target = tempfile.mkdtemp(prefix="wbsec-ns-")
                        code = _mount("wbsec", target, "tmpfs")
                        report += ", then mounted a tmpfs" if code == 0 else f", mount then failed: {_err(code)}"
            except BaseException as exc:  # noqa: BLE001 - the child must always report and exit
                report = f"fail {exc!r}"
            os.write(write_end, report.encode())
            os._exit(0)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as f:
            report = f.read().decode()
        os.waitpid(pid, 0)
        if report.startswith("ok"):
            return True, [f"unshare({name}) {report}"]
        notes.append(f"unshare({name}): {report}")
    return False, notes


@attempt
def open_by_handle() -> Outcome:
    """name_to_handle_at + open_by_handle_at (the "shocker" escape's primitive; needs CAP_DAC_READ_SEARCH)."""
    handle = (ctypes.c_uint8 * (8 + 128))()
    ctypes.cast(handle, ctypes.POINTER(ctypes.c_uint32))[0] = 128  # handle_bytes
    mount_id = ctypes.c_int()
    at_fdcwd = -100
    ret, code = _syscall("name_to_handle_at", at_fdcwd, b"/etc/hostname", handle, ctypes.byref(mount_id), 0)
    if ret != 0:
        return False, [f"name_to_handle_at: {_err(code)}"]
    root = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd, code = _syscall("open_by_handle_at", root, handle, os.O_RDONLY)
    finally:
        os.close(root)
    if fd >= 0:
        os.close(fd)
        return True, ["open_by_handle_at opened a file by its handle"]
    return False, [f"open_by_handle_at: {_err(code)}"]


# ----- network ---------------------------------------------------------------------------------------------


@attempt
def reach_host_loopback(targets: list[list[Any]], token: str, host_netns: str, gateway_port: int = 0) -> Outcome:
    """Connect to services the host runs on its loopback: at 127.0.0.1/::1, through slirp4netns's gateway
    10.0.2.2 (only when this is not the host's network namespace: there it would leave the machine), and at
    the host's other addresses. Succeeds if a greeting with ``token`` comes back."""
    notes: Notes = []
    addresses = [(str(a), int(p)) for a, p in targets]
    own_netns = os.readlink("/proc/self/ns/net")
    if gateway_port and own_netns != host_netns:
        addresses += [("10.0.2.2", gateway_port)]
    elif gateway_port:
        notes.append("10.0.2.2 not tried: this is the host's network namespace")
    for host, port in addresses:
        outcome = connect_for_token(host, port, token)
        if outcome == "token":
            return True, [f"got the host's greeting from {host}:{port} (netns {own_netns})"]
        notes.append(f"{host}:{port}: {outcome}")
    return False, notes


def connect_for_token(host: str, port: int, token: str, timeout: float = 3.0) -> str:
    """'token' if a TCP service at host:port greets with ``token``; else what happened. Never raises."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            data = b""
            while token.encode() not in data and len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as exc:
        return _err(exc) if exc.errno else repr(exc)
    return "token" if token.encode() in data else f"connected, but got {data[:80]!r}"


# ----- resource limits -------------------------------------------------------------------------------------


def fork_until_failure(cap: int, comm: str, ready_file: str | None = None, release_file: str | None = None) -> dict:
    """Fork paused children until fork fails or ``cap`` is reached; write the count to ``ready_file``, wait
    (bounded) for ``release_file``, then kill and reap the children. Returns the count and the failure."""
    import time

    children: list[int] = []
    failure = None
    try:
        while len(children) < cap:
            try:
                pid = os.fork()
            except OSError as exc:
                failure = errno.errorcode.get(exc.errno or 0, str(exc))
                break
            if pid == 0:
                with contextlib.suppress(BaseException):
                    _libc.prctl(15, comm.encode(), 0, 0, 0)  # PR_SET_NAME: the host can count them
                    signal.pause()
                os._exit(0)
            children.append(pid)
        if ready_file:
            with open(ready_file + ".part", "w") as f:
                json.dump({"forked": len(children), "failure": failure}, f)
            os.replace(ready_file + ".part", ready_file)
        if release_file:
            deadline = time.monotonic() + 120
            while not os.path.exists(release_file) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in children:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    return {"forked": len(children), "failure": failure}


def main() -> None:
    """``python escapes.py NAME`` with the keyword arguments as JSON on stdin (not in argv, where a
    process-scanning attempt would find its own marker)."""
    print(json.dumps(run(sys.argv[1], **json.loads(sys.stdin.read() or "{}"))))


if __name__ == "__main__":
    main()
