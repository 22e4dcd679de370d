"""Security tests: escape attempts from inside deployed functions, on real containers, each of which must fail.

The attempts live in tests/children/escapes.py. Each runs twice:
- on the host, as root, outside any container (``test_attempt_succeeds_on_the_host``): the dangerous ones must
  succeed there, which proves that the attempt really tries and that its container twin cannot pass vacuously;
- inside a deployed function (``test_escape_fails_in_a_container``): it must fail, with the reason in its detail.

Then the properties that need more than one process: no network during the snapshot phase but outbound
network after START (a TCP service in a network namespace this module creates), ``block_network=True``,
a fork bomb and a memory hog that harm only their own container, the filesystem a function sees, and
snapshots that keep working with an extra filesystem mounted on the host and with WARMBOOT_HOME on a tmpfs.

Traffic goes only to loopback and to the network namespace created here. Every process, mount, cgroup and
namespace made here is removed in a finalizer, also when a test fails.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from platform_helpers import Platform

ID = uuid.uuid4().hex[:8]
CHILDREN = Path(__file__).parent / "children"
ESCAPES_FILE = CHILDREN / "escapes.py"
REPO = Path(__file__).resolve().parents[1]

_spec = importlib.util.spec_from_file_location("escapes", ESCAPES_FILE)
assert _spec is not None and _spec.loader is not None
escapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(escapes)

#: The attempts, in the order they run. Every one must fail in a container.
ATTEMPTS = [
    "read_host_file",
    "write_host_files",
    "read_warmboot_home",
    "connect_server_socket",
    "see_host_process",
    "signal_host_process",
    "ptrace_outside",
    "mount_anything",
    "cgroup_release_agent",
    "raw_socket",
    "hold_forbidden_capabilities",
    "run_without_no_new_privs",
    "run_without_seccomp",
    "change_cgroup_limits",
    "reach_host_loopback",
    "write_proc_knobs",
    "mknod_block_device",
    "read_host_disk",
    "load_kernel_module",
    "use_keyring",
    "use_bpf",
    "unshare_namespaces",
    "open_by_handle",
]
assert sorted(ATTEMPTS) == sorted(escapes.ATTEMPTS), "every attempt in escapes.py runs here"


# ----- host-side fixtures --------------------------------------------------------------------------------------


class GreetingServer:
    """TCP listeners that greet every connection with a token and close it (one thread per listener)."""

    def __init__(self, token: str, addresses: list[str]) -> None:
        self.token = token
        self.listeners: list[socket.socket] = []
        self.port = 0
        for address in addresses:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            try:
                listener = socket.create_server((address, self.port), family=family, backlog=64)
            except OSError:
                continue  # no ::1 on this host
            self.port = listener.getsockname()[1]
            self.listeners.append(listener)
            threading.Thread(target=self._serve, args=(listener,), daemon=True).start()
        self.addresses = [s.getsockname()[0] for s in self.listeners]

    def _serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            with contextlib.suppress(OSError), conn:
                conn.sendall(f"hello {self.token}\n".encode())

    def close(self) -> None:
        for s in self.listeners:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@dataclass
class HostWorld:
    """What the attempts aim at on the host."""

    dir: Path  # under /var/tmp: outside every container's mounts
    token: str
    canary: Path
    root_dir: Path  # a directory under /root that only the host has
    greeting: GreetingServer
    abstract_name: str
    host_addresses: list[str]
    runner_cgroups: list[str]
    host_netns: str
    init_identity: list[str] | None
    disk: tuple[int, int, list[str]]
    cleanups: list[Any] = field(default_factory=list)


def _host_addresses() -> list[str]:
    """The host's global addresses other than loopback (``ip -j addr``)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout
    found = []
    for iface in json.loads(out):
        if iface.get("ifname") == "lo":
            continue
        found += [a["local"] for a in iface.get("addr_info", []) if a.get("scope") == "global"]
    return found


