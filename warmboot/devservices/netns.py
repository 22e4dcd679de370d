"""A small cluster network on one machine: network namespaces joined by a bridge, for multi-machine tests and demos.

``cluster_network(["a1", "a2"])`` makes a *hub* namespace holding a bridge (address ``10.213.X.1/24``) and one
namespace per agent, each joined to the bridge by a veth pair (agent addresses ``.2``, ``.3``, ...). The control
plane and the shared services (registry, S3) run in the hub, each agent in its own namespace, so they talk over
real IP addresses as on separate machines.

Nothing can leave: no namespace has a link to the host's namespace or a default route, so the run's traffic stays
inside namespaces it created, and an agent's ``127.0.0.1`` is its own loopback, not the host's. The veth pairs are
created inside the hub (their agent ends go straight into the agent's namespace), so no link ever appears in the
host's namespace and parallel runs cannot collide on link names; namespace names get a random suffix.

Commands run in a namespace through ``nsenter --net`` (:meth:`Namespace.argv`), which switches only the network
namespace: unlike ``ip netns exec`` it makes no new mount namespace and does not remount ``/sys``, so the
processes share the host's mounts (overlays, snapshot caches, CRIU's files).

Each namespace has a marker, ``/run/warmboot-netns/NAME.pid``, naming the process that created it; a run that
crashed leaves namespaces whose creator is dead, which :func:`remove_stale` (called on entry) deletes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")  #: where ``ip netns add`` puts named namespaces
MARKER_DIR = Path("/run/warmboot-netns")  #: one ``NAME.pid`` per namespace this module made
BRIDGE = "br0"  #: the bridge in the hub namespace (holds the hub's address)
AGENT_LINK = "eth0"  #: an agent's end of its veth pair, in the agent's namespace
MAX_AGENTS = 253  #: .2 to .254 of the /24
LINKS_UP_TIMEOUT_S = 10.0

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class Namespace:
    """One named network namespace of a :class:`ClusterNetwork` and its address on the cluster's /24."""

    name: str
    address: str  #: its IPv4 address on the bridge's /24 (no prefix length)

    @property
    def path(self) -> str:
        """The namespace's file, ``/run/netns/NAME`` (what ``nsenter --net=`` and ``setns`` take)."""
        return str(NETNS_DIR / self.name)

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """``cmd`` run in this network namespace (and the host's mount namespace); ``argv(())`` is a prefix."""
        return ["nsenter", f"--net={self.path}", "--", *cmd]

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``cmd`` in this namespace (``subprocess.Popen``'s keywords). nsenter execs ``cmd``: the returned
        process *is* the command, so signals and ``wait`` reach it directly."""
        return subprocess.Popen(self.argv(cmd), **kw)

    def run(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``cmd`` in this namespace to the end (``subprocess.run``'s keywords)."""
        return subprocess.run(self.argv(cmd), **kw)


@dataclass(frozen=True)
class ClusterNetwork:
    """The namespaces of one :func:`cluster_network`: the hub (bridge, ``.1``) and the agents by name."""

    hub: Namespace
    agents: dict[str, Namespace]
    subnet: str  #: ``10.213.X.0/24``

    def namespaces(self) -> list[Namespace]:
        """The hub, then the agents in the order they were given."""
        return [self.hub, *self.agents.values()]


@contextlib.contextmanager
def cluster_network(
    agent_names: Sequence[str], *, prefix: str = "wb", subnet_octet: int | None = None
) -> Iterator[ClusterNetwork]:
    """A hub namespace with a bridge and one namespace per agent on ``10.213.<subnet_octet>.0/24`` (random octet
    unless given), links up and bridge ports forwarding; deleted with their links when the block ends, also on error.

    Processes started in the namespaces are the caller's: none is killed here. One still running when the block
    ends keeps its namespace alive, anonymously, with only a loopback (the links are deleted first).
    """
    agent_names = list(agent_names)
    _check_name(prefix, "prefix")
    for agent in agent_names:
        _check_name(agent, "agent name")
    if len(set(agent_names)) != len(agent_names):
        raise ValueError(f"agent names repeat: {agent_names}")
    if len(agent_names) > MAX_AGENTS:
        raise ValueError(f"at most {MAX_AGENTS} agents fit a /24, not {len(agent_names)}")
    octet = secrets.randbelow(256) if subnet_octet is None else subnet_octet
    if not 0 <= octet <= 255:
        raise ValueError(f"subnet_octet must be 0-255, not {octet}")
    remove_stale(prefix)

    while True:  # a suffix no namespace or marker has (16M of them: a repeat is all but impossible)
        run_id = f"{prefix}-{secrets.token_hex(3)}"
        net = ClusterNetwork(
            hub=Namespace(f"{run_id}-hub", f"10.213.{octet}.1"),
            agents={a: Namespace(f"{run_id}-agent-{a}", f"10.213.{octet}.{i + 2}") for i, a in enumerate(agent_names)},
            subnet=f"10.213.{octet}.0/24",
        )
        taken = [p for ns in net.namespaces() for p in (Path(ns.path), MARKER_DIR / f"{ns.name}.pid")]
        if not any(p.exists() for p in taken):
            break
    made: list[Namespace] = []
    try:
        for ns in net.namespaces():
            _write_marker(ns.name)
            try:
                _ip("netns", "add", ns.name)
            except BaseException:
                (MARKER_DIR / f"{ns.name}.pid").unlink(missing_ok=True)  # never delete a namespace not made here
                raise
            made.append(ns)
        hub_batch = [f"link add {BRIDGE} type bridge", f"addr add {net.hub.address}/24 dev {BRIDGE}",
                     "link set lo up", f"link set {BRIDGE} up"]  # fmt: skip
        for i, agent in enumerate(net.agents.values()):
            hub_batch += [f"link add vh{i} type veth peer name {AGENT_LINK} netns {agent.name}",
                          f"link set vh{i} master {BRIDGE}", f"link set vh{i} up"]  # fmt: skip
        _ip_batch(net.hub.name, hub_batch)
        for agent in net.agents.values():
            _ip_batch(agent.name, ["link set lo up", f"addr add {agent.address}/24 dev {AGENT_LINK}",
                                   f"link set {AGENT_LINK} up"])  # fmt: skip
        _wait_links_up(net)
        yield net
    finally:
        for ns in reversed(made):
            _delete_namespace(ns.name)


def remove_stale(prefix: str = "wb") -> list[str]:
    """Delete the namespaces (and their links) this module made under ``prefix`` whose creator has exited: a run
    that crashed or was killed before its block ended. Returns their names.

    Only namespaces with a marker are touched, and only when the marker's process is gone (same pid *and* start
    time, in the same pid namespace as this process), so a live run's namespaces and other tools' are left alone.
    """
    _check_name(prefix, "prefix")
    removed = []
    ours = re.compile(re.escape(prefix) + r"-[0-9a-f]{6}-(hub|agent-.+)\.pid")
    for marker in sorted(MARKER_DIR.glob(f"{prefix}-*.pid")):
        if not ours.fullmatch(marker.name):
            continue  # another prefix that starts with this one
        try:
            owner = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue  # half-written by a live run, or removed meanwhile
        if owner.get("pidns") != _pidns() or _start_time(owner.get("pid", 0)) == owner.get("start"):
            continue
        name = marker.name.removesuffix(".pid")
        _delete_namespace(name)
        removed.append(name)
    return removed


def _check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '.' and '-' (it becomes a file name)")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")


