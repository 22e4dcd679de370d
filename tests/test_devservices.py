"""The one-machine cluster network (warmboot/devservices/netns.py) and the services started inside it.

Everything is real: named network namespaces, a bridge and veth pairs made with iproute2, processes entered into
them with nsenter, Debian's docker-registry, skopeo and SeaweedFS. The host's namespace never sends to the
cluster's addresses (it has no route there: such packets would leave by its default route); every probe of them
runs inside a namespace of the test's own cluster.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import running_registry

from warmboot.devservices import netns, seaweedfs
from warmboot.devservices.netns import ClusterNetwork, Namespace, cluster_network, remove_stale
from warmboot.devservices.registry import registry_server
from warmboot.worker.images.oci import ImageConfig, Layout

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="making network namespaces needs root"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("nsenter")), reason="needs iproute2 and nsenter"),
]

DEADLINE_S = 20.0
CURL = ["curl", "--noproxy", "*", "-sS", "--max-time", "10"]


@pytest.fixture
def net() -> Iterator[ClusterNetwork]:
    with cluster_network(["a1", "a2"], prefix="wbtest") as network:
        yield network


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _read_until(proc: subprocess.Popen[bytes], pattern: bytes, what: str) -> re.Match[bytes]:
    """Read the process's stdout until ``pattern`` matches what it wrote (its readiness line); fails past the
    deadline or when it exits first."""
    assert proc.stdout is not None
    fd, seen = proc.stdout.fileno(), b""
    deadline = time.monotonic() + DEADLINE_S
    while (m := re.search(pattern, seen)) is None:
        left = deadline - time.monotonic()
        assert left > 0, f"{what} not ready within {DEADLINE_S} s: {seen.decode()!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"{what} exited ({proc.wait()}): {seen.decode()!r}"
            seen += chunk
    return m


def _http_server(ns: Namespace, root: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``python3 -m http.server`` on the namespace's address in that namespace, on a port the kernel picks (it
    prints the one it got); the process and the port."""
    proc = ns.popen([sys.executable, "-u", "-m", "http.server", "--bind", ns.address, "0"], cwd=root,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    m = _read_until(proc, rb"Serving HTTP on \S+ port (\d+)", f"http.server in {ns.name}")
    return proc, int(m.group(1))


def _stop(proc: subprocess.Popen[bytes]) -> str:
    """Terminate the process; what it wrote on stderr."""
    proc.terminate()
    _, err = proc.communicate(timeout=10)
    return err.decode()


# ----- the network ----------------------------------------------------------------------------------------


def test_agents_reach_a_server_in_the_hub_and_each_other(net: ClusterNetwork, tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_text("hello from the hub\n")
    assert net.hub.address.endswith(".1") and net.subnet == net.hub.address.rsplit(".", 1)[0] + ".0/24"
    assert [a.address.rsplit(".", 1)[1] for a in net.agents.values()] == ["2", "3"]

    server, port = _http_server(net.hub, tmp_path)
    try:
        for agent in net.agents.values():
            got = agent.run([*CURL, f"http://{net.hub.address}:{port}/hello.txt"], capture_output=True, text=True)
            assert (got.returncode, got.stdout) == (0, "hello from the hub\n"), got.stderr
    finally:
        log = _stop(server)
    # The requests came over the bridge, from the agents' own addresses.
    for agent in net.agents.values():
        assert re.search(rf"^{re.escape(agent.address)} .*GET /hello.txt", log, re.M), log

    a1, a2 = net.agents["a1"], net.agents["a2"]
    server, port = _http_server(a2, tmp_path)
    try:
        got = a1.run([*CURL, f"http://{a2.address}:{port}/hello.txt"], capture_output=True, text=True)
        assert got.returncode == 0, got.stderr
    finally:
        _stop(server)


def test_agents_cannot_reach_the_hosts_loopback_and_have_no_route_out(net: ClusterNetwork) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the host reaches it...
        probe = (
            "import socket, sys\n"
            "try:\n    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n"
            "except ConnectionRefusedError:\n    print('refused')\n"
            "else:\n    print('connected')\n"
        )
        for agent in net.agents.values():  # ...an agent's 127.0.0.1 is its own loopback, where nothing listens
            got = agent.run([sys.executable, "-c", probe, str(port)], capture_output=True, text=True, timeout=30)
            assert got.stdout.strip() == "refused", got.stderr

    for ns in net.namespaces():
        routes = ns.run(["ip", "-j", "route", "show", "table", "all"], capture_output=True, text=True, check=True)
        assert "default" not in routes.stdout, routes.stdout
        for family in ("-4", "-6"):
            default = ns.run(["ip", family, "route", "show", "default"], capture_output=True, text=True)
            assert default.stdout.strip() == "", default.stdout
        # A route lookup only (nothing is sent): an address outside the /24 has no way out.
        lookup = ns.run(["ip", "route", "get", "192.0.2.1"], capture_output=True, text=True)
        assert lookup.returncode != 0 and "unreachable" in lookup.stderr, lookup
        links = ns.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
        names = sorted(re.findall(r"^\d+: ([^:@]+)", links, re.M))
        expected = ["br0", "lo", "vh0", "vh1"] if ns is net.hub else ["eth0", "lo"]
        assert names == expected, links


# ----- clean-up ------------------------------------------------------------------------------------------


def _markers(names: list[str]) -> list[Path]:
    return [netns.MARKER_DIR / f"{n}.pid" for n in names]


def test_namespaces_and_markers_are_gone_after_the_block() -> None:
    with cluster_network(["x"], prefix="wbtest") as net:
        names = [ns.name for ns in net.namespaces()]
        assert set(names) <= _namespaces()
        assert all(m.exists() for m in _markers(names))
        assert all(Path(ns.path).exists() for ns in net.namespaces())
    assert not set(names) & _namespaces()
    assert not any(m.exists() for m in _markers(names))


def test_namespaces_are_gone_after_the_block_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"), cluster_network(["x", "y"], prefix="wbtest") as net:
        names = [ns.name for ns in net.namespaces()]
        assert set(names) <= _namespaces()
        raise RuntimeError("boom")
    assert not set(names) & _namespaces()
    assert not any(m.exists() for m in _markers(names))


def test_bad_arguments_make_no_namespace() -> None:
    before = _namespaces()
    for agents, kw in ((["a", "a"], {}), (["a/b"], {}), ([""], {}), (["a"], {"prefix": "no spaces"}),
                       (["a"], {"subnet_octet": 256})):  # fmt: skip
        with pytest.raises(ValueError), cluster_network(agents, **kw):
            pass
    assert _namespaces() == before


def test_remove_stale_deletes_a_killed_runs_namespaces_only() -> None:
    prefix = f"wbstale{os.getpid()}"
    crash = (
        "import os, signal, sys\n"
        "from warmboot.devservices.netns import cluster_network\n"
        "with cluster_network(['a'], prefix=sys.argv[1]) as net:\n"
        "    print(*[ns.name for ns in net.namespaces()], flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", crash, prefix], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    left = done.stdout.split()
    assert len(left) == 2 and set(left) <= _namespaces()  # the killed run could not clean up

    with cluster_network(["b"], prefix=prefix) as live:  # entering removes the dead run's namespaces first
        assert not set(left) & _namespaces()
        assert not any(m.exists() for m in _markers(left))
        assert remove_stale(prefix) == []  # a live run's namespaces stay
        assert {ns.name for ns in live.namespaces()} <= _namespaces()
    assert remove_stale(prefix) == []  # nothing left to remove: safe to repeat


# ----- services in the hub -------------------------------------------------------------------------------


def test_registry_in_the_hub_answers_agents(net: ClusterNetwork, tmp_path: Path) -> None:
    with registry_server(tmp_path / "registry", listen=f"{net.hub.address}:0", argv_prefix=net.hub.argv(())) as reg:
        assert reg.host.startswith(f"{net.hub.address}:") and reg.api_ok()
        for agent in net.agents.values():
            got = agent.run([*CURL, "-o", "/dev/null", "-w", "%{http_code}", f"http://{reg.host}/v2/"],
                            capture_output=True, text=True)  # fmt: skip
            assert got.stdout == "200", got.stderr


def test_image_pushed_in_the_hub_is_served_to_agents(net: ClusterNetwork, tmp_path: Path) -> None:
    if not shutil.which("skopeo"):
        pytest.skip("skopeo is not installed (`make setup` installs it)")
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hello").write_text("hi\n")
    layout = Layout(tmp_path / "oci")
    layout.write_image([layout.write_layer(rootfs)], ImageConfig(env={"A": "1"}, workdir="/"), "tiny:1")
    with running_registry(tmp_path / "registry", listen=f"{net.hub.address}:0", argv_prefix=net.hub.argv(())) as reg:
        ref = reg.push(layout, "tiny:1", "test/tiny:1")
        assert ref == f"{reg.host}/test/tiny:1"
        accept = "Accept: application/vnd.oci.image.manifest.v1+json"
        got = net.agents["a1"].run([*CURL, "-f", "-H", accept, f"http://{reg.host}/v2/test/tiny/manifests/1"],
                                   capture_output=True, text=True)  # fmt: skip
        assert got.returncode == 0 and '"layers"' in got.stdout, got.stderr


def test_s3_server_in_the_hub_answers_agents(net: ClusterNetwork) -> None:
    client = (
        "import io, os, sys, minio\n"
        "c = minio.Minio(sys.argv[1], os.environ['KEY'], os.environ['SECRET'], secure=False)\n"
        "if not c.bucket_exists(sys.argv[2]):\n    c.make_bucket(sys.argv[2])\n"
        "c.put_object(sys.argv[2], sys.argv[3], io.BytesIO(sys.argv[3].encode()), len(sys.argv[3]))\n"
        "print(c.get_object(sys.argv[2], sys.argv[3]).read().decode())\n"
    )
    with seaweedfs.s3_server(host=net.hub.address, argv_prefix=net.hub.argv(())) as s3:
        assert s3.endpoint.startswith(f"{net.hub.address}:") and not s3.secure
        env = {**os.environ, "KEY": s3.access_key, "SECRET": s3.secret_key}
        for name, agent in net.agents.items():
            got = agent.run([sys.executable, "-c", client, s3.endpoint, s3.bucket, f"from-{name}"], env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
            assert (got.returncode, got.stdout) == (0, f"from-{name}\n"), got.stderr