def _root_disk() -> tuple[int, int, list[str]]:
    """(major, minor, [device names]) of the block device holding the host's root filesystem."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == "/":
            major, minor = (int(x) for x in fields[2].split(":"))
            if major != 0:
                uevent = Path(f"/sys/dev/block/{major}:{minor}/uevent")
                names = [
                    line.split("=", 1)[1] for line in uevent.read_text().splitlines() if line.startswith("DEVNAME=")
                ]
                return major, minor, names
    for disk in sorted(Path("/sys/block").iterdir()):  # an overlay or virtual root: the first real disk
        if not disk.name.startswith(("loop", "ram", "zram")):
            major, minor = (int(x) for x in (disk / "dev").read_text().split(":"))
            return major, minor, [disk.name]
    pytest.skip("no block device on this host")


@pytest.fixture(scope="module")
def world() -> Iterator[HostWorld]:
    token = f"wbsec-{uuid.uuid4().hex}"
    base = Path(f"/var/tmp/wbsec-{ID}")
    base.mkdir(mode=0o700)
    canary = base / "canary.txt"
    canary.write_text(f"host canary {token}\n")
    root_dir = Path(f"/root/wbsec-{ID}")
    root_dir.mkdir()
    greeting = GreetingServer(token, ["127.0.0.1", "::1"])
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract_name = f"warmboot-wbsec-{ID}"
    abstract.bind(b"\0" + abstract_name.encode())
    abstract.listen(16)
    runner = sorted({line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()} - {"/"})
    w = HostWorld(
        dir=base,
        token=token,
        canary=canary,
        root_dir=root_dir,
        greeting=greeting,
        abstract_name=abstract_name,
        host_addresses=_host_addresses(),
        runner_cgroups=runner,
        host_netns=os.readlink("/proc/self/ns/net"),
        init_identity=escapes._identity(1),
        disk=_root_disk(),
    )
    try:
        yield w
    finally:
        greeting.close()
        abstract.close()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(root_dir, ignore_errors=True)


@dataclass
class Sleeper:
    """A host process with a unique argv[0], for the attempts to look for, signal and trace."""

    proc: subprocess.Popen[bytes]
    marker: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture
def sleeper() -> Iterator[Sleeper]:
    marker = f"wbsec-sleeper-{uuid.uuid4().hex[:12]}"
    proc = subprocess.Popen([marker, "600"], executable=shutil.which("sleep"), stdin=subprocess.DEVNULL)
    try:
        yield Sleeper(proc, marker)
    finally:
        proc.kill()
        proc.wait()


def _kwargs(name: str, w: HostWorld, sleeper: Sleeper, *, home: Path, secret: str, socket_path: Path) -> dict:
    """The keyword arguments of attempt ``name`` against ``w``."""
    write_token = uuid.uuid4().hex
    port = w.greeting.port
    per_attempt: dict[str, dict[str, Any]] = {
        "read_host_file": {"path": str(w.canary), "token": w.token},
        "write_host_files": {
            "create": [
                str(w.dir / f"created-{write_token}"),
                str(w.root_dir / f"created-{write_token}"),
                str(home / f"created-{write_token}"),
            ],
            "append": [str(w.canary)],
            "token": write_token,
        },
        "read_warmboot_home": {"home": str(home), "secret_value": secret},
        "connect_server_socket": {"path": str(socket_path), "abstract_name": w.abstract_name},
        "see_host_process": {"pid": sleeper.pid, "marker": sleeper.marker},
        "signal_host_process": {"pid": sleeper.pid, "marker": sleeper.marker},
        "ptrace_outside": {"pid": sleeper.pid, "marker": sleeper.marker, "init_identity": w.init_identity},
        "change_cgroup_limits": {"avoid": w.runner_cgroups},
        "reach_host_loopback": {
            "targets": [[a, port] for a in [*w.greeting.addresses, *w.host_addresses]],
            "token": w.token,
            "host_netns": w.host_netns,
            "gateway_port": port,
        },
        "mknod_block_device": {"major": w.disk[0], "minor": w.disk[1]},
        "read_host_disk": {"major": w.disk[0], "minor": w.disk[1], "names": w.disk[2]},
    }
    return per_attempt.get(name, {})


# ----- the control: every attempt succeeds on the host -------------------------------------------------------


@contextlib.contextmanager
def _host_cgroups(name: str) -> Iterator[list[Path]]:
    """Fresh memory, pids and CPU cgroups (v1 or v2) for a host-run attempt to join; their cgroup.procs files."""
    root = Path("/sys/fs/cgroup")
    made: list[Path] = []
    try:
        if (root / "cgroup.controllers").exists():
            group = root / name
            group.mkdir()
            made.append(group)
            (group / "pids.max").write_text("1000")
            (group / "memory.max").write_text(str(1 << 30))
        else:
            for controller, limit, value in (
                ("memory", "memory.limit_in_bytes", str(1 << 30)),
                ("pids", "pids.max", "1000"),
                ("cpu", "cpu.cfs_quota_us", "50000"),
            ):
                group = root / controller / name
                group.mkdir()
                made.append(group)
                (group / limit).write_text(value)
        yield [g / "cgroup.procs" for g in made]
    finally:
        for group in reversed(made):
            with contextlib.suppress(OSError):
                group.rmdir()


def _run_on_host(name: str, kwargs: dict, join: Sequence[Path] = ()) -> dict:
    """Run one attempt as a host process (root, no container) in a private mount namespace, so that what
    it mounts stays there; it first joins the cgroups in ``join``."""
    joins = "".join(f"echo $$ > {p} && " for p in join)
    script = f"{joins}exec unshare --mount --propagation private {sys.executable} {ESCAPES_FILE} {name}"
    proc = subprocess.run(
        ["sh", "-c", script], input=json.dumps(kwargs), capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"{name} on the host exited {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _host_cannot(name: str, w: HostWorld) -> str | None:
    """Why ``name`` cannot succeed on this host even as root (so its control is skipped), or None."""
    if name == "load_kernel_module" and not Path("/proc/modules").exists():
        return "this kernel has no module support: init_module is ENOSYS even for the host's root"
    if name == "read_host_disk":
        try:
            with open(f"/dev/{w.disk[2][0]}", "rb") as f:
                f.read(512)
        except (OSError, IndexError) as exc:
            return f"the host's own root cannot read its disk here ({exc})"
    return None


@pytest.mark.parametrize("name", ATTEMPTS)
def test_attempt_succeeds_on_the_host(name: str, world: HostWorld, sleeper: Sleeper, tmp_path: Path) -> None:
    reason = _host_cannot(name, world)
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"  # a stand-in WARMBOOT_HOME: state.db with the secret in it, and a snapshots dir
    (home / "snapshots").mkdir(parents=True)
    secret = f"secret-{uuid.uuid4().hex}"
    (home / "state.db").write_bytes(b"SQLite format 3\0" + secret.encode())
    server_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server_socket.bind(str(home / "server.sock"))
    server_socket.listen(4)
    kwargs = _kwargs(name, world, sleeper, home=home, secret=secret, socket_path=home / "server.sock")
    if name == "ptrace_outside":
        kwargs["init_identity"] = None  # never trace the host's real init, even for a moment
    if name == "write_host_files":
        canary = tmp_path / "canary.txt"
        canary.write_text("host canary\n")
        kwargs["append"] = [str(canary)]
        kwargs["create"] = [str(tmp_path / f"created-{kwargs['token']}"), *kwargs["create"][1:]]
    try:
        with _host_cgroups(f"wbsec-host-{uuid.uuid4().hex[:8]}") as join:
            result = _run_on_host(name, kwargs, join if name == "change_cgroup_limits" else [])
    finally:
        server_socket.close()
        for path in kwargs.get("create", []):
            with contextlib.suppress(OSError):
                os.unlink(path)
    assert not result["crashed"], result["detail"]
    assert result["succeeded"] is True, (
        f"{name} must succeed on the host, or its container test proves nothing: {result}"
    )
    if name == "write_host_files":
        assert canary.read_text().endswith(kwargs["token"])
    if name == "signal_host_process":
        assert sleeper.proc.wait(timeout=30) == -signal.SIGTERM


# ----- the deployed apps ---------------------------------------------------------------------------------------


def call(platform: Platform, app: str, function: str, *args: Any, timeout: float = 240) -> Any:
    """``app.function(*args)`` from a fresh SDK process; its JSON-able result."""
    proc = platform.python(
        f"""
        import json, warmboot
        print(json.dumps(warmboot.Function.from_name({app!r}, {function!r}).remote(*{args!r})))
        """,
        timeout=timeout,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def call_outcome(platform: Platform, app: str, function: str, *args: Any, timeout: float = 240) -> dict:
    """Like :func:`call`, but a remote error comes back as {"ok": False, "type", "message"}."""
    proc = platform.python(
        f"""
        import json, warmboot
        try:
            out = {{"ok": True, "value": warmboot.Function.from_name({app!r}, {function!r}).remote(*{args!r})}}
        except Exception as exc:
            out = {{"ok": False, "type": type(exc).__name__, "message": str(exc)}}
        print(json.dumps(out))
        """,
        timeout=timeout,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def deploy_dir(platform: Platform, name: str, source: str) -> Path:
    """Write an app file into its own directory next to a copy of escapes.py (which the app ships with
    ``add_local_python_source``) and deploy it; returns the app file."""
    app_dir = platform.apps_dir / name
    app_dir.mkdir(exist_ok=True)
    shutil.copy(ESCAPES_FILE, app_dir / "escapes.py")
    path = app_dir / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    platform.cli("deploy", str(path))
    return path


@dataclass
class Apps:
    main: str
    other: str
    volume: str
    secret_value: str


MAIN_APP = """
import os
import stat
import warmboot as modal

