"""The agents a control plane knows: their registration, heartbeats, what is placed on them, and their loss.

An agent registers with the join token and gets a session token for its heartbeats; the control plane keeps
the token the agent gave for its own API, in memory only (a restarted control plane tells the agent, at its next
heartbeat, to register again). An agent silent for ``WARMBOOT_AGENT_LOST_S`` is lost: every request in flight
to it is aborted (its calls are retried elsewhere or fail naming it) and nothing more is placed on it until it
registers again. The ``agents`` table keeps who registered, from where, and when each was last seen or lost.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from warmboot.cluster import messages
from warmboot.cluster.transport import Peer, tokens_match
from warmboot.server.cluster.placement import Candidate, Demand
from warmboot.server.db import Database

log = logging.getLogger("warmboot.cluster")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL,
    url TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    cpus REAL NOT NULL,
    memory_mb INTEGER NOT NULL,
    gpus TEXT NOT NULL,
    state TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
"""


@dataclass
class Placed:
    """A container on an agent, and what it reserves there."""

    demand: Demand
    gpus: list[int]


@dataclass
class Agent:
    """A registered agent, as the control plane knows it now."""

    agent_id: str
    name: str
    url: str
    fingerprint: str
    resources: messages.Resources
    incarnation: str
    session_token: str
    peer: Peer
    registered_at: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    lost: bool = False
    draining: bool = False  #: takes no new container (``warmboot agent drain``); its containers run on
    #: A request to it just failed (a dropped connection): no new container goes there until it heartbeats again,
    #: so that a retry is not sent to a machine that is dying before the silence marks it lost.
    suspect: bool = False
    placed: dict[str, Placed] = field(default_factory=dict)  #: container id (or reservation) -> what it holds
    alive: set[str] = field(default_factory=set)  #: containers alive at the last heartbeat
    alive_at: float = 0.0  #: the agent's clock when it listed them
    warm: frozenset[str] = frozenset()
    images: frozenset[str] = frozenset()
    snapshots: list[dict[str, object]] = field(default_factory=list)  #: its `snapshot list` rows, as last sent

    def candidate(self) -> Candidate:
        return Candidate(
            self.name,
            self.resources.cpus,
            self.resources.memory_mb,
            list(self.resources.gpus),
            used_cpu=sum(p.demand.cpu for p in self.placed.values()),
            used_memory_mb=sum(p.demand.memory_mb for p in self.placed.values()),
            used_gpus={i for p in self.placed.values() for i in p.gpus},
            containers=len(self.placed),
            warm=self.warm,
            images=self.images,
        )


