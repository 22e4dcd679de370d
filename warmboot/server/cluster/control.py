"""The control plane's cluster: the agents' API on ``WARMBOOT_CLUSTER_LISTEN``, the agents it knows, and the
launchers that put the pools' containers on them.

With it, the server runs no container itself: every start is placed on an agent. Container output comes back
with the agents' heartbeats and goes into the same per-app logs as on one machine.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from warmboot.cluster import messages, settings
from warmboot.cluster.transport import Listener, Route
from warmboot.errors import ServerRestartedError, WarmbootError
from warmboot.server.cluster.agents import AgentBook
from warmboot.server.cluster.remote import RemoteLauncher
from warmboot.server.gpu_alloc import CancelEvent

if TYPE_CHECKING:
    from warmboot.server.apps import RunningApp, Variant
    from warmboot.server.calls import Call
    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.cluster")

#: How long a restarted control plane waits for the agent of a call that was running to come back and give the
#: call's outcome, before the call ends with ServerRestartedError.
COLLECT_WAIT_S = 60.0


class ClusterControl:
    """Agents, their API, and remote launchers, for one control plane."""

    def __init__(self, plane: ControlPlane, listen: tuple[str, int]):
        self.plane = plane
        self.book = AgentBook(
            plane.state.connection,
            plane.state.lock,
            settings.join_token(),
            heartbeat_s=settings.heartbeat_s(),
            lost_after_s=settings.lost_after_s(),
        )
        self.book.on_lines(self._lines)
        book = self.book
        self.listener = Listener(
            listen[0],
            listen[1],
            {
                "register": Route(messages.Register, book.register, lambda token, _: book.join_token_ok(token)),
                "heartbeat": Route(messages.Heartbeat, book.heartbeat, book.session_ok),
            },
            name="control-plane",
        )

    def start(self) -> None:
        self.listener.start()
        self.book.watch()
        log.info("listening for agents on %s", self.listener.address)

    def stop(self) -> None:
        self.book.stop()
        self.listener.stop()

    def cancel_event(self) -> threading.Event:
        return CancelEvent(self.book.changed)  # a pool's stop wakes its starts waiting for an agent

    def launcher(self, app: RunningApp, variant: Variant, stopped: threading.Event) -> RemoteLauncher:
        fspec = variant.effective_spec(app.function_spec(variant.tag))
        return RemoteLauncher(
            self.book,
            app,
            variant,
            stopped,
            secret_env=lambda: self.plane.secret_env(fspec["secrets"]),
            on_call=self.plane.calls.placed,
        )

    def _lines(self, agent: str, lines: list[messages.ContainerLine]) -> None:
        for each in lines:  # "[warmboot@node-3] ...", "[run wc-... @node-3] ...": which machine said it
            self.plane.logs.write(each.app_name, f"{each.source}@{agent}", each.line)

    # ----- after a restart -----------------------------------------------------------------------------------

    def collect(self, call: Call, agent_name: str) -> None:
        """A call that was running on ``agent_name`` when the control plane stopped: wait (on a thread) for that
        agent to register again and give its outcome; it ends with ServerRestartedError if it never does."""
        threading.Thread(
            target=self._collect, args=(call, agent_name), name=f"collect-{call.call_id}", daemon=True
        ).start()

    def _collect(self, call: Call, agent_name: str) -> None:
        gone = ServerRestartedError(
            f"the control plane restarted while call {call.call_id} ran on agent {agent_name}, and that agent "
            "no longer knows it (it restarted too, or is gone); call it again"
        )
        with self.book.changed:
            ok = self.book.changed.wait_for(lambda: self.book.by_name(agent_name) is not None, COLLECT_WAIT_S)
            agent = self.book.by_name(agent_name) if ok else None
        if agent is None:
            call.fail(gone)
            return
        while not call.done.is_set():
            try:
                reply: Any = agent.peer.request(
                    "collect", messages.CollectCall(call.call_id, wait_s=30.0), messages.Collected, timeout=60
                )
            except WarmbootError as exc:  # the agent went away again: the outcome is lost with it
                log.info("collecting call %s from agent %s: %s", call.call_id, agent_name, exc)
                call.fail(gone)
                return
            if not reply.known:
                call.fail(gone)
                return
            if reply.outcome is not None:
                log.info("call %s: outcome collected from agent %s after the restart", call.call_id, agent_name)
                call.finish(reply.outcome)
                return