image = modal.Image.debian_slim().add_local_python_source("escapes")
app = modal.App({app!r}, image=image)
vol = modal.Volume.from_name({volume!r}, create_if_missing=True)


@app.function(memory=512, cpu=1.0)
def attempt(name, kwargs):
    import escapes

    return escapes.run(name, **kwargs)


@app.function()
def ping():
    return os.environ["WARMBOOT_CONTAINER_ID"]


@app.function(volumes={{"/data": vol}})
def view(host_paths, volume_file):
    dev = {{}}
    for dirpath, dirs, files in os.walk("/dev"):
        for entry in dirs + files:
            path = os.path.join(dirpath, entry)
            st = os.lstat(path)
            kind = (
                "chr" if stat.S_ISCHR(st.st_mode) else "blk" if stat.S_ISBLK(st.st_mode)
                else "dir" if stat.S_ISDIR(st.st_mode) else "lnk" if stat.S_ISLNK(st.st_mode) else "other"
            )
            dev[path] = [kind, os.major(st.st_rdev), os.minor(st.st_rdev)]
    with open("/etc/os-release") as f:
        os_release = f.read()
    with open(os.path.join("/data", volume_file)) as f:
        volume_text = f.read()
    return {{
        "os_release": os_release,
        "python3": os.path.exists("/usr/bin/python3"),
        "tmp": sorted(os.listdir("/tmp")),
        "host_paths_visible": [p for p in host_paths if os.path.exists(p)],
        "volume_text": volume_text,
        "dev": dev,
    }}


