"""An agent's API (what the control plane asks of it) and its membership (registration and heartbeats).

The API listens on ``WARMBOOT_AGENT_LISTEN`` and answers only requests that bear the token this agent made at
start and gave the control plane when it registered (with the cluster's join token): knowing the agent's
address is not enough to make it run anything.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import uuid
from typing import Any

from warmboot.agent.host import AgentHost
from warmboot.cluster import messages, settings
from warmboot.cluster.transport import Listener, Peer, Route, tokens_match
from warmboot.errors import PeerUnreachableError, UnauthorizedError
from warmboot.worker import gpus, host

log = logging.getLogger("warmboot.agent")


def machine_resources() -> messages.Resources:
    """What this machine offers: its CPUs (cgroup quota aside), its memory and its GPUs."""
    return messages.Resources(
        cpus=float(len(os.sched_getaffinity(0))),
        memory_mb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20,
        gpus=[g.model for g in gpus.inventory().devices()],
    )


def fingerprint_class() -> str:
    """The agent's snapshot class, as the control plane shows it: agents with equal classes share snapshots."""
    fp = host.fingerprint()
    return f"{fp.cpu}/{fp.kernel}/criu-{fp.criu_version}"


class Agent:
    """One agent process: its machine's containers, its API, and its place in the cluster."""

    def __init__(self, machine: AgentHost | None = None):
        self.host = machine or AgentHost()
        self.name = settings.agent_name()
        self.token = secrets.token_urlsafe(32)  #: what the control plane must present to this agent's API
        self.incarnation = uuid.uuid4().hex[:12]
        listen_host, listen_port = settings.agent_listen()
        self.listener = Listener(listen_host, listen_port, self._routes(), name="agent")
        self.url = settings.agent_url(self.listener.address)
        self.control = Peer(settings.control_plane_url(), settings.join_token(), name="the control plane")
        self.agent_id: str | None = None
        self._session: Peer | None = None
        self._stop = threading.Event()
        self._sent_snapshots: list[dict[str, Any]] | None = None  #: as last sent (None: send at the next beat)

    def _routes(self) -> dict[str, Route]:
        def ours(token: str | None, _: Any) -> bool:
            return tokens_match(token, self.token)

        h = self.host
        return {
            "start": Route(messages.StartContainer, h.start, ours),
            "run": Route(messages.RunInputs, h.run, ours, streams=True),
            "stop": Route(messages.StopContainer, h.stop, ours),
            "collect": Route(messages.CollectCall, h.collect, ours),
        }

    def register(self) -> messages.Registered:
        """Join the cluster (raises :class:`UnauthorizedError` when the join token is wrong)."""
        reply = self.control.request(
            "register",
            messages.Register(
                name=self.name,
                url=self.url,
                token=self.token,
                fingerprint=fingerprint_class(),
                resources=machine_resources(),
                incarnation=self.incarnation,
            ),
            messages.Registered,
            timeout=10,
        )
        self.agent_id = reply.agent_id
        self._sent_snapshots = None  # a new session: the control plane has none of them
        self.host.orphan_all()
        self._session = Peer(self.control.url, reply.session_token, name="the control plane")
        log.info("agent %s registered as %s with %s", self.name, reply.agent_id, self.control.url)
        return reply

    def serve(self) -> None:
        """Listen, register, then heartbeat until :meth:`stop`. A wrong join token ends it with that error."""
        self.listener.start()
        log.info("agent %s listening on %s (reached as %s)", self.name, self.listener.address, self.url)
        interval = settings.heartbeat_s()
        unreachable_since: float | None = None
        try:
            while not self._stop.is_set():
                try:
                    if self._session is None:
                        interval = self.register().heartbeat_s
                    else:
                        self._heartbeat()
                    self.host.stop_idle_orphans()
                    if unreachable_since is not None:
                        log.info("the control plane answers again (after %.1f s)", time.time() - unreachable_since)
                        unreachable_since = None
                except PeerUnreachableError as exc:
                    if unreachable_since is None:
                        unreachable_since = time.time()
                        log.warning("the control plane does not answer (%s); trying again every %g s", exc, interval)
                self._stop.wait(interval)
        finally:
            self.listener.stop()

    def _heartbeat(self) -> None:
        assert self._session is not None and self.agent_id is not None
        snapshots = self.host.snapshot_rows()
        beat = messages.Heartbeat(
            agent_id=self.agent_id,
            taken_at=time.time(),
            containers=self.host.alive(),
            warm=self.host.warm(),
            images=self.host.images(),
            lines=self.host.logs.take(),
            snapshots=snapshots if snapshots != self._sent_snapshots else None,
        )
        try:
            reply = self._session.request("heartbeat", beat, messages.HeartbeatReply, timeout=10)
        except UnauthorizedError:
            reply = messages.HeartbeatReply(known=False)
        if beat.snapshots is not None and reply.known:
            self._sent_snapshots = snapshots
        if not reply.known:  # the control plane restarted, or found this agent lost: join again
            log.warning("the control plane does not know this agent's session: registering again")
            self._session = None

    def stop(self) -> None:
        self._stop.set()
