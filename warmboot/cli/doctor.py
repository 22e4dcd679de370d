"""``warmboot doctor``: check that this host can checkpoint and restore containers with CRIU.

Each check is a plain function returning a :class:`CheckResult`, so tests (and other commands) can call
them directly; :func:`doctor` only runs them, renders one table row each and sets the exit code.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from warmboot import config
from warmboot.cli.tables import Col, fit_table
from warmboot.errors import HostSetupError
from warmboot.worker import criu

CAP_SYS_ADMIN = 21
CAP_CHECKPOINT_RESTORE = 40
MIN_KERNEL = (5, 9)
MIN_FREE_BYTES = 2 << 30
GIB = 1 << 30
_TIMEOUT_S = 60

# userfaultfd(2) syscall numbers by machine; others fall back to /dev/userfaultfd.
_USERFAULTFD_NR = {"x86_64": 323, "aarch64": 282, "arm64": 282}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one host check.

    ``required`` checks make ``warmboot doctor`` exit 1 when they fail; the others only warn.
    ``fix`` says what to do about a failure (empty when there is nothing to do).
    """

    name: str
    ok: bool
    required: bool
    detail: str
    fix: str = ""

    @property
    def status(self) -> str:
        """``OK``, ``FAIL`` (a required check failed) or ``WARN`` (an optional one did)."""
        if self.ok:
            return "OK"
        return "FAIL" if self.required else "WARN"