class AgentBook:
    """Registered agents, guarded by one condition that wakes starts waiting for room (``changed``)."""

    def __init__(
        self, db: Database, db_lock: threading.Lock, join_token: str, *, heartbeat_s: float, lost_after_s: float
    ):
        self._db = db
        self._db_lock = db_lock
        self._join_token = join_token
        self.heartbeat_s = heartbeat_s
        self.lost_after_s = lost_after_s
        self.changed = threading.Condition()
        self._agents: dict[str, Agent] = {}  #: by agent id
        #: (warm key, fingerprint class) -> the agent whose start may make that class's snapshot of the function
        self._snapshotting: dict[tuple[str, str], str] = {}
        self._on_lost: list[Callable[[Agent], None]] = []
        self._on_lines: Callable[[str, list[messages.ContainerLine]], None] = lambda agent, lines: None
        self._stop = threading.Event()
        with db_lock:
            db.executescript(_SCHEMA)
            db.execute("UPDATE agents SET state = 'unknown' WHERE state = 'alive'")  # until they heartbeat again

    # ----- what agents send -----------------------------------------------------------------------------------

    def join_token_ok(self, token: str | None) -> bool:
        return tokens_match(token, self._join_token)

    def session_ok(self, token: str | None, beat: messages.Heartbeat | None) -> bool:
        with self.changed:
            agent = self._agents.get(beat.agent_id) if beat is not None else None
        if agent is None:  # unknown session (a restarted control plane): answered "register again", no secrets
            return beat is not None and token is not None
        return tokens_match(token, agent.session_token)

    def register(self, request: messages.Register) -> messages.Registered:
        agent = Agent(
            agent_id="ag-" + uuid.uuid4().hex[:12],
            name=request.name,
            url=request.url,
            fingerprint=request.fingerprint,
            resources=request.resources,
            incarnation=request.incarnation,
            session_token=secrets.token_urlsafe(32),
            peer=Peer(request.url, request.token, name=f"agent {request.name}"),
        )
        with self.changed:
            replaced = [a for a in self._agents.values() if a.name == request.name]
            for old in replaced:
                del self._agents[old.agent_id]
            self._agents[agent.agent_id] = agent
            self.changed.notify_all()
        for old in replaced:
            # A new process (or a new session) under the same name: the old one's containers are not to be trusted.
            again = "restarted" if old.incarnation != request.incarnation else "same process"
            self._lose(old, f"it registered again ({again})")
        gpus = ",".join(request.resources.gpus)
        with self._db_lock:
            self._db.execute(
                "INSERT INTO agents (name, agent_id, url, fingerprint, cpus, memory_mb, gpus, state, registered_at, "
                "last_seen) VALUES (?, ?, ?, ?, ?, ?, ?, 'alive', ?, ?) ON CONFLICT (name) DO UPDATE SET "
                "agent_id = excluded.agent_id, url = excluded.url, fingerprint = excluded.fingerprint, "
                "cpus = excluded.cpus, memory_mb = excluded.memory_mb, gpus = excluded.gpus, state = 'alive', "
                "registered_at = excluded.registered_at, last_seen = excluded.last_seen",
                (request.name, agent.agent_id, request.url, request.fingerprint, request.resources.cpus,
                 request.resources.memory_mb, gpus, agent.registered_at, agent.registered_at),
            )  # fmt: skip
        log.info(
            "agent %s registered from %s (%g CPU, %d MiB, %d GPU, class %s)",
            request.name, request.url, request.resources.cpus, request.resources.memory_mb,
            len(request.resources.gpus), request.fingerprint,
        )  # fmt: skip
        return messages.Registered(agent.agent_id, agent.session_token, self.heartbeat_s, self.lost_after_s)

    def heartbeat(self, beat: messages.Heartbeat) -> messages.HeartbeatReply:
        with self.changed:
            agent = self._agents.get(beat.agent_id)
            if agent is None or agent.lost:
                return messages.HeartbeatReply(known=False)
            agent.last_seen = time.monotonic()
            agent.suspect = False
            agent.alive = set(beat.containers)
            agent.alive_at = beat.taken_at
            agent.warm = frozenset(beat.warm)
            for key in agent.warm:  # made: the class holds it from now on
                self._snapshotting.pop((key, agent.fingerprint), None)
            agent.images = frozenset(beat.images)
            if beat.snapshots is not None:
                agent.snapshots = beat.snapshots
            self.changed.notify_all()
        if beat.lines:
            self._on_lines(agent.name, beat.lines)
        with self._db_lock:
            self._db.execute("UPDATE agents SET last_seen = ? WHERE agent_id = ?", (time.time(), beat.agent_id))
        return messages.HeartbeatReply(known=True)

    # ----- placement's view -------------------------------------------------------------------------------------

    def live(self) -> list[Agent]:
        with self.changed:
            return [a for a in self._agents.values() if not a.lost]

    def get(self, agent_id: str) -> Agent | None:
        with self.changed:
            return self._agents.get(agent_id)

    def by_name(self, name: str) -> Agent | None:
        with self.changed:
            return next((a for a in self._agents.values() if a.name == name and not a.lost), None)

    def claim_snapshot(self, warm_key: str, agent: Agent) -> bool:
        """Whether a cold boot of this function on ``agent`` may make its class's snapshot: one agent of a class at
        a time, none while an agent of the class reports holding it; a lost agent's claim goes with it."""
        claim = (warm_key, agent.fingerprint)
        with self.changed:
            if claim in self._snapshotting or any(
                warm_key in a.warm for a in self._agents.values() if a.fingerprint == agent.fingerprint and not a.lost
            ):
                return False
            self._snapshotting[claim] = agent.agent_id
            return True

    def release_snapshot(self, warm_key: str, agent: Agent) -> None:
        with self.changed:
            self._snapshotting.pop((warm_key, agent.fingerprint), None)

    def snapshot_rows(self) -> list[dict[str, object]]:
        """The live agents' snapshots, each row naming its agent (`warmboot snapshot list` on a cluster)."""
        with self.changed:
            agents = [a for a in self._agents.values() if not a.lost]
        return [{**row, "agent": a.name} for a in sorted(agents, key=lambda a: a.name) for row in a.snapshots]

    def drain(self, name: str, *, on: bool) -> bool:
        """Place no new container on agent ``name`` (or again, ``on=False``); False if no such live agent."""
        with self.changed:
            agent = next((a for a in self._agents.values() if a.name == name and not a.lost), None)
            if agent is None:
                return False
            agent.draining = on
            self.changed.notify_all()
        log.info("agent %s %s", name, "drains: no new containers go there" if on else "takes containers again")
        return True

    def suspect(self, agent: Agent) -> None:
        """A request to ``agent`` failed: place nothing there until its next heartbeat."""
        with self.changed:
            agent.suspect = True

    def release(self, agent: Agent, key: str) -> None:
        with self.changed:
            agent.placed.pop(key, None)
            self.changed.notify_all()

    def describe(self) -> list[dict[str, object]]:
        """Every agent ever registered, with its state (``warmboot agent list``)."""
        with self._db_lock:
            rows = self._db.execute(
                "SELECT name, agent_id, url, fingerprint, cpus, memory_mb, gpus, state, registered_at, last_seen "
                "FROM agents ORDER BY name"
            ).fetchall()
        with self.changed:
            live = {a.name: a for a in self._agents.values()}
        out = []
        for name, agent_id, url, fp, cpus, memory_mb, gpus, state, registered_at, last_seen in rows:
            agent = live.get(name)
            if agent is not None and agent.draining and not agent.lost:
                state = "draining"
            out.append({
                "name": name, "agent_id": agent_id, "url": url, "fingerprint": fp, "cpus": cpus,
                "memory_mb": memory_mb, "gpus": [g for g in gpus.split(",") if g], "state": state,
                "registered_at": registered_at, "last_seen": last_seen,
                "containers": len(agent.placed) if agent is not None and not agent.lost else 0,
            })  # fmt: skip
        return out

    # ----- loss --------------------------------------------------------------------------------------------------

    def on_lost(self, hook: Callable[[Agent], None]) -> None:
        self._on_lost.append(hook)

    def on_lines(self, sink: Callable[[str, list[messages.ContainerLine]], None]) -> None:
        self._on_lines = sink

    def watch(self) -> None:
        """Mark agents lost when they fall silent (a thread, until :meth:`stop`)."""
        threading.Thread(target=self._watch, name="agent-watch", daemon=True).start()

    def _watch(self) -> None:
        while not self._stop.wait(min(self.heartbeat_s, self.lost_after_s) / 2):
            now = time.monotonic()
            with self.changed:
                silent = [a for a in self._agents.values() if not a.lost and now - a.last_seen > self.lost_after_s]
            for agent in silent:
                self._lose(agent, f"silent for {now - agent.last_seen:.1f} s")

    def _lose(self, agent: Agent, why: str) -> None:
        with self.changed:
            if agent.lost:
                return
            agent.lost = True
            placed = len(agent.placed)
            agent.placed.clear()
            for claim in [c for c, holder in self._snapshotting.items() if holder == agent.agent_id]:
                del self._snapshotting[claim]  # another agent of its class may make that snapshot now
            self.changed.notify_all()
        log.warning("agent %s is lost: %s; %d container(s) still placed on it are gone", agent.name, why, placed)
        agent.peer.abort_all()  # its calls in flight end now (retried elsewhere, or failed naming it)
        with self._db_lock:
            self._db.execute("UPDATE agents SET state = 'lost' WHERE agent_id = ?", (agent.agent_id,))
        for hook in list(self._on_lost):
            hook(agent)

    def stop(self) -> None:
        self._stop.set()
