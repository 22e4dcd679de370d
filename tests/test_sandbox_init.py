"""The container init (warmboot/worker/sandbox/init.c) on the real kernel: privileges, seccomp, PID 1 duties.

Each probe runs a Python program under the freshly built init inside ``unshare --pid --fork --mount-proc`` and
reports from inside what it holds and which operations the kernel refused. The same probe without the init
(plain root in the same kind of namespace) must be able to do the dangerous things, which shows that the
probe's checks can fail.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from warmboot.errors import HostSetupError
from warmboot.worker.sandbox import capabilities, entry, seccomp

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the init drops privileges only root holds")

# Runs inside the sandbox (or, for the control run, without it) and prints one JSON object.
PROBE = r"""
import ctypes, errno, hashlib, json, mmap, os, signal, socket, struct, subprocess, sys, tempfile, threading

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
scratch = tempfile.mkdtemp(dir=sys.argv[1])


def call(nr, *args):
    # 0 when the syscall succeeded, else its errno
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *args)
    return 0 if r >= 0 else ctypes.get_errno()


def oserror(fn):
    try:
        fn()
        return 0
    except OSError as exc:
        return exc.errno


status = {}
for line in open("/proc/self/status"):
    key, _, value = line.partition(":")
    if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp"):
        status[key] = value.strip()

denied = {}
target = os.path.join(scratch, "mnt")
os.mkdir(target)
denied["mount"] = call(165, b"none", target.encode(), b"tmpfs", ctypes.c_ulong(0), None)
ns_fd = os.open("/proc/self/ns/uts", os.O_RDONLY)
denied["setns"] = call(308, ns_fd, 0)
denied["unshare"] = call(272, 0x00020000)  # CLONE_NEWNS
denied["keyctl"] = call(250, 0, ctypes.c_long(-3), 0)  # KEYCTL_GET_KEYRING_ID of the session keyring
bpf_attr = ctypes.create_string_buffer(struct.pack("IIII", 2, 4, 4, 1), 128)  # a one-entry array map
denied["bpf"] = call(321, 0, bpf_attr, 128)
uring_params = ctypes.create_string_buffer(120)
denied["io_uring_setup"] = call(425, 1, uring_params)
denied["init_module"] = call(175, None, 0, b"")
denied["userfaultfd"] = call(323, 0)
ctypes.set_errno(0)
rc = libc.syscall(ctypes.c_long(56), ctypes.c_ulong(0x10000000 | signal.SIGCHLD), 0, 0, 0, 0)  # CLONE_NEWUSER
if rc == 0:
    os._exit(0)  # the child of a clone that should have been refused
if rc > 0:
    os.waitpid(rc, 0)