def _first_line(text: str) -> str:
    """The first non-blank line of ``text``, or ``""``."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def check_privileges(status_file: Path = Path("/proc/self/status")) -> CheckResult:
    """Root, with CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE effective (read from ``CapEff``)."""
    name = "root / capabilities"
    fix = (
        "run as root: sudo warmboot ... (in a container: --privileged, or add CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE)"
    )
    try:
        text = status_file.read_text()
    except OSError as exc:
        return CheckResult(name, False, True, f"cannot read {status_file}: {exc}", fix)
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", text, re.MULTILINE)
    if not match:
        return CheckResult(name, False, True, f"no CapEff line in {status_file}", fix)
    cap_eff = int(match.group(1), 16)
    wanted = {"CAP_SYS_ADMIN": CAP_SYS_ADMIN, "CAP_CHECKPOINT_RESTORE": CAP_CHECKPOINT_RESTORE}
    missing = [cap for cap, bit in wanted.items() if not cap_eff >> bit & 1]
    detail = f"uid {os.geteuid()}, CapEff {cap_eff:#x}"
    if missing:
        return CheckResult(name, False, True, f"{detail}; missing {', '.join(missing)}", fix)
    return CheckResult(name, True, True, f"{detail}; has CAP_SYS_ADMIN and CAP_CHECKPOINT_RESTORE")


def parse_kernel_release(release: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a kernel release such as ``6.18.44-fc-v657``, or ``None`` if unparsable."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_kernel(release: str | None = None) -> CheckResult:
    """Kernel release >= 5.9 (CRIU needs clone3 with set_tid, pidfds and CAP_CHECKPOINT_RESTORE)."""
    name = "kernel"
    release = platform.release() if release is None else release
    version = parse_kernel_release(release)
    need = ".".join(map(str, MIN_KERNEL))
    why = f"CRIU needs >= {need} for clone3(set_tid), pidfds and CAP_CHECKPOINT_RESTORE"
    if version is None:
        return CheckResult(name, False, True, f"{release}: cannot parse the version; {why}", "")
    if version < MIN_KERNEL:
        return CheckResult(name, False, True, f"{release} < {need}; {why}", f"boot a Linux kernel >= {need}")
    return CheckResult(name, True, True, f"{release} (>= {need}, needed for clone3(set_tid) and pidfds)")


def _criu_path() -> Path:
    """The CRIU binary, resolved on PATH when it is a bare name; raises :class:`HostSetupError`."""
    path = criu.binary()
    if not path.is_absolute():
        found = shutil.which(str(path))
        if found is None:
            raise HostSetupError(f"no `{path}` on PATH and none installed at {config.DEFAULT_CRIU}")
        path = Path(found)
    return path


def check_criu_binary() -> CheckResult:
    """Which CRIU binary warmboot runs (``WARMBOOT_CRIU``, the set-up one, or PATH) and its version."""
    name = "criu binary"
    fix = "make setup (or set WARMBOOT_CRIU to a working criu)"
    try:
        path = _criu_path()
        version = criu.version()
    except HostSetupError as exc:
        return CheckResult(name, False, True, str(exc), fix)
    return CheckResult(name, True, True, f"{path} (version {version})")


def check_criu_check() -> CheckResult:
    """``criu check`` exits 0 on this kernel; on failure shows CRIU's first error line."""
    name = "criu check"
    fix = "make setup (installs a CRIU that passes `criu check` on this kernel)"
    try:
        path = _criu_path()
    except HostSetupError as exc:
        return CheckResult(name, False, True, f"not run: {exc}", fix)
    try:
        proc = subprocess.run(
            [str(path), "check"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult(name, False, True, f"cannot run {path} check: {exc}", fix)
    output = f"{proc.stderr}\n{proc.stdout}"
    if proc.returncode != 0:
        errors = [line.strip() for line in output.splitlines() if "error" in line.lower()]
        first = errors[0] if errors else _first_line(output) or "(no output)"
        return CheckResult(name, False, True, f"exit {proc.returncode}: {first}", fix)
    return CheckResult(name, True, True, _first_line(proc.stdout) or "passed")


def check_userfaultfd() -> CheckResult:
    """userfaultfd(2) works (for lazy page restore later); optional."""
    name = "userfaultfd"
    fix = "optional (lazy restore): as root it needs CONFIG_USERFAULTFD; else sysctl vm.unprivileged_userfaultfd=1"
    nr = _USERFAULTFD_NR.get(platform.machine())
    if nr is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd >= 0:
            os.close(fd)
            return CheckResult(name, True, False, "userfaultfd(2) syscall works")
        err = ctypes.get_errno()
        syscall_detail = f"userfaultfd(2) failed: {errno.errorcode.get(err, err)} ({os.strerror(err)})"
    else:
        syscall_detail = f"no userfaultfd(2) syscall number known for {platform.machine()}"
    try:
        os.close(os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return CheckResult(name, False, False, f"{syscall_detail}; /dev/userfaultfd: {exc.strerror}", fix)
    return CheckResult(name, True, False, f"{syscall_detail}, but /dev/userfaultfd opens")


def check_namespaces() -> CheckResult:
    """A process can get the namespaces every container has (PID, mount, network, IPC, UTS)."""
    name = "namespaces"
    cmd = ["unshare", "--pid", "--fork", "--mount", "--net", "--ipc", "--uts", "true"]
    fix = "run as root on a host (or --privileged container) that allows new PID, mount, net, IPC and UTS namespaces"
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        return CheckResult(name, False, True, "no `unshare` on PATH", "make setup (installs util-linux)")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return CheckResult(name, False, True, f"cannot run {' '.join(cmd)}: {exc}", fix)
    if proc.returncode != 0:
        why = _first_line(proc.stderr) or f"exit {proc.returncode}"
        return CheckResult(name, False, True, f"`{' '.join(cmd)}` failed: {why}", fix)
    return CheckResult(name, True, True, f"`{' '.join(cmd)}` works")


def check_overlayfs(filesystems: Path = Path("/proc/filesystems")) -> CheckResult:
    """The kernel has overlayfs: every container's root filesystem is an overlay of its image's layers."""
    name = "overlayfs"
    try:
        known = {line.split()[-1] for line in filesystems.read_text().splitlines() if line.strip()}
    except OSError as exc:
        return CheckResult(name, False, True, f"cannot read {filesystems}: {exc}", "run on Linux with /proc mounted")
    if "overlay" not in known:
        subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
        known = {line.split()[-1] for line in filesystems.read_text().splitlines() if line.strip()}
    if "overlay" not in known:
        return CheckResult(name, False, True, "the kernel lists no overlay filesystem", "modprobe overlay")
    return CheckResult(name, True, True, "overlay filesystem available")


def check_sandbox_tools() -> CheckResult:
    """The programs containers and image builds need: the container init, slirp4netns, bwrap, mmdebstrap."""
    from warmboot.worker.sandbox import entry

    name = "sandbox tools"
    missing = [tool for tool in ("slirp4netns", "bwrap", "mmdebstrap", "ip") if shutil.which(tool) is None]
    if not entry.INIT_BINARY.is_file():
        missing.append(str(entry.INIT_BINARY))
    if missing:
        return CheckResult(name, False, True, "missing: " + ", ".join(missing), "make setup")
    return CheckResult(name, True, True, f"container init at {entry.INIT_BINARY}; slirp4netns, bwrap, mmdebstrap")


def check_cgroups(mounts_file: Path = Path("/proc/self/mounts"), root: Path = Path("/sys/fs/cgroup")) -> CheckResult:
    """Which cgroup layout is mounted (v2 unified, v1 hybrid or v1 legacy) and whether a memory controller is."""
    name = "cgroups"
    fix = "optional (memory limits): mount a cgroup2 hierarchy with the memory controller, or cgroup v1 memory"
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError as exc:
        return CheckResult(name, False, False, f"cannot read {mounts_file}: {exc}", fix)
    v1_memory: str | None = None
    v2_mounts: list[str] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = fields[1], fields[2], fields[3].split(",")
        if fstype == "cgroup2":
            v2_mounts.append(mountpoint)
        elif fstype == "cgroup" and "memory" in options:
            v1_memory = mountpoint
    if str(root) in v2_mounts:
        layout = f"cgroup v2 unified at {root}"
        try:
            controllers = (root / "cgroup.controllers").read_text().split()
        except OSError:
            controllers = []
        has_memory = "memory" in controllers
        where = f"memory controller in {root / 'cgroup.controllers'}"
    else:
        layout = "cgroup v1 hybrid" if v2_mounts else "cgroup v1 legacy"
        if v2_mounts:
            layout += f" (cgroup2 at {', '.join(v2_mounts)})"
        has_memory = v1_memory is not None
        where = f"memory controller at {v1_memory}"
    if not v2_mounts and v1_memory is None:
        return CheckResult(name, False, False, f"no cgroup hierarchy mounted under {root}", fix)
    if not has_memory:
        return CheckResult(name, False, False, f"{layout}; no memory controller", fix)
    return CheckResult(name, True, False, f"{layout}; {where}")


def _nearest_existing(path: Path) -> Path:
    """``path`` itself if it exists, else its nearest existing parent."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(path: Path | None = None, min_free_bytes: int = MIN_FREE_BYTES) -> CheckResult:
    """At least ``min_free_bytes`` free where snapshots live (``path``, default the snapshots directory)."""
    name = "snapshot disk"
    target = config.snapshots_dir() if path is None else path
    existing = _nearest_existing(target)
    try:
        free = shutil.disk_usage(existing).free
    except OSError as exc:
        return CheckResult(name, False, True, f"cannot stat {existing}: {exc}", "check the disk is mounted")
    where = str(target) if existing == target.absolute() else f"{target} (measured at {existing})"
    detail = f"{free / GIB:.1f} GiB free at {where}"
    if free < min_free_bytes:
        need = f"{min_free_bytes / GIB:.1f} GiB"
        fix = f"free up space (need >= {need}) or set WARMBOOT_HOME to a bigger disk"
        return CheckResult(name, False, True, f"{detail}; need >= {need}", fix)
    return CheckResult(name, True, True, detail)


def check_hugepages(setting: Path = Path("/sys/kernel/mm/transparent_hugepage/enabled")) -> CheckResult:
    """Transparent huge pages: 'always' lets a restore fill memory in 2 MB pages (optional tuning)."""
    name = "transparent hugepages"
    try:
        text = setting.read_text()
    except OSError as exc:
        return CheckResult(name, False, False, f"cannot read {setting}: {exc}", "optional")
    mode = text[text.index("[") + 1 : text.index("]")] if "[" in text else text.strip()
    if mode == "always":
        return CheckResult(name, True, False, "always: restores fill memory in 2 MB pages")
    return CheckResult(
        name,
        False,
        False,
        f"{mode}: restores fault memory in 4 KB pages (measured here: an Embedder restore took 272 ms, "
        "159 ms with 'always')",
        f"optional, host-wide: echo always > {setting}",
    )


CHECKS: list[Callable[[], CheckResult]] = [
    check_privileges,
    check_kernel,
    check_criu_binary,
    check_criu_check,
    check_userfaultfd,
    check_namespaces,
    check_overlayfs,
    check_sandbox_tools,
    check_cgroups,
    check_hugepages,
    check_disk,
]


def run_checks() -> list[CheckResult]:
    """Run every check in :data:`CHECKS`, in order."""
    return [check() for check in CHECKS]


_STYLE = {"OK": "bold green", "FAIL": "bold red", "WARN": "bold yellow"}


#: Every column is kept: the check and its status on one line, what was found and the fix wrapped.
DOCTOR_COLUMNS = [Col("Check"), Col("Status"), Col("Detail", wrap=True), Col("Fix", wrap=True)]


def doctor_table(results: list[CheckResult], *, width: int) -> Table:
    """The table of the results, fitted to ``width`` terminal columns."""
    cells = [[r.name, f"[{_STYLE[r.status]}]{r.status}[/]", r.detail, "" if r.ok else r.fix] for r in results]
    return fit_table(
        DOCTOR_COLUMNS, cells, width=width, command="warmboot doctor", title="warmboot doctor", title_justify="left"
    )


def render(results: list[CheckResult], console: Console) -> None:
    """Print the results as one table, then a one-line summary."""
    console.print(doctor_table(results, width=console.width), markup=True, highlight=False)
    failed = [r.name for r in results if r.status == "FAIL"]
    warned = [r.name for r in results if r.status == "WARN"]
    warn_text = f", {len(warned)} warning(s): {', '.join(warned)}" if warned else ""
    if failed:
        console.print(
            f"[bold red]{len(failed)} required check(s) failed: {', '.join(failed)}[/]{warn_text}. "
            "This host cannot run warmboot until they are fixed.",
            highlight=False,
        )
    else:
        console.print(
            f"[bold green]All {sum(r.required for r in results)} required checks passed[/]{warn_text}. "
            "This host is ready for warmboot.",
            highlight=False,
        )


def doctor() -> None:
    """Check that this host can snapshot and restore containers with CRIU.

    Prints one row per check, with a fix for each failure:
    root and capabilities, kernel >= 5.9, the CRIU binary and version, `criu check`,
    userfaultfd (optional), PID and mount namespaces, cgroups (optional),
    and >= 2 GiB free where snapshots live ($WARMBOOT_HOME/snapshots).

    Exits 1 if a required check failed (FAIL), else 0; optional checks only WARN.

    Examples:

        [cyan]sudo warmboot doctor[/cyan]

        [cyan]WARMBOOT_CRIU=/usr/sbin/criu warmboot doctor[/cyan]   (check another CRIU binary)
    """
    results = run_checks()
    render(results, Console())
    if any(r.status == "FAIL" for r in results):
        raise typer.Exit(code=1)
