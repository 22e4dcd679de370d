"""A control plane and agents on this machine: placement, snapshots shared between agents of one fingerprint
class (and never across classes), images pulled from a registry, an agent killed mid-call, a control-plane
restart mid-call, and agents with the wrong token.

Real processes throughout: the server, ``python -m warmboot.agent``, the CLI and SDK, containers, CRIU, a
SeaweedFS S3 server and Debian's docker-registry.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import AgentProcess, Cluster
from platform_helpers import wait_for
from registry_helpers import Registry
from s3_helpers import s3_server  # noqa: F401 - the session's S3 server

from warmboot.cluster import messages
from warmboot.cluster.transport import Peer
from warmboot.errors import UnauthorizedError
from warmboot.worker.snapshot_remote import S3Settings

APP = """
import os
import pathlib

import warmboot as modal

app = modal.App({name!r})
marks = modal.Volume.from_name("marks", create_if_missing=True)
TOKEN = os.urandom(8).hex()  # drawn at import: a restored copy has the token of the snapshot's container
TABLE = list(range(200_000))


@app.function(enable_memory_snapshot=True, volumes={{"/marks": marks}}, retries={retries})
def work(x):
    here = pathlib.Path("/marks")
    (here / f"started-{{x}}").write_text(os.environ["WARMBOOT_CONTAINER_ID"])
    # The test holds calls on one agent with a FIFO in that agent's volume (volumes are per agent): reading it
    # waits until the test writes to it.
    if (here / "gate").exists():
        (here / "gate").read_text()
    return {{"token": TOKEN, "value": TABLE[x], "container": os.environ["WARMBOOT_CONTAINER_ID"]}}
"""


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    yield c.start()
    c.close()


def deploy(cluster: Cluster, *, retries: int = 0) -> str:
    name = f"cl-{uuid.uuid4().hex[:6]}"
    path = cluster.control.write_app(name.replace("-", "_"), APP.format(name=name, retries=retries))
    cluster.control.cli("deploy", str(path))
    return name


def call(cluster: Cluster, name: str, x: int, *, check: bool = True) -> dict:
    out = cluster.control.python(
        f"import json, warmboot; print(json.dumps(warmboot.Function.from_name({name!r}, 'work').remote({x})))",
        check=check,
    )
    if not check and out.returncode != 0:
        return {"error": out.stderr}
    return json.loads(out.stdout.strip().splitlines()[-1])


def started_on(cluster: Cluster, name: str, container: str) -> str:
    """The agent the control plane's log says the container started on."""
    for line in cluster.control.log_text(name).splitlines():
        if f"Container {container} started for" in line and " on agent " in line:
            return line.split(" on agent ")[1].split(" ")[0]
    raise AssertionError(f"no start of {container} in the log:\n{cluster.control.log_text(name)}")


def blocking_agent(cluster: Cluster, agent: str) -> AgentProcess:
    """An agent whose calls wait, once started, until the test releases them (:func:`release`)."""
    started = cluster.agents.get(agent) or cluster.add_agent(agent)
    started.volume("marks").mkdir(parents=True, exist_ok=True)
    os.mkfifo(started.volume("marks") / "gate")
    return started


def release(agent: AgentProcess) -> None:
    """Let the call waiting on the agent's gate go on (opening the FIFO waits for that call to read it)."""
    (agent.volume("marks") / "gate").write_text("go")


def spawn(cluster: Cluster, name: str, x: int) -> str:
    """``work.spawn(x)``'s call id."""
    return cluster.control.python(
        f"import warmboot; print(warmboot.Function.from_name({name!r}, 'work').spawn({x}).object_id)"
    ).stdout.strip()


def wait_started(cluster: Cluster, agent: str, x: int) -> None:
    volume = cluster.agents[agent].volume("marks")
    wait_for(f"call {x} started on {agent}", lambda: (volume / f"started-{x}").exists(), watch=volume)