@app.function(volumes={{"/data": vol}}, timeout=600)
def fork_bomb(cap, comm, ready_file, release_file):
    import escapes

    return escapes.fork_until_failure(cap, comm, ready_file, release_file)


class _Trap:
    # Unpickling this runs code: it appends the unpickling process's PID and argv to a file on its host.

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        code = (
            f"import os; f = open({{self.path!r}}, 'a'); "
            "argv = open('/proc/self/cmdline').read().replace(chr(0), ' ').replace(chr(10), ' '); "
            "f.write(str(os.getpid()) + ' ' + argv + chr(10)); "
            "f.close()"
        )
        return (exec, (code,))


class TrapError(Exception):
    def __reduce__(self):
        return _Trap(self.args[0]).__reduce__()


@app.function()
def booby_trapped(path, how):
    if how == "raise":
        raise TrapError(path)
    return _Trap(path)


@app.function()
def forge_control_frame():
    # A frame header claiming 16 bytes of JSON, then 16 bytes that are not JSON, straight onto fd 4.
    os.write(4, (16).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"this is not json")
    return "forged"


@app.function(memory=256)
def hog(mib):
    chunks = [b"x" * (1 << 20) for _ in range(mib)]  # written, so really resident
    return len(chunks)
"""

OTHER_APP = """
import os
import warmboot as modal

app = modal.App({app!r})


@app.function(secrets=[modal.Secret.from_name({secret!r})])
def ping():
    return [os.environ["WARMBOOT_CONTAINER_ID"], len(os.environ["OTHER_APP_TOKEN"])]