denied["clone_newuser"] = 0 if rc > 0 else ctypes.get_errno()
denied["clone3"] = call(435, None, 0)
denied["personality_no_aslr"] = call(135, ctypes.c_ulong(0x0040000))
call(135, ctypes.c_ulong(0))
denied["raw_socket"] = oserror(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
denied["mknod_block"] = oserror(lambda: os.mknod(os.path.join(scratch, "loop"), 0o600 | 0o060000, os.makedev(7, 0)))

r, w = os.pipe()
victim = os.fork()
if victim == 0:
    os.close(w)
    os.read(r, 1)
    os._exit(0)
os.close(r)
denied["ptrace_attach"] = call(101, 16, victim, 0, 0)  # PTRACE_ATTACH
if denied["ptrace_attach"] == 0:
    os.waitpid(victim, os.WUNTRACED)
    call(101, 17, victim, 0, 0)  # PTRACE_DETACH
os.close(w)
os.waitpid(victim, 0)

work = {}
work["personality_query"] = call(135, ctypes.c_ulong(0xFFFFFFFF))
results = []
threads = [threading.Thread(target=lambda i=i: results.append(sum(range(i * 1000)))) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
work["threads"] = 0 if sorted(results) == sorted(sum(range(i * 1000)) for i in range(4)) else -1
out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
work["subprocess"] = 0 if out.stdout == "42\n" else -1
pid = os.fork()
if pid == 0:
    os.execv("/bin/sh", ["sh", "-c", "exit 5"])
work["fork_exec"] = 0 if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 5 else -1
server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname())
conn, _ = server.accept()
client.sendall(b"ping")
work["inet_stream"] = 0 if conn.recv(4) == b"ping" else -1
for s in (client, conn, server):
    s.close()
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
a.sendall(b"pong")
work["unix_stream"] = 0 if b.recv(4) == b"pong" else -1
m = mmap.mmap(-1, 1 << 20)
m[-4:] = b"abcd"
work["mmap"] = 0 if m[-4:] == b"abcd" else -1
digest = hashlib.sha256(b"abc").hexdigest()
work["compute"] = 0 if digest.startswith("ba7816bf") and sum(range(10**6)) == 499999500000 else -1
fifo = os.path.join(scratch, "fifo")
work["mkfifo"] = oserror(lambda: os.mkfifo(fifo))

print(json.dumps({"status": status, "denied": denied, "work": work}))
"""


@pytest.fixture(scope="module")
def init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The init built from the working tree's init.c by the set-up script (into a private path)."""
    out = tmp_path_factory.mktemp("init") / "warmboot-init"
    env = {**os.environ, "WARMBOOT_INIT": str(out)}
    subprocess.run(["bash", str(ROOT / "scripts/build-init.sh")], env=env, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def bpf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seccomp") / "seccomp.bpf"
    path.write_bytes(seccomp.export_bpf())
    return path


def run_init(init: Path, bpf: Path, *program: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The init as PID 1 of a fresh PID namespace, running ``program``."""
    argv = entry.command(list(program), init=str(init), seccomp=str(bpf))
    return subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", *argv], capture_output=True, text=True, timeout=timeout
    )


def probe(prefix: list[str], scratch: Path) -> dict:
    script = scratch / "probe.py"
    script.write_text(PROBE)
    out = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", *prefix, PYTHON, "-S", str(script), str(scratch)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def sandboxed(init: Path, bpf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    prefix = entry.command([], init=str(init), seccomp=str(bpf))
    return probe(prefix, tmp_path_factory.mktemp("sandboxed"))


@pytest.fixture(scope="module")
def unsandboxed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return probe([], tmp_path_factory.mktemp("unsandboxed"))


def test_export_bpf_is_a_cached_sock_filter_array() -> None:
    program = seccomp.export_bpf()
    assert program and len(program) % 8 == 0  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k
    assert seccomp.export_bpf() is program
    # The first instruction loads the architecture (offset 4 of struct seccomp_data) for the arch check.
    code, _jt, _jf, k = struct.unpack_from("HBBI", program)
    assert (code, k) == (0x20, 4)  # BPF_LD | BPF_W | BPF_ABS, seccomp_data.arch
    assert not set(seccomp.ALLOWED) & set(seccomp.DENIED)


AUDIT_ARCH_X86_64, AUDIT_ARCH_I386 = 0xC000003E, 0x40000003
RET_ALLOW, RET_KILL_PROCESS = 0x7FFF0000, 0x80000000


def ret_errno(code: int) -> int:
    return 0x00050000 | code


def run_filter(program: bytes, nr: int, args: tuple[int, ...] = (), arch: int = AUDIT_ARCH_X86_64) -> int:
    """What the kernel would do: a classic-BPF interpreter for the instructions libseccomp emits."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack_from("<HBBI", program, off) for off in range(0, len(program), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            acc &= k
        elif code == 0x05:  # BPF_JMP | BPF_JA
            pc += k
        elif code in (0x15, 0x25, 0x35, 0x45):  # BPF_JMP | JEQ, JGT, JGE, JSET with K
            test = {0x15: acc == k, 0x25: acc > k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if test else jf
        elif code == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"unexpected BPF opcode {code:#x}")


def syscall_number(name: str) -> int:
    lib = seccomp._library()
    nr = lib.seccomp_syscall_resolve_name(name.encode())
    return nr if nr >= 0 else seccomp._NEWER_X86_64[name]


def test_filter_decisions_for_every_listed_syscall() -> None:
    """Every syscall of the allowlist passes, every denied one answers EPERM (clone3: ENOSYS), other ABIs die."""
    program = seccomp.export_bpf()
    wrong = {name: hex(run_filter(program, syscall_number(name))) for name in seccomp.ALLOWED}
    assert {name: v for name, v in wrong.items() if int(v, 16) != RET_ALLOW} == {}
    expected = {name: ret_errno(errno.ENOSYS if name == "clone3" else errno.EPERM) for name in seccomp.DENIED}
    assert {name: run_filter(program, syscall_number(name)) for name in seccomp.DENIED} == expected
    clone, personality, socket_nr = (syscall_number(n) for n in ("clone", "personality", "socket"))
    assert run_filter(program, clone, (0x01200011,)) == RET_ALLOW  # glibc's fork()
    assert run_filter(program, clone, (0x003D0F00,)) == RET_ALLOW  # glibc's pthread_create fallback
    for flag in (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000):
        assert run_filter(program, clone, (0x01200011 | flag,)) == ret_errno(errno.EPERM), hex(flag)
    assert run_filter(program, personality, (0xFFFFFFFF,)) == RET_ALLOW
    assert run_filter(program, personality, (0x0040000,)) == ret_errno(errno.EPERM)  # ADDR_NO_RANDOMIZE
    assert run_filter(program, socket_nr, (2, 1, 0)) == RET_ALLOW
    assert run_filter(program, socket_nr, (seccomp.AF_VSOCK, 1, 0)) == ret_errno(errno.EPERM)
    assert run_filter(program, 1000) == ret_errno(errno.EPERM)  # unknown numbers: the default action
    assert run_filter(program, 4, arch=AUDIT_ARCH_I386) == RET_KILL_PROCESS  # 32-bit ABI: killed
    assert run_filter(program, 0x40000000 | 39) == RET_KILL_PROCESS  # x32 ABI (getpid): killed


def test_capability_set_excludes_the_forbidden_ones() -> None:
    assert not set(capabilities.ALLOWED) & set(capabilities.FORBIDDEN)
    assert not set(capabilities.ALLOWED) & {"mknod", "net_raw"}


def test_init_is_static(init: Path) -> None:
    """No program interpreter (PT_INTERP): it runs in images without a libc or with another one."""
    data = init.read_bytes()
    assert data[:4] == b"\x7fELF"
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    types = [struct.unpack_from("<I", data, phoff + i * phentsize)[0] for i in range(phnum)]
    assert 3 not in types, "warmboot-init is dynamically linked"


def test_program_holds_exactly_the_allowed_capabilities(sandboxed: dict) -> None:
    status = sandboxed["status"]
    want = capabilities.mask()
    for key in ("CapEff", "CapPrm", "CapBnd", "CapInh"):
        assert int(status[key], 16) == want, (key, status[key], hex(want))
    assert int(status["CapAmb"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"  # SECCOMP_MODE_FILTER


def test_dangerous_operations_fail(sandboxed: dict) -> None:
    denied = sandboxed["denied"]
    expected = {name: errno.EPERM for name in denied}
    expected["clone3"] = errno.ENOSYS  # so that libc falls back to clone, whose flags the filter checks
    assert {name: errno.errorcode.get(e, e) for name, e in denied.items()} == {
        name: errno.errorcode[e] for name, e in expected.items()
    }


def test_the_probe_sees_a_missing_sandbox(unsandboxed: dict) -> None:
    """Without the init, the same probe holds every capability and its dangerous operations succeed."""
    assert unsandboxed["status"]["Seccomp"] == "0"
    assert int(unsandboxed["status"]["CapEff"], 16) & capabilities.mask(capabilities.FORBIDDEN)
    denied = unsandboxed["denied"]
    succeeded = {"mount", "setns", "unshare", "keyctl", "raw_socket", "mknod_block", "ptrace_attach"}
    succeeded.add("personality_no_aslr")
    assert {name: denied[name] for name in succeeded} == dict.fromkeys(succeeded, 0)
    assert denied["clone3"] != errno.ENOSYS


def test_ordinary_work_still_works(sandboxed: dict) -> None:
    assert sandboxed["work"] == dict.fromkeys(sandboxed["work"], 0)


@pytest.mark.parametrize(
    ("code", "status"),
    [("raise SystemExit(7)", 7), ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", 128 + 9)],
)
def test_exit_status_is_the_programs(init: Path, bpf: Path, code: str, status: int) -> None:
    out = run_init(init, bpf, PYTHON, "-S", "-c", code)
    assert out.returncode == status, out.stderr


def test_signals_are_forwarded_to_the_program(init: Path, bpf: Path) -> None:
    # SIGTERM is blocked, then waited for: a Python-level handler around a blocking read would race (a signal
    # handled just before the read() system call starts leaves the read blocked, and the handler unrun).
    code = (
        "import signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})\n"
        "print('ready', flush=True)\n"
        "signal.sigwait({signal.SIGTERM})\n"
        "sys.exit(3)\n"
    )
    argv = entry.command([PYTHON, "-S", "-c", code], init=str(init), seccomp=str(bpf))
    with subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", *argv],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        # unshare --fork's only child is the init (PID 1 inside); signal it from the host, as the worker does.
        (init_pid,) = map(int, Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
        os.kill(init_pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 3, proc.stderr.read() if proc.stderr else ""


ORPHAN = r"""
import os, select, signal
r, w = os.pipe()
report_r, report_w = os.pipe()
a = os.fork()
if a == 0:
    b = os.fork()
    if b == 0:
        os.close(w)
        os.read(r, 1)  # until the probe closes its end
        os._exit(0)
    os.write(report_w, str(b).encode())
    os._exit(0)
os.close(report_w)
os.waitpid(a, 0)
b = int(os.read(report_r, 32))
parent = open(f"/proc/{b}/stat").read().rsplit(")", 1)[1].split()[1]
assert parent == "1", parent  # the orphan now belongs to the init
pidfd = os.pidfd_open(b)
os.close(r)
os.close(w)
assert select.select([pidfd], [], [], 30)[0], "the orphan did not exit"
# A round trip through the init: it reaps whatever it can on every wake-up, before forwarding the signal.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
os.kill(1, signal.SIGUSR1)
assert signal.sigtimedwait({signal.SIGUSR1}, 30) is not None, "the init did not forward SIGUSR1"
try:
    state = open(f"/proc/{b}/stat").read().rsplit(")", 1)[1].split()[0]
except FileNotFoundError:
    state = "reaped"
print(state)
"""


def test_orphans_are_reaped(init: Path, bpf: Path) -> None:
    out = run_init(init, bpf, PYTHON, "-S", "-c", ORPHAN)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "reaped\n"


def test_control_pipe_sees_eof_when_the_program_closes_it(init: Path, bpf: Path) -> None:
    """The init holds no fd but stdio, so the owner's control pipe closes with the program's copy."""
    r, w = os.pipe()
    code = f"import os, sys; os.close({w}); print('closed', flush=True); sys.stdin.read()"
    # Run directly (no unshare, which would hold its own copy of the pipe); PID 1 or not, fds are the same.
    argv = entry.command([PYTHON, "-S", "-c", code], init=str(init), seccomp=str(bpf))
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(w,), text=True) as proc:
        os.close(w)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "closed\n"
            assert select.select([r], [], [], 30)[0], "no EOF: someone still holds the write end"
            assert os.read(r, 1) == b""
        finally:
            os.close(r)
            proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_runs_in_an_empty_root(init: Path, bpf: Path, tmp_path: Path) -> None:
    """Nothing but the kernel: no libc, no /proc. The init runs a second init there, which reports."""
    (tmp_path / "init").write_bytes(init.read_bytes())
    (tmp_path / "init").chmod(0o755)
    (tmp_path / "seccomp.bpf").write_bytes(bpf.read_bytes())
    inner = entry.command(["/nowhere"], init="/init", seccomp="/seccomp.bpf")
    out = subprocess.run(
        ["chroot", str(tmp_path), *entry.command(inner, init="/init", seccomp="/seccomp.bpf")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 127, out.stderr
    assert out.stderr == "warmboot-init: cannot run /nowhere: No such file or directory\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seccomp", "/nonexistent.bpf", "--caps", "chown", "--", "true"], "cannot read seccomp file"),
        (["--seccomp", "{bpf}", "--caps", "chown,sys_adminx", "--", "true"], "unknown capability 'sys_adminx'"),
        (["--seccomp", "{bpf}", "--caps", "chown"], "usage: warmboot-init"),
    ],
)
def test_setup_errors_exit_125_with_one_line(init: Path, bpf: Path, argv: list[str], message: str) -> None:
    out = subprocess.run([str(init), *(a.format(bpf=bpf) for a in argv)], capture_output=True, text=True, timeout=30)
    assert out.returncode == entry.SETUP_FAILED
    assert message in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_caps_none_drops_every_capability(init: Path, bpf: Path) -> None:
    code = "print(*(l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))))"
    out = subprocess.run(
        [str(init), "--seccomp", str(bpf), "--caps", "none", "--", PYTHON, "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (out.returncode, out.stdout) == (0, "0000000000000000 0000000000000000\n"), out.stderr


def test_init_binary_names_make_setup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(entry, "INIT_BINARY", tmp_path / "missing")
    with pytest.raises(HostSetupError, match="make setup"):
        entry.init_binary()
