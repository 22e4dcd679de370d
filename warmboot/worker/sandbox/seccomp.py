"""The seccomp filter every function container runs under, compiled to a BPF program with libseccomp.

The policy is an allowlist modelled on Docker's default profile (moby ``profiles/seccomp/default.json``) for a
container without extra capabilities, and stricter: see :data:`DENIED_BEYOND_DOCKER`. Any syscall not allowed
fails with ``EPERM`` (Docker's default action), so programs see an ordinary "not permitted".

Only the native x86-64 ABI is allowed. libseccomp puts an architecture check at the top of the program whose
action (``SCMP_ACT_KILL_PROCESS`` here) kills a process that makes a 32-bit (``int 0x80``) or x32 syscall:
those ABIs have other syscall numbers, and filtering only x86-64's would leave them open.

libseccomp is used through ctypes, binding the six functions needed: its Python bindings (``seccomp``) are
not on PyPI, only in distribution packages tied to one interpreter, and the shared library is already on
every host that runs CRIU. The kernel gets the program through ``init.c``, which reads what
:func:`export_bpf` returns.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os

from warmboot.errors import HostSetupError

LIBSECCOMP = "libseccomp.so.2"

# Allowed without conditions; Docker's unconditional list, x86-64 names only, minus DENIED_BEYOND_DOCKER.
ALLOWED: tuple[str, ...] = (
    # files and directories
    *("access", "faccessat", "faccessat2", "open", "openat", "openat2", "creat", "close", "close_range"),
    *("read", "readv", "pread64", "preadv", "preadv2", "write", "writev", "pwrite64", "pwritev", "pwritev2"),
    *("lseek", "dup", "dup2", "dup3", "fcntl", "flock", "ioctl", "fsync", "fdatasync", "sync", "syncfs"),
    *("sync_file_range", "fallocate", "fadvise64", "readahead", "truncate", "ftruncate", "copy_file_range"),
    *("sendfile", "splice", "tee", "vmsplice", "stat", "fstat", "lstat", "newfstatat", "statx", "statfs"),
    *("fstatfs", "getdents", "getdents64", "getcwd", "chdir", "fchdir", "chroot", "mkdir", "mkdirat", "rmdir"),
    *("rename", "renameat", "renameat2", "link", "linkat", "unlink", "unlinkat", "symlink", "symlinkat"),
    *("readlink", "readlinkat", "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "fchownat"),
    *("lchown", "umask", "utime", "utimes", "utimensat", "futimesat", "mknod", "mknodat", "cachestat"),
    *("getxattr", "lgetxattr", "fgetxattr", "listxattr", "llistxattr", "flistxattr", "setxattr", "lsetxattr"),
    *("fsetxattr", "removexattr", "lremovexattr", "fremovexattr", "inotify_init", "inotify_init1"),
    *("inotify_add_watch", "inotify_rm_watch", "fanotify_mark", "memfd_create", "memfd_secret"),
    *("io_setup", "io_destroy", "io_submit", "io_cancel", "io_getevents", "io_pgetevents"),
    # polling, events, pipes
    *("select", "pselect6", "poll", "ppoll", "epoll_create", "epoll_create1", "epoll_ctl", "epoll_ctl_old"),
    *("epoll_wait", "epoll_wait_old", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "pipe", "pipe2"),
    *("signalfd", "signalfd4", "timerfd_create", "timerfd_settime", "timerfd_gettime"),
    # memory
    *("brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "mincore", "msync", "mlock", "mlock2"),
    *("mlockall", "munlock", "munlockall", "remap_file_pages", "membarrier", "pkey_alloc", "pkey_free"),
    *("pkey_mprotect", "map_shadow_stack", "mseal"),
    # processes, threads, signals (clone is conditional, below)
    *("fork", "vfork", "execve", "execveat", "exit", "exit_group", "wait4", "waitid", "kill", "tkill", "tgkill"),
    *("pidfd_open", "pidfd_send_signal", "process_mrelease", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn"),
    *("rt_sigpending", "rt_sigsuspend", "rt_sigtimedwait", "rt_sigqueueinfo", "rt_tgsigqueueinfo"),
    *("sigaltstack", "pause", "restart_syscall", "set_tid_address", "set_robust_list", "get_robust_list"),
    *("rseq", "arch_prctl", "prctl", "seccomp", "capget", "capset", "get_thread_area", "set_thread_area"),
    *("futex", "futex_waitv", "futex_wake", "futex_wait", "futex_requeue"),
    *("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self"),
    # identity, sessions, limits, scheduling
    *("getpid", "getppid", "gettid", "getuid", "geteuid", "getgid", "getegid", "getresuid", "getresgid"),
    *("getgroups", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid", "setfsuid"),
    *("setfsgid", "setgroups", "getpgid", "setpgid", "getpgrp", "getsid", "setsid", "getpriority"),
    *("setpriority", "getrlimit", "setrlimit", "prlimit64", "getrusage", "times", "uname", "sysinfo"),
    *("getcpu", "getrandom", "ioprio_get", "ioprio_set", "sched_yield", "sched_getaffinity"),
    *("sched_setaffinity", "sched_getattr", "sched_setattr", "sched_getparam", "sched_setparam"),
    *("sched_getscheduler", "sched_setscheduler", "sched_get_priority_max", "sched_get_priority_min"),
    *("sched_rr_get_interval",),
    # time (reading it, sleeping, timers; setting the clock is denied)
    *("clock_gettime", "clock_getres", "clock_nanosleep", "gettimeofday", "time", "nanosleep", "alarm"),
    *("getitimer", "setitimer", "timer_create", "timer_delete", "timer_settime", "timer_gettime"),
    *("timer_getoverrun",),
    # sockets (socket itself is conditional, below) and System V / POSIX IPC (in the container's IPC namespace)
    *("socketpair", "bind", "listen", "accept", "accept4", "connect", "shutdown", "getsockname", "getpeername"),
    *("getsockopt", "setsockopt", "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg"),
    *("shmget", "shmat", "shmdt", "shmctl", "semget", "semop", "semtimedop", "semctl"),
    *("msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive"),
    *("mq_notify", "mq_getsetattr"),
)

# x86-64 numbers of syscalls newer than some hosts' libseccomp, used when it cannot resolve the name.
_NEWER_X86_64: dict[str, int] = {
    "memfd_secret": 447,
    "process_mrelease": 448,
    "futex_waitv": 449,
    "cachestat": 451,
    "fchmodat2": 452,
    "map_shadow_stack": 453,
    "futex_wake": 454,
    "futex_wait": 455,
    "futex_requeue": 456,
    "mseal": 462,
}

# clone is allowed only without namespace flags: a new user namespace would hand the process every capability
# inside it (and the kernel attack surface that comes with them), the others need CAP_SYS_ADMIN anyway.
CLONE_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x02000000  # CLONE_NEWCGROUP
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
)

# personality: Docker's values only (PER_LINUX, PER_LINUX32, UNAME26 and both, and 0xffffffff which queries).
# Others, such as ADDR_NO_RANDOMIZE or READ_IMPLIES_EXEC, weaken the process's own exploit mitigations.
PERSONALITY_ALLOWED: tuple[int, ...] = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)

AF_VSOCK = 40  # Docker's one refused socket family: it talks to the hypervisor, outside any network namespace

# Denied here although Docker's default profile allows them (for a container without extra capabilities):
DENIED_BEYOND_DOCKER: tuple[str, ...] = (
    "ptrace",  # Docker allows it on kernels >= 4.8; no function debugs another process, and CRIU ptraces ours
    "process_vm_readv",  # same: reading and writing another process's memory
    "process_vm_writev",
    "io_uring_setup",  # io_uring: a long run of kernel CVEs, and its requests bypass this filter
    "io_uring_enter",
    "io_uring_register",
    "name_to_handle_at",  # half of the open_by_handle_at pair; nothing needs a file handle here
    "adjtimex",  # read-only use is harmless, but nothing needs it; setting the clock is denied anyway
    "clock_adjtime",
    "modify_ldt",  # 16-bit segments (Wine, DOS emulators); a source of kernel bugs
)

# Denied by both (listed so that a test can check none creeps into ALLOWED): mounts, namespaces, keyrings,
# BPF, perf, userfaultfd, kexec, modules, file handles, reboot, swap, accounting, the clock, port I/O, quotas.
DENIED: tuple[str, ...] = (
    *DENIED_BEYOND_DOCKER,
    *("mount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick"),
    *("mount_setattr", "unshare", "setns", "clone3", "keyctl", "add_key", "request_key", "bpf"),
    *("perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "init_module", "finit_module"),
    *("delete_module", "open_by_handle_at", "reboot", "swapon", "swapoff", "acct", "settimeofday"),
    *("clock_settime", "iopl", "ioperm", "quotactl", "quotactl_fd", "lookup_dcookie", "kcmp", "pidfd_getfd"),
    *("process_madvise", "syslog", "vhangup", "sethostname", "setdomainname", "fanotify_init", "mbind"),
    *("set_mempolicy", "get_mempolicy", "migrate_pages", "move_pages"),
)

# libseccomp constants (seccomp.h)
_ACT_KILL_PROCESS = 0x80000000
_ACT_ALLOW = 0x7FFF0000
_FLTATR_ACT_BADARCH = 2
_CMP_NE, _CMP_EQ, _CMP_MASKED_EQ = 1, 4, 7


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    """``struct scmp_arg_cmp``: one condition on a syscall argument."""

    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def _library() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBSECCOMP, use_errno=True)
    except OSError as exc:
        raise HostSetupError(
            f"libseccomp not found ({LIBSECCOMP}: {exc}); install the `libseccomp2` package (run `make setup`)"
        ) from exc
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.restype = None
    lib.seccomp_attr_set.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32)
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    )
    lib.seccomp_export_bpf.argtypes = (ctypes.c_void_p, ctypes.c_int)
    return lib


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise HostSetupError(f"libseccomp: {what} failed: {os.strerror(-rc)}")


@functools.cache
def export_bpf() -> bytes:
    """The filter as a raw ``struct sock_filter`` array (8 bytes an instruction), as the init loads it."""
    lib = _library()
    ctx = lib.seccomp_init(_act_errno(errno.EPERM))
    if not ctx:
        raise HostSetupError("libseccomp: seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, _FLTATR_ACT_BADARCH, _ACT_KILL_PROCESS), "setting the bad-arch action")

        def rule(name: str, action: int, *conditions: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                nr = _NEWER_X86_64.get(name, nr)
            if nr < 0:
                raise HostSetupError(f"libseccomp on this host does not know the syscall {name}; upgrade libseccomp2")
            args = (_ArgCmp * max(1, len(conditions)))(*(_ArgCmp(*c) for c in conditions))
            _check(lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), args), f"a rule for {name}")

        for name in ALLOWED:
            rule(name, _ACT_ALLOW)
        rule("clone", _ACT_ALLOW, (0, _CMP_MASKED_EQ, CLONE_NAMESPACE_FLAGS, 0))
        # ENOSYS, not EPERM: glibc (2.34+) then falls back to clone, whose flags this filter can inspect
        # (clone3 passes them in memory, out of a BPF program's reach).
        rule("clone3", _act_errno(errno.ENOSYS))
        for value in PERSONALITY_ALLOWED:
            rule("personality", _ACT_ALLOW, (0, _CMP_EQ, value, 0))
        rule("socket", _ACT_ALLOW, (0, _CMP_NE, AF_VSOCK, 0))

        fd = os.memfd_create("warmboot-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, fd), "exporting the BPF program")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