"""


@pytest.fixture(scope="module")
def apps(platform: Platform) -> Apps:
    """The security app (attempts, probes, bomb, hog) and another app that holds a secret of its own."""
    a = Apps(
        main=f"sec-main-{ID}",
        other=f"sec-other-{ID}",
        volume=f"sec-vol-{ID}",
        secret_value=f"other-app-secret-{uuid.uuid4().hex}",
    )
    secret = f"sec-other-secret-{ID}"
    platform.cli("secret", "create", secret, f"OTHER_APP_TOKEN={a.secret_value}")
    platform.cli("deploy", str(platform.write_app(f"sec_other_{ID}", OTHER_APP.format(app=a.other, secret=secret))))
    call(platform, a.other, "ping")  # its container runs, with the secret in its environment
    deploy_dir(platform, f"sec_main_{ID}", MAIN_APP.format(app=a.main, volume=a.volume))
    return a


# ----- every attempt fails in a container ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTEMPTS)
def test_escape_fails_in_a_container(
    name: str, platform: Platform, apps: Apps, world: HostWorld, sleeper: Sleeper
) -> None:
    kwargs = _kwargs(
        name, world, sleeper, home=platform.home, secret=apps.secret_value, socket_path=platform.home / "server.sock"
    )
    canary_before = world.canary.read_bytes()
    result = call(platform, apps.main, "attempt", name, kwargs)
    try:
        assert not result["crashed"], f"the attempt broke, so it proves nothing: {result['detail']}"
        assert not result["inconclusive"], f"the attempt could not try: {result['detail']}"
        assert result["succeeded"] is False, f"ESCAPE: {name} succeeded from inside a container: {result['detail']}"
        assert result["detail"], "a failed attempt says how it failed"
        if name == "write_host_files":
            appeared = [p for p in kwargs["create"] if os.path.exists(p)]
            assert appeared == [], f"files written from the container appeared on the host: {appeared}"
            assert world.canary.read_bytes() == canary_before, "the container changed a host file"
        if name == "signal_host_process":
            assert sleeper.proc.poll() is None, "the host process was killed from inside a container"
    finally:
        for path in kwargs.get("create", []):
            with contextlib.suppress(OSError):
                os.unlink(path)
        if world.canary.read_bytes() != canary_before:
            world.canary.write_bytes(canary_before)


# ----- the control plane: container bytes are unpickled only by the caller ----------------------------------


@pytest.mark.parametrize("how", ["return", "raise"])
def test_container_bytes_are_unpickled_only_in_the_calling_process(platform: Platform, apps: Apps, how: str) -> None:
    trap = Path(f"/var/tmp/wbsec-unpickled-{uuid.uuid4().hex[:12]}")
    marker = f"caller-{uuid.uuid4().hex[:12]}"
    try:
        platform.python(
            f"""
            # {marker}
            import warmboot
            try:
                warmboot.Function.from_name({apps.main!r}, "booby_trapped").remote({str(trap)!r}, {how!r})
            except BaseException as exc:
                print("raised", type(exc).__name__)
            """,
        )
        lines = trap.read_text().splitlines() if trap.exists() else []
    finally:
        trap.unlink(missing_ok=True)
    assert lines, "the caller unpickles the result (Modal's semantics): the trap must have run there"
    assert all(marker in line for line in lines), f"container bytes were unpickled outside the caller: {lines}"
    assert platform.server is not None
    assert not any(line.split()[0] == str(platform.server.pid) for line in lines)


def test_a_forged_control_frame_stops_only_that_container(platform: Platform, apps: Apps) -> None:
    outcome = call_outcome(platform, apps.main, "forge_control_frame")
    assert outcome["ok"] is False, f"a container writing a malformed frame must not get a result through: {outcome}"
    assert "malformed control message" in outcome["message"], outcome
    assert isinstance(call(platform, apps.main, "ping", timeout=120), str), "the server keeps serving"
    assert "Server running" in platform.cli("server", "status").stdout


# ----- the filesystem a function sees --------------------------------------------------------------------------

ALLOWED_DEV = {  # name: (kind, major, minor or None for any)
    "/dev/null": ("chr", 1, 3),
    "/dev/zero": ("chr", 1, 5),
    "/dev/full": ("chr", 1, 7),
    "/dev/random": ("chr", 1, 8),
    "/dev/urandom": ("chr", 1, 9),
    "/dev/tty": ("chr", 5, 0),
    "/dev/ptmx": ("chr", 5, 2),
    "/dev/console": ("chr", 5, 1),
}
ALLOWED_DEV_OTHER = {"/dev/shm", "/dev/pts", "/dev/mqueue", "/dev/fd", "/dev/stdin", "/dev/stdout", "/dev/stderr"}
ALLOWED_DEV_OTHER |= {"/dev/core", "/dev/pts/ptmx"}


def test_function_sees_its_image_private_tmp_volume_and_a_minimal_dev(
    platform: Platform, apps: Apps, world: HostWorld
) -> None:
    volume_file = f"from-host-{ID}.txt"
    volume_dir = platform.home / "volumes" / apps.volume
    volume_dir.mkdir(parents=True, exist_ok=True)
    (volume_dir / volume_file).write_text("volume contents")
    host_tmp = Path("/tmp") / f"wbsec-host-tmp-{ID}"
    host_tmp.write_text("host /tmp")
    host_paths = [str(world.canary), str(platform.home), str(REPO), str(host_tmp), str(world.root_dir)]
    try:
        got = call(platform, apps.main, "view", host_paths, volume_file)
    finally:
        host_tmp.unlink()
    assert "ID=debian" in got["os_release"], got["os_release"]
    assert got["python3"], "the image's root filesystem has /usr/bin/python3"
    assert got["tmp"] == [], f"a container's /tmp starts empty: {got['tmp']}"
    assert got["host_paths_visible"] == [], f"host paths visible in the container: {got['host_paths_visible']}"
    assert got["volume_text"] == "volume contents"
    unexpected = {}
    for path, (kind, major, minor) in got["dev"].items():
        if path in ALLOWED_DEV:
            if ALLOWED_DEV[path] != (kind, major, minor):
                unexpected[path] = (kind, major, minor)
        elif path.startswith("/dev/pts/") and kind == "chr" and major == 136:
            continue  # the container's own pseudo-terminals
        elif path.startswith("/dev/shm/") and kind != "blk" and kind != "chr":
            continue
        elif path not in ALLOWED_DEV_OTHER or kind in ("blk", "chr"):
            unexpected[path] = (kind, major, minor)
    assert unexpected == {}, f"/dev holds more than the minimal nodes: {unexpected}"
    assert "/dev/null" in got["dev"] and "/dev/urandom" in got["dev"]


# ----- resource limits: a fork bomb and a memory hog harm only their own container ----------------------------


def _host_processes_named(comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    found.append(int(entry.name))
    return found


def _wait_for(predicate: Any, deadline_s: float, what: str, every: float = 0.1) -> Any:
    """``predicate()``'s first truthy value, polled until the deadline; fails naming ``what`` otherwise."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(every)


