"""The fast layer of the cluster's wire: ``warmboot.cluster.transport`` and the control plane's ``AgentBook``.

Real sockets on 127.0.0.1 (every Listener on port 0), no containers: typed round trips and streams, bearer tokens
(a refused caller never reaches a handler, nor learns the schema), errors carried across by class, aborting a
lost peer's requests, and agents registering, heartbeating and being found lost. Handlers that must stay busy
block on events the test sets; every wait has a deadline.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest

from warmboot.cluster import messages
from warmboot.cluster.transport import Listener, Peer, Route, tokens_match
from warmboot.errors import (
    ContainerCrashedError,
    FunctionTimeoutError,
    InvalidOptionError,
    PeerUnreachableError,
    ServerError,
    UnauthorizedError,
)
from warmboot.protocol import Outcome
from warmboot.server.cluster.agents import Agent, AgentBook, Placed
from warmboot.server.cluster.placement import Demand
from warmboot.server.db import Database

WAIT = 10.0  # an upper bound on waits for other threads: reached only when the code under test is broken
PROMPT = 1.0  # "promptly": far above a loopback round trip, far below any timeout in play
TOKEN = "service-token"
JOIN = "join-token"
HEARTBEAT_S, LOST_AFTER_S = 0.05, 0.3
LATE = 0.5  # scheduling slack on "lost within lost_after_s plus one check interval" (20 intervals)


@pytest.fixture
def listen() -> Iterator[Callable[[dict[str, Route]], Listener]]:
    """Start Listeners on 127.0.0.1 (port 0); all are stopped after the test."""
    started: list[Listener] = []

    def start(routes: dict[str, Route]) -> Listener:
        listener = Listener("127.0.0.1", 0, routes, name="test")
        listener.start()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        stop_soon(listener)


def stop_soon(listener: Listener) -> None:
    """Stop ``listener`` on a thread: ``stop()`` waits for the server's 0.5 s poll, which no test needs to wait for."""
    threading.Thread(target=listener.stop, daemon=True).start()


class Service:
    """Routes that count their calls; ``block`` (and the middle of ``run``) wait for ``release``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.entered = threading.Event()
        self.release = threading.Event()

    def routes(self, token: str = TOKEN) -> dict[str, Route]:
        def ok(given: str | None, _: Any) -> bool:
            return tokens_match(given, token)

        return {
            "collect": Route(messages.CollectCall, self.collect, ok),
            "run": Route(messages.RunInputs, self.run, ok, streams=True),
            "fail": Route(messages.StopContainer, self.fail, ok),
            "block": Route(messages.CollectCall, self.block, ok),
        }

    def collect(self, request: messages.CollectCall) -> messages.Collected:
        self.calls["collect"] += 1
        return messages.Collected(True, Outcome(ok=True, value=f"{request.call_id}:{request.wait_s}".encode()))

    def run(self, request: messages.RunInputs, emit: Callable[[str, Any], None]) -> messages.Outcomes:
        self.calls["run"] += 1
        (_, first), *rest = request.inputs
        emit("item", messages.Item(first))
        if not self.release.wait(WAIT):  # the caller must have had the first item before this returns
            raise FunctionTimeoutError("the first item never reached the caller")
        for _, value in rest:
            emit("item", messages.Item(value))
        return messages.Outcomes([Outcome(ok=True, value=b"%d inputs" % len(request.inputs))])

    def fail(self, request: messages.StopContainer) -> messages.Empty:
        self.calls["fail"] += 1
        if request.container_id == "crash":
            raise ContainerCrashedError("container ctr-1 died")
        if request.container_id == "timeout":
            raise FunctionTimeoutError("x")
        raise RuntimeError("boom")

    def block(self, request: messages.CollectCall) -> messages.Collected:
        self.calls["block"] += 1
        self.entered.set()
        self.release.wait(WAIT)
        return messages.Collected(False)


@pytest.fixture
def service() -> Iterator[Service]:
    s = Service()
    yield s
    s.release.set()  # no handler stays blocked past its test


def peer_to(listener: Listener, token: str = TOKEN, name: str = "svc") -> Peer:
    return Peer(f"http://{listener.address}", token, name=name)


def raw_post(listener: Listener, route: str, body: bytes, headers: dict[str, str]) -> list[dict[str, Any]]:
    """POST without a Peer (to send no token, or bytes no Peer would), returning the reply's frames."""
    conn = http.client.HTTPConnection(listener.host, listener.port, timeout=WAIT)
    try:
        conn.request("POST", f"/v1/{route}", body=body, headers=headers)
        data = conn.getresponse().read()
    finally:
        conn.close()
    frames = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        frames.append(msgspec.msgpack.decode(data[4 : 4 + length]))
        data = data[4 + length :]
    return frames