def _ip_batch(netns: str, commands: list[str]) -> None:
    """``ip -n NETNS -batch -``: the commands in order, stopping at the first that fails."""
    done = subprocess.run(["ip", "-n", netns, "-batch", "-"], input="\n".join(commands) + "\n",
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"ip -n {netns} -batch failed ({done.returncode}): {done.stderr.strip()}")


def _ip_json(*args: str) -> list[dict[str, Any]]:
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=False)
    return json.loads(done.stdout or "[]") if done.returncode == 0 else []


def _wait_links_up(net: ClusterNetwork) -> None:
    """Wait until every bridge port forwards and every agent's link is up (the kernel does both asynchronously,
    though with STP off and veths on one host it is as good as immediate)."""
    deadline = time.monotonic() + LINKS_UP_TIMEOUT_S
    while True:
        ports = {p["ifname"]: p for p in _ip_json("-n", net.hub.name, "-d", "link", "show", "master", BRIDGE)}
        waiting = [
            f"{net.hub.name}:vh{i}"
            for i in range(len(net.agents))
            if ports.get(f"vh{i}", {}).get("linkinfo", {}).get("info_slave_data", {}).get("state") != "forwarding"
        ]
        for agent in net.agents.values():
            links = _ip_json("-n", agent.name, "link", "show", AGENT_LINK)
            if not links or links[0].get("operstate") != "UP":
                waiting.append(f"{agent.name}:{AGENT_LINK}")
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"links not up within {LINKS_UP_TIMEOUT_S} s: {', '.join(waiting)}")
        time.sleep(0.02)


def _delete_namespace(name: str) -> None:
    """Delete the namespace's links (a veth goes with its peer), then its name, then its marker; what is already
    gone is skipped, so this is safe to repeat."""
    if (NETNS_DIR / name).exists():
        for link in _ip_json("-n", name, "link", "show"):
            if link.get("ifname") != "lo":
                subprocess.run(["ip", "-n", name, "link", "del", link["ifname"]], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    with contextlib.suppress(FileNotFoundError):
        (MARKER_DIR / f"{name}.pid").unlink()


def _write_marker(name: str) -> None:
    MARKER_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    marker = MARKER_DIR / f"{name}.pid"
    tmp = marker.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid()), "pidns": _pidns()}))
    tmp.replace(marker)


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), which tells a reused pid from the original; None if
    there is no such process."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name before ")" may hold spaces


def _pidns() -> int:
    return os.stat("/proc/self/ns/pid").st_ino