def test_fork_bomb_stays_inside_its_container(platform: Platform, apps: Apps) -> None:
    comm = f"wbb-{uuid.uuid4().hex[:8]}"
    cap = 3000  # well above the default pids limit (1024): reaching it means no limit held
    ready, release = f"bomb-{comm}.json", f"bomb-{comm}.release"
    volume_dir = platform.home / "volumes" / apps.volume
    bomb = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys, warmboot\n"
            f"f = warmboot.Function.from_name({apps.main!r}, 'fork_bomb')\n"
            f"print(json.dumps(f.remote({cap}, {comm!r}, '/data/{ready}', '/data/{release}')))\n",
        ],
        env=platform.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=platform.apps_dir,
    )
    try:
        held = _wait_for(
            lambda: (volume_dir / ready).exists() or bomb.poll() is not None, 240, "the bomb to stop forking"
        )
        assert held and (volume_dir / ready).exists(), f"the bomb ended early: {bomb.communicate()}"
        state = json.loads((volume_dir / ready).read_text())
        # Meanwhile, with the bomb's children all alive: another app answers, and the host can start processes.
        assert call(platform, apps.other, "ping", timeout=120)[1] == len(apps.secret_value)
        assert subprocess.run(["true"], timeout=30, check=False).returncode == 0
        on_host = len(_host_processes_named(comm))
    finally:
        volume_dir.mkdir(parents=True, exist_ok=True)
        (volume_dir / release).write_text("go")
        try:
            out, err = bomb.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            bomb.kill()
            out, err = bomb.communicate()
        for pid in _host_processes_named(comm):  # only if the container failed to reap its own
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    assert bomb.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert state["failure"] == "EAGAIN", f"fork must fail with EAGAIN at the pids limit, got {state}"
    assert state["forked"] < 1024, f"the bomb forked {state['forked']} processes: more than the pids limit"
    assert result["forked"] == state["forked"]
    assert on_host == state["forked"], "the host sees exactly the bomb's children, no more"
    _wait_for(lambda: not _host_processes_named(comm), 60, "the bomb's children to be gone from the host")


def test_memory_hog_is_killed_while_the_rest_of_the_app_answers(platform: Platform, apps: Apps) -> None:
    hog = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, warmboot\n"
            "try:\n"
            f"    out = {{'ok': True, 'value': warmboot.Function.from_name({apps.main!r}, 'hog').remote(1024)}}\n"
            "except Exception as exc:\n"
            "    out = {'ok': False, 'type': type(exc).__name__, 'message': str(exc)}\n"
            "print(json.dumps(out))\n",
        ],
        env=platform.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=platform.apps_dir,
    )
    try:
        first = call(platform, apps.main, "ping", timeout=120)
        out, _ = hog.communicate(timeout=240)
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.communicate()
    outcome = json.loads(out.strip().splitlines()[-1])
    assert outcome["ok"] is False, f"a 1 GiB allocation under memory=256 must fail: {outcome}"
    assert outcome["type"] == "ContainerCrashedError", outcome
    assert "out of memory" in outcome["message"] and "memory=256 MiB" in outcome["message"], outcome
    assert call(platform, apps.main, "ping", timeout=120) == first, "the other function's container lives on"
    assert call(platform, apps.other, "ping", timeout=120)[1] == len(apps.secret_value)