def streaming(peer: Peer, service: Service) -> Iterator[tuple[str, Any]]:
    """A ``run`` stream whose first item has arrived (so has the reply's header) while its handler blocks."""
    inputs = [("c1", b"one"), ("c2", b"two")]
    frames = peer.stream("run", messages.RunInputs("ctr-1", inputs, None, 5.0, generator=True), messages.Outcomes)
    assert next(frames) == ("item", messages.Item(b"one"))
    return frames


def run_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` on a thread; the dict gets its ``result`` or ``error``."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - the test checks which one
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


# ----- transport ---------------------------------------------------------------------------------------------


def test_typed_request_and_reply(listen, service: Service) -> None:
    peer = peer_to(listen(service.routes()))
    reply = peer.request("collect", messages.CollectCall("call-7", wait_s=2.5), messages.Collected)
    assert reply == messages.Collected(known=True, outcome=Outcome(ok=True, value=b"call-7:2.5"))
    assert service.calls == {"collect": 1}


def test_a_stream_yields_items_in_order_before_the_reply(listen, service: Service) -> None:
    peer = peer_to(listen(service.routes()))
    inputs = [("c1", b"one"), ("c2", b"two"), ("c3", b"three")]
    frames = peer.stream("run", messages.RunInputs("ctr-1", inputs, None, 5.0, generator=True), messages.Outcomes)
    # The first item arrives while the handler still waits: frames are not held back until the reply.
    assert next(frames) == ("item", messages.Item(b"one"))
    service.release.set()
    assert list(frames) == [
        ("item", messages.Item(b"two")),
        ("item", messages.Item(b"three")),
        ("reply", messages.Outcomes([Outcome(ok=True, value=b"3 inputs")])),
    ]
    # request() on a streaming route skips the items and returns the reply.
    reply = peer.request("run", messages.RunInputs("ctr-1", inputs[:2], None, 5.0), messages.Outcomes)
    assert reply == messages.Outcomes([Outcome(ok=True, value=b"2 inputs")])


def test_a_wrong_or_missing_token_is_refused_before_the_handler(listen, service: Service) -> None:
    listener = listen(service.routes())
    request = messages.CollectCall("c", 1.0)
    for token in ("wrong", TOKEN + "x", TOKEN[:-1], ""):
        with pytest.raises(UnauthorizedError, match="wrong or missing token"):
            peer_to(listener, token).request("collect", request, messages.Collected)
    body = msgspec.msgpack.encode(request)
    no_header = raw_post(listener, "collect", body, {})
    not_bearer = raw_post(listener, "collect", body, {"Authorization": f"Basic {TOKEN}"})
    refused = {
        "kind": "failure",
        "body": {"error_type": "UnauthorizedError", "message": "refused: wrong or missing token"},
    }
    assert no_header == not_bearer == [refused]
    assert service.calls == {}
    assert raw_post(listener, "collect", body, {"Authorization": f"Bearer {TOKEN}"})[0]["kind"] == "reply"
    assert service.calls == {"collect": 1}


def test_a_malformed_body_tells_only_an_authenticated_caller_what_is_wrong(listen, service: Service) -> None:
    listener = listen(service.routes())
    with pytest.raises(UnauthorizedError) as refused:
        peer_to(listener, "wrong").request("collect", messages.Empty(), messages.Collected)
    assert "CollectCall" not in str(refused.value) and "call_id" not in str(refused.value)
    garbage = raw_post(listener, "collect", b"\xc1\xc1 not msgpack", {})
    assert garbage[0]["body"]["error_type"] == "UnauthorizedError"

    with pytest.raises(InvalidOptionError) as malformed:
        peer_to(listener).request("collect", messages.Empty(), messages.Collected)
    assert malformed.type is InvalidOptionError
    assert str(malformed.value).startswith("malformed CollectCall: ") and "call_id" in str(malformed.value)
    undecodable = raw_post(listener, "collect", b"\xc1\xc1", {"Authorization": f"Bearer {TOKEN}"})
    assert undecodable[0]["body"]["error_type"] == "InvalidOptionError"
    assert undecodable[0]["body"]["message"].startswith("undecodable CollectCall: ")
    assert service.calls == {}


def test_errors_cross_by_class_and_a_bug_does_not_stop_the_listener(listen, service: Service) -> None:
    peer = peer_to(listen(service.routes()))
    with pytest.raises(ContainerCrashedError) as crashed:
        peer.request("fail", messages.StopContainer("crash"), messages.Empty)
    assert crashed.type is ContainerCrashedError and str(crashed.value) == "container ctr-1 died"

    with pytest.raises(ServerError) as bug:
        peer.request("fail", messages.StopContainer("bug"), messages.Empty)
    assert bug.type is ServerError
    assert str(bug.value) == "internal error: RuntimeError: boom"
    assert peer.request("collect", messages.CollectCall("next", 0.0), messages.Collected).known
    assert service.calls == {"fail": 2, "collect": 1}


def test_a_timeout_error_crosses_as_itself(listen, service: Service) -> None:
    peer = peer_to(listen(service.routes()))
    with pytest.raises(FunctionTimeoutError) as timeout:
        peer.request("fail", messages.StopContainer("timeout"), messages.Empty)
    assert timeout.type is FunctionTimeoutError and str(timeout.value) == "x"


def test_abort_all_refuses_new_requests_of_that_peer_only(listen, service: Service) -> None:
    listener = listen(service.routes())
    peer = peer_to(listener, name="agent a1")
    assert peer.request("collect", messages.CollectCall("c", 0), messages.Collected).known
    peer.abort_all()
    with pytest.raises(PeerUnreachableError, match="agent a1 is lost"):
        peer.request("collect", messages.CollectCall("c", 0), messages.Collected)
    assert service.calls == {"collect": 1}
    assert peer_to(listener).request("collect", messages.CollectCall("c", 0), messages.Collected).known


def test_abort_all_ends_a_request_in_flight_promptly(listen, service: Service) -> None:
    peer = peer_to(listen(service.routes()), name="agent a1")
    frames = streaming(peer, service)  # its handler now waits for service.release
    thread, out = run_in_thread(lambda: list(frames))
    aborted_at = time.monotonic()
    peer.abort_all()
    thread.join(PROMPT)
    assert not thread.is_alive() and time.monotonic() - aborted_at < PROMPT
    assert isinstance(out.get("error"), PeerUnreachableError), out
    assert "agent a1" in str(out["error"])


def test_a_peer_nobody_answers_is_unreachable_quickly(listen, service: Service) -> None:
    with socket.socket() as bound:  # a port held but not listening: nobody else can take it meanwhile
        bound.bind(("127.0.0.1", 0))
        peer = Peer(f"http://127.0.0.1:{bound.getsockname()[1]}", TOKEN, name="agent gone")
        started = time.monotonic()
        with pytest.raises(PeerUnreachableError, match=r"agent gone at http://127\.0\.0\.1:\d+ did not answer collect"):
            peer.request("collect", messages.CollectCall("c", 0), messages.Collected)
        assert time.monotonic() - started < PROMPT
    with pytest.raises(PeerUnreachableError, match="answered HTTP 404 to nowhere"):
        peer_to(listen(service.routes())).request("nowhere", messages.Empty(), messages.Empty)
    with pytest.raises(InvalidOptionError, match="not an http://HOST:PORT URL"):
        Peer("https://127.0.0.1:1", TOKEN, name="x")


# ----- the agent book, through a control plane's listener --------------------------------------------------


class Control:
    """An AgentBook behind a Listener wired as ``ClusterControl`` wires it; ``lost`` records each loss."""

    def __init__(self, db: Database) -> None:
        self.book = AgentBook(db, threading.Lock(), JOIN, heartbeat_s=HEARTBEAT_S, lost_after_s=LOST_AFTER_S)
        book = self.book
        self.listener = Listener(
            "127.0.0.1",
            0,
            {
                "register": Route(messages.Register, book.register, lambda token, _: book.join_token_ok(token)),
                "heartbeat": Route(messages.Heartbeat, book.heartbeat, book.session_ok),
            },
            name="control-plane",
        )
        self.listener.start()
        self.lost: list[tuple[Agent, float]] = []
        self.lost_event = threading.Event()
        book.on_lost(self._on_lost)

    def _on_lost(self, agent: Agent) -> None:
        self.lost.append((agent, time.monotonic()))
        self.lost_event.set()

    def register(self, name: str, url: str = "http://127.0.0.1:1", *, token: str = JOIN, incarnation: str = "i1"):
        message = messages.Register(
            name, url, "agent-token", "fp-1", messages.Resources(8, 16384, ["NVIDIA H100 80GB HBM3"]), incarnation
        )
        return Peer(f"http://{self.listener.address}", token, name="control plane").request(
            "register", message, messages.Registered
        )

    def heartbeat(self, agent_id: str, token: str, **fields: Any) -> messages.HeartbeatReply:
        beat = messages.Heartbeat(agent_id, time.time(), [], **fields)
        peer = Peer(f"http://{self.listener.address}", token, name="control plane")
        return peer.request("heartbeat", beat, messages.HeartbeatReply)


@pytest.fixture
def control(open_db: Callable[[], Database]) -> Iterator[Control]:
    """On SQLite and on PostgreSQL (the ``agents`` table is state like any other)."""
    c = Control(open_db())
    yield c
    c.book.stop()
    stop_soon(c.listener)


def test_registration_needs_the_join_token(control: Control) -> None:
    with pytest.raises(UnauthorizedError):
        control.register("n1", token="not-the-join-token")
    assert control.book.live() == [] and control.book.describe() == []

    registered = control.register("n1", "http://127.0.0.1:8702")
    assert registered.agent_id.startswith("ag-") and len(registered.session_token) >= 32
    assert (registered.heartbeat_s, registered.lost_after_s) == (HEARTBEAT_S, LOST_AFTER_S)
    (agent,) = control.book.live()
    assert (agent.agent_id, agent.name, agent.peer.url, agent.peer.token) == (
        registered.agent_id, "n1", "http://127.0.0.1:8702", "agent-token"
    )  # fmt: skip
    (row,) = control.book.describe()
    assert {k: row[k] for k in ("name", "agent_id", "url", "fingerprint", "cpus", "memory_mb", "gpus", "state")} == {
        "name": "n1", "agent_id": registered.agent_id, "url": "http://127.0.0.1:8702", "fingerprint": "fp-1",
        "cpus": 8, "memory_mb": 16384, "gpus": ["NVIDIA H100 80GB HBM3"], "state": "alive",
    }  # fmt: skip


def test_heartbeats_need_the_agents_own_session_token(control: Control) -> None:
    a, b = control.register("a"), control.register("b")
    with pytest.raises(UnauthorizedError):
        control.heartbeat(a.agent_id, b.session_token, warm=["app/f"])
    assert control.book.get(a.agent_id).warm == frozenset()

    reply = control.heartbeat(a.agent_id, a.session_token, warm=["app/f"], images=["sha256:1"])
    assert reply == messages.HeartbeatReply(known=True)
    candidate = control.book.get(a.agent_id).candidate()
    assert (candidate.warm, candidate.images) == (frozenset({"app/f"}), frozenset({"sha256:1"}))
    # An unknown session (a restarted control plane) is told to register again, whatever token it shows.
    assert control.heartbeat("ag-unknown", "any-token") == messages.HeartbeatReply(known=False)
    assert control.book.get("ag-unknown") is None


def test_a_silent_agent_is_lost_within_lost_after_s(control: Control) -> None:
    registered = control.register("n1")
    agent = control.book.get(registered.agent_id)
    with control.book.changed:
        agent.placed["ctr-1"] = Placed(Demand(cpu=1), [0])
    last_beat = time.monotonic()
    assert control.heartbeat(registered.agent_id, registered.session_token).known
    control.book.watch()
    assert control.lost_event.wait(LOST_AFTER_S + WAIT)
    ((lost, lost_at),) = control.lost
    assert lost is agent and agent.lost and agent.placed == {}
    check_interval = min(HEARTBEAT_S, LOST_AFTER_S) / 2
    assert LOST_AFTER_S <= lost_at - last_beat < LOST_AFTER_S + check_interval + LATE

    assert control.book.live() == [] and control.book.by_name("n1") is None
    (row,) = control.book.describe()
    assert (row["agent_id"], row["state"], row["containers"]) == (registered.agent_id, "lost", 0)
    assert control.heartbeat(registered.agent_id, registered.session_token) == messages.HeartbeatReply(known=False)
    with pytest.raises(PeerUnreachableError, match="agent n1 is lost"):
        agent.peer.request("collect", messages.CollectCall("c", 0), messages.Collected)


def test_losing_an_agent_aborts_its_requests_in_flight(control: Control, listen, service: Service) -> None:
    agent_api = listen(service.routes(token="agent-token"))
    registered = control.register("n1", f"http://{agent_api.address}")
    frames = streaming(control.book.get(registered.agent_id).peer, service)  # a generator call, mid-stream
    thread, out = run_in_thread(lambda: list(frames))
    control.book.watch()  # no heartbeat comes: lost after LOST_AFTER_S
    assert control.lost_event.wait(LOST_AFTER_S + WAIT)
    thread.join(PROMPT)
    assert not thread.is_alive() and isinstance(out.get("error"), PeerUnreachableError), out


def test_registering_again_under_the_same_name_replaces_the_old_agent(control: Control) -> None:
    old = control.register("n1", incarnation="i1")
    old_agent = control.book.get(old.agent_id)
    new = control.register("n1", incarnation="i2")
    assert new.agent_id != old.agent_id and new.session_token != old.session_token
    assert [agent for agent, _ in control.lost] == [old_agent] and old_agent.lost
    assert [agent.agent_id for agent in control.book.live()] == [new.agent_id]
    assert control.book.by_name("n1").agent_id == new.agent_id
    (row,) = control.book.describe()
    assert (row["agent_id"], row["state"]) == (new.agent_id, "alive")
    with pytest.raises(PeerUnreachableError, match="agent n1 is lost"):
        old_agent.peer.request("collect", messages.CollectCall("c", 0), messages.Collected)
    assert control.heartbeat(old.agent_id, old.session_token) == messages.HeartbeatReply(known=False)
    assert control.heartbeat(new.agent_id, new.session_token) == messages.HeartbeatReply(known=True)


def test_one_agent_of_a_class_at_a_time_may_make_a_snapshot_and_a_lost_agent_frees_its_claim(
    control: Control,
) -> None:
    control.register("a1", incarnation="i1")
    control.register("a2", incarnation="i2")
    a1, a2 = sorted(control.book.live(), key=lambda a: a.name)
    assert control.book.claim_snapshot("app/f", a1)
    assert not control.book.claim_snapshot("app/f", a2)  # same class: a2 boots without making one
    assert control.book.claim_snapshot("app/g", a2)  # another function: its own claim
    control.book._lose(a1, "test")
    assert control.book.claim_snapshot("app/f", a2)  # a1 died before reporting it: a2 may make it now
    control.book.release_snapshot("app/f", a2)
    assert control.book.claim_snapshot("app/f", a2)