def test_agents_of_one_class_restore_one_snapshot_and_another_class_never_does(
    s3_server: S3Settings,  # noqa: F811
    registry: Registry,
) -> None:
    s3 = {
        "WARMBOOT_S3_ENDPOINT": f"http://{s3_server.endpoint}",
        "WARMBOOT_S3_ACCESS_KEY": s3_server.access_key,
        "WARMBOOT_S3_SECRET_KEY": s3_server.secret_key,
        "WARMBOOT_S3_BUCKET": f"cl-{uuid.uuid4().hex[:8]}",
        "WARMBOOT_REGISTRY_INSECURE": "1",
    }
    cluster = Cluster(control_env={"WARMBOOT_REGISTRY": registry.host, "WARMBOOT_REGISTRY_INSECURE": "1"}, agent_env=s3)
    try:
        cluster.start()
        cluster.add_agent("maker")
        name = deploy(cluster)
        made = call(cluster, name, 1)
        assert started_on(cluster, name, made["container"]) == "maker"
        wait_for(
            "the maker pushed its snapshot",
            lambda: "Pushed memory snapshot" in cluster.control.log_text(name),
            watch=cluster.control.home / "logs",
        )
        # The image came from the registry, into the agent's own home.
        assert list((cluster.agents["maker"].home / "images" / "pulled").iterdir())
        # The control plane lists the agents' snapshots (each agent reports its own with its heartbeats).
        wait_for(
            "the maker's snapshot listed by the control plane",
            lambda: f"{name}.work @maker" in cluster.control.cli("snapshot", "list").stdout,
            watch=cluster.control.home,
        )

        # Another fingerprint class (an operator's label) boots cold and makes its own snapshot.
        cluster.add_agent("other-class", env={"WARMBOOT_FINGERPRINT_EXTRA": "class-b"})
        cluster.stop_agent("maker")
        cluster.wait_state("maker", "lost")
        other = call(cluster, name, 2)
        assert started_on(cluster, name, other["container"]) == "other-class"
        assert other["value"] == 2 and other["token"] != made["token"], "another class must never restore it"

        # Two agents of the maker's class restore the maker's snapshot, fetched from object storage.
        cluster.stop_agent("other-class")
        cluster.wait_state("other-class", "lost")
        for i, agent in enumerate(("same-1", "same-2"), start=3):
            cluster.add_agent(agent)
            restored = call(cluster, name, i)
            assert started_on(cluster, name, restored["container"]) == agent
            assert restored["value"] == i and restored["token"] == made["token"], f"{agent} must restore a copy"
            assert "Fetched memory snapshot" in cluster.agents[agent].log or "Fetched memory snapshot" in (
                cluster.control.log_text(name)
            )
            cluster.stop_agent(agent)
            cluster.wait_state(agent, "lost")
        log = cluster.control.log_text(name)
        assert log.count(f"started for {name}.work on agent same-") == 2 and "restored in" in log, log
    finally:
        cluster.close()


def test_an_agent_killed_mid_call_gives_a_retry_elsewhere_or_an_error_naming_it(cluster: Cluster) -> None:
    blocking_agent(cluster, "first")
    retried_name = deploy(cluster, retries=1)
    spawned = spawn(cluster, retried_name, 5)
    wait_started(cluster, "first", 5)
    cluster.add_agent("second")
    cluster.kill_agent("first")
    result = json.loads(
        cluster.control.python(
            f"import json, warmboot; print(json.dumps(warmboot.FunctionCall.from_id({spawned!r}).get(timeout=120)))"
        ).stdout.strip()
    )
    assert result["value"] == 5 and started_on(cluster, retried_name, result["container"]) == "second"
    assert "agent first stopped answering" in cluster.control.log_text(retried_name)

    # Without retries the call fails, naming the lost agent.
    blocking_agent(cluster, "second")
    once = deploy(cluster, retries=0)
    spawned = spawn(cluster, once, 6)
    wait_started(cluster, "second", 6)
    cluster.kill_agent("second")
    failed = cluster.control.python(
        f"import warmboot; warmboot.FunctionCall.from_id({spawned!r}).get(timeout=120)", check=False
    )
    assert failed.returncode != 0
    assert "AgentLostError" in failed.stderr and "agent second" in failed.stderr, failed.stderr


def test_a_control_plane_restart_mid_call_loses_nothing(cluster: Cluster) -> None:
    agent = blocking_agent(cluster, "steady")
    name = deploy(cluster)
    spawned = spawn(cluster, name, 7)
    wait_started(cluster, "steady", 7)
    cluster.control.restart_server()
    cluster.wait_state("steady", "alive")
    release(agent)
    result = json.loads(
        cluster.control.python(
            f"import json, warmboot; print(json.dumps(warmboot.FunctionCall.from_id({spawned!r}).get(timeout=120)))"
        ).stdout.strip()
    )
    assert result["value"] == 7
    # It ran once, on the container that was running it before the restart.
    assert (agent.volume("marks") / "started-7").read_text() == result["container"]
    # The restarted control plane places new calls too.
    (agent.volume("marks") / "gate").unlink()
    assert call(cluster, name, 8)["value"] == 8