# ----- network: none during the snapshot phase, outbound after START, none with block_network ------------------


@dataclass
class NetnsService:
    """A TCP service inside a network namespace this module made (the only non-loopback traffic here)."""

    address: str
    port: int
    token: str
    namespace: str  #: its name under /run/netns


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


_SERVICE = """
import socket, sys
s = socket.create_server((sys.argv[1], 0), backlog=64)
print("ready", s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall(("hello " + sys.argv[2] + "\\n").encode())
    except OSError:
        pass
    c.close()
"""


@pytest.fixture(scope="module")
def netns_service() -> Iterator[NetnsService]:
    ns, host_if, ns_if = f"wbsec-{ID}", f"wbh{ID}", f"wbn{ID}"
    used = subprocess.run(["ip", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    octet = next(o for o in random.sample(range(1, 255), 254) if f"10.203.{o}." not in used)
    host_addr, ns_addr = f"10.203.{octet}.1", f"10.203.{octet}.2"
    token = f"netns-{uuid.uuid4().hex}"
    server: subprocess.Popen[str] | None = None
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"{host_addr}/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", ns, "addr", "add", f"{ns_addr}/24", "dev", ns_if)
        _ip("-n", ns, "link", "set", ns_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", _SERVICE, ns_addr, token],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(server.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=30), "the netns service did not start"
        line = server.stdout.readline().split()
        assert line[:1] == ["ready"], (
            f"the netns service failed: {line} {server.stderr.read() if server.stderr else ''}"
        )
        service = NetnsService(ns_addr, int(line[1]), token, ns)
        # The service is reachable from the host's namespace (where slirp4netns makes a container's connections).
        assert escapes.connect_for_token(ns_addr, service.port, token) == "token"
        yield service
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)


NET_APP = """
import os
import warmboot as modal

app = modal.App({app!r}, image=modal.Image.debian_slim().add_local_python_source("escapes"))
SERVICE = ({address!r}, {port!r}, {token!r})
LOOPBACK = ("127.0.0.1", {loopback_port!r}, {loopback_token!r})


@app.cls(enable_memory_snapshot=True)
class SnapNet:
    @modal.enter(snap=True)
    def probe_before_the_snapshot(self):
        import escapes

        self.during = {{
            "netns_service": escapes.connect_for_token(*SERVICE),
            "host_loopback": escapes.connect_for_token(*LOOPBACK),
        }}

    @modal.method()
    def report(self):
        import escapes

        return {{
            "during_snapshot_phase": self.during,
            "after_start": escapes.connect_for_token(*SERVICE),
            "container": os.environ["WARMBOOT_CONTAINER_ID"],
        }}
"""

BLOCKED_APP = """
import os
import warmboot as modal

app = modal.App({app!r}, image=modal.Image.debian_slim().add_local_python_source("escapes"))


@app.function(block_network=True)
def reach(address, port, token):
    import escapes

    return {{"netns_service": escapes.connect_for_token(address, port, token), "links": os.listdir("/sys/class/net")}}


@app.function()
def reach_open(address, port, token):
    import escapes

    return escapes.connect_for_token(address, port, token)
"""


def _restored_ids(platform: Platform, label: str) -> list[str]:
    """Container ids of the "Restored LABEL from memory snapshot" log lines."""
    pattern = re.compile(rf"Restored {re.escape(label)} from memory snapshot in \d+ ms \(container (wc-[0-9a-f]+)\b")
    app = label.split(".")[0]
    return [m.group(1) for line in platform.log_text(app).splitlines() if (m := pattern.search(line))]


def _call_method(platform: Platform, app: str, cls: str, method: str) -> Any:
    proc = platform.python(
        f"""
        import json, warmboot
        print(json.dumps(getattr(warmboot.Cls.from_name({app!r}, {cls!r})(), {method!r}).remote()))
        """,
        timeout=240,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_network_during_the_snapshot_phase_and_outbound_network_after_start(
    platform: Platform, netns_service: NetnsService, world: HostWorld
) -> None:
    app = f"sec-snapnet-{ID}"
    path = deploy_dir(
        platform,
        f"sec_snapnet_{ID}",
        NET_APP.format(
            app=app,
            address=netns_service.address,
            port=netns_service.port,
            token=netns_service.token,
            loopback_port=world.greeting.port,
            loopback_token=world.token,
        ),
    )
    cold = _call_method(platform, app, "SnapNet", "report")
    during = cold["during_snapshot_phase"]
    assert during["netns_service"] != "token", f"the snapshot phase reached the network: {during}"
    assert during["host_loopback"] != "token", f"the snapshot phase reached the host's loopback: {during}"
    assert cold["after_start"] == "token", f"after START the function must have outbound network: {cold}"

    # A restored copy gets its network attached after the restore too.
    platform.cli("app", "stop", app)
    platform.cli("deploy", str(path))
    restored = _call_method(platform, app, "SnapNet", "report")
    assert _restored_ids(platform, f"{app}.SnapNet") == [restored["container"]], platform.log_text(app)[-3000:]
    assert restored["after_start"] == "token", f"a restored copy must have outbound network: {restored}"
    # Attaching a container's network touched no host mount: the namespace `ip netns add` keeps is still there
    # (slirp4netns's sandbox once unmounted it, and every shared submount, at each container start).
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f" /run/netns/{netns_service.namespace} " in mounts, "a container start unmounted a host mount"


def test_block_network_means_no_network_at_all(platform: Platform, netns_service: NetnsService) -> None:
    app = f"sec-blocked-{ID}"
    deploy_dir(platform, f"sec_blocked_{ID}", BLOCKED_APP.format(app=app))
    target = (netns_service.address, netns_service.port, netns_service.token)
    assert call(platform, app, "reach_open", *target) == "token", "without block_network the service is reachable"
    blocked = call(platform, app, "reach", *target)
    assert blocked["netns_service"] != "token", f"block_network=True reached the network: {blocked}"


# ----- snapshots with an extra host mount, and with WARMBOOT_HOME on its own filesystem ------------------------

SNAP_APP = """
import os
import warmboot as modal

app = modal.App({app!r})


@app.cls(enable_memory_snapshot=True)
class Held:
    @modal.enter(snap=True)
    def load(self):
        self.table = [i * 7 for i in range(100_000)]

    @modal.method()
    def info(self):
        return {{"last": self.table[-1], "container": os.environ["WARMBOOT_CONTAINER_ID"]}}
"""


def _snapshot_then_restore(platform: Platform, app: str) -> None:
    """Deploy a snapshot-enabled class, cold-boot it (makes the snapshot), then force a restore; assert it."""
    path = platform.write_app(app.replace("-", "_"), SNAP_APP.format(app=app))
    platform.cli("deploy", str(path))
    cold = _call_method(platform, app, "Held", "info")
    platform.cli("app", "stop", app)
    platform.cli("deploy", str(path))
    restored = _call_method(platform, app, "Held", "info")
    assert cold["last"] == restored["last"] == 699_993
    assert restored["container"] != cold["container"]
    log = platform.log_text(app)
    assert f"Creating memory snapshot for {app}.Held" in log, log[-3000:]
    assert _restored_ids(platform, f"{app}.Held") == [restored["container"]], log[-3000:]


def _umount(target: Path) -> None:
    if subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def extra_host_mount() -> Iterator[Path]:
    """A loop-mounted ext4 filesystem under /var/tmp on the host, for the length of one test."""
    base = Path(f"/var/tmp/wbsec-loop-{uuid.uuid4().hex[:8]}")
    base.mkdir()
    image, target = base / "disk.img", base / "mnt"
    target.mkdir()
    mounted = False
    try:
        subprocess.run(["truncate", "-s", "16M", str(image)], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(target)], check=True, capture_output=True)
        mounted = True
        yield target
    finally:
        if mounted:
            _umount(target)
        shutil.rmtree(base, ignore_errors=True)


def test_snapshot_and_restore_with_an_extra_host_mount(platform: Platform, extra_host_mount: Path) -> None:
    assert os.path.ismount(extra_host_mount)
    _snapshot_then_restore(platform, f"sec-loopmount-{ID}")


def test_snapshot_and_restore_with_warmboot_home_on_a_tmpfs() -> None:
    p = Platform()
    mounted = False
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "wbsec-home", str(p.home)], check=True)
        mounted = True
        p.apps_dir.mkdir()  # the tmpfs hides the one Platform made
        assert (
            subprocess.run(["findmnt", "-no", "FSTYPE", str(p.home)], capture_output=True, text=True).stdout.strip()
            == "tmpfs"
        )
        p.start_server()
        _snapshot_then_restore(p, f"sec-tmpfshome-{ID}")
    finally:
        p.stop_server()
        if mounted:
            _umount(p.home)
        p.close()