def test_an_agent_with_a_wrong_token_is_refused(cluster: Cluster) -> None:
    intruder = cluster.add_agent("intruder", env={"WARMBOOT_JOIN_TOKEN": "not-the-cluster-token-at-all"}, wait=False)
    assert intruder.process.wait(timeout=60) == 1
    assert "refused: wrong or missing token" in intruder.log
    assert "intruder" not in cluster.agent_states()

    # An agent's own API refuses whoever lacks the token it gave the control plane.
    honest = cluster.add_agent("honest")
    url = next(line.split("reached as ")[1].rstrip(")") for line in honest.log.splitlines() if "reached as " in line)
    with pytest.raises(UnauthorizedError):
        Peer(url, cluster.token, name="agent honest").request(
            "stop", messages.StopContainer("wc-anything"), messages.Empty, timeout=10
        )


def test_agent_list_shows_the_cluster(cluster: Cluster, tmp_path: Path) -> None:
    cluster.add_agent("listed")
    table = cluster.control.cli("agent", "list").stdout
    assert "listed" in table and "alive" in table


WEB_APP = """
import warmboot as modal

app = modal.App({name!r})


@app.function()
@modal.asgi_app()
def site():
    async def asgi(scope, receive, send):
        await send({{"type": "http.response.start", "status": 200, "headers": []}})
        await send({{"type": "http.response.body", "body": b"hello"}})

    return asgi
"""


def test_a_web_endpoint_on_a_cluster_is_a_clear_error_not_a_hang(cluster: Cluster) -> None:
    import httpx

    name = f"clweb-{uuid.uuid4().hex[:6]}"
    path = cluster.control.write_app(name.replace("-", "_"), WEB_APP.format(name=name))
    cluster.control.cli("deploy", str(path))
    response = httpx.get(f"{cluster.control.gateway_url}/{name}-site/", timeout=30)
    assert response.status_code == 501
    assert "web endpoints do not run on a cluster yet" in response.text


def test_cancelling_a_call_running_on_an_agent_stops_its_container_there(cluster: Cluster) -> None:
    agent = blocking_agent(cluster, "runner")
    name = deploy(cluster)
    spawned = spawn(cluster, name, 9)
    wait_started(cluster, "runner", 9)
    container = (agent.volume("marks") / "started-9").read_text()
    cancelled = cluster.control.python(
        f"""
        import warmboot
        call = warmboot.FunctionCall.from_id({spawned!r})
        call.cancel()
        try:
            call.get(timeout=60)
        except warmboot.exception.InputCancelledError as exc:
            print("cancelled:", exc)
        """
    )
    assert "cancelled:" in cancelled.stdout, cancelled.stdout + cancelled.stderr
    containers = agent.home / "containers"
    wait_for(f"container {container} gone", lambda: not (containers / container).exists(), watch=containers)


def test_one_agent_of_a_class_makes_the_snapshot_when_two_boot_at_once(cluster: Cluster) -> None:
    for agent in ("twin-a", "twin-b"):
        blocking_agent(cluster, agent)  # each call waits: the second one needs a second container
    name = deploy(cluster)
    ids = cluster.control.python(
        f"""
        import warmboot
        f = warmboot.Function.from_name({name!r}, "work")
        print(f.spawn(1).object_id, f.spawn(2).object_id)
        """
    ).stdout.split()
    volumes = [cluster.agents[a].volume("marks") for a in ("twin-a", "twin-b")]
    wait_for(
        "both calls running, one container each",  # the heartbeats' writes to the control plane's state wake it
        lambda: all(any((v / f"started-{x}").exists() for v in volumes) for x in (1, 2)),
        watch=cluster.control.home,
    )
    for agent in ("twin-a", "twin-b"):
        release(cluster.agents[agent])  # each runs one of the two calls
    get = f"[warmboot.FunctionCall.from_id(i).get(timeout=120) for i in {ids!r}]"
    results = json.loads(cluster.control.python(f"import json, warmboot; print(json.dumps({get}))").stdout.strip())
    agents = {started_on(cluster, name, r["container"]) for r in results}
    assert agents == {"twin-a", "twin-b"}, "the two calls ran on the two agents"
    log = lambda: cluster.control.log_text(name)  # noqa: E731
    wait_for(
        "both agents' starts forwarded",
        lambda: log().count(f"started for {name}.work (cold boot") == 2,
        watch=cluster.control.home / "logs",
    )
    assert log().count("Creating memory snapshot") == 1, log()
