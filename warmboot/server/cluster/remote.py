"""Containers on agents, as a pool sees them: a launcher that places each start on an agent, and a handle that
runs inputs there.

The pool (``server.pool``) is the same as on one machine: one queue per function, scaling, retries, cancel. Only
where a container runs changes: ``RemoteLauncher`` asks the placement for an agent (waiting, with the inputs
queued, while none fits) and has it start one (restore or boot, decided there); ``RemoteContainer.call`` sends
each input to that agent. An agent that goes silent makes its calls raise :class:`AgentLostError`, which the pool
retries on another container (another agent) while ``retries`` allow, or reports, naming the agent.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from warmboot import errors
from warmboot.cluster import messages
from warmboot.errors import (
    AgentLostError,
    ContainerBootError,
    ContainerCrashedError,
    GpuAllocationCancelledError,
    PeerUnreachableError,
    WarmbootError,
)
from warmboot.protocol import Outcome
from warmboot.server.apps import APP_DIR, warm_key
from warmboot.server.cluster.agents import Agent, AgentBook, Placed
from warmboot.server.cluster.placement import Demand, choose, describe_unfit
from warmboot.worker.gpus import parse_request

if TYPE_CHECKING:
    from warmboot.server.apps import RunningApp, Variant

log = logging.getLogger("warmboot.cluster")

#: Agents a start tries before it gives up when each of them fails to answer (a start that boots user code
#: and fails is not retried: it would fail the same way anywhere).
START_ATTEMPTS = 3
#: Extra time, beyond the call's own timeout (which the agent enforces), that a reply may take in transit.
REPLY_MARGIN_S = 30.0


class RemoteContainer:
    """A container running on an agent (the pool's ``ContainerHandle``)."""

    def __init__(
        self, book: AgentBook, agent: Agent, started: messages.ContainerStarted, on_call: Callable[[str, str], None]
    ):
        self.id = started.container_id
        self.started_at = time.time()
        self.calls_served = 0
        self.agent = agent
        self.restored = started.restored
        self._ready_at = started.at
        self._book = book
        self._on_call = on_call
        self._broken = False

    @property
    def pid(self) -> int | None:
        return None  # on another machine

    def healthy(self) -> bool:
        if self._broken or self.agent.lost:
            return False
        # A heartbeat listed after this container was ready that lacks it: it died while idle.
        return not (self.agent.alive_at > self._ready_at and self.id not in self.agent.alive)

    def call(
        self,
        call_id: str,
        method: str | None,
        args: bytes,
        timeout: float,
        on_item: Callable[[bytes], None] | None = None,
    ) -> Outcome:
        (outcome,) = self._run([(call_id, args)], method, timeout, batch=False, on_item=on_item)
        return outcome

    def call_batch(self, calls: Sequence[tuple[str, bytes]], method: str | None, timeout: float) -> list[Outcome]:
        return self._run(list(calls), method, timeout, batch=True, on_item=None)

    def _run(
        self,
        inputs: list[tuple[str, bytes]],
        method: str | None,
        timeout: float,
        *,
        batch: bool,
        on_item: Callable[[bytes], None] | None,
    ) -> list[Outcome]:
        for call_id, _ in inputs:
            self._on_call(call_id, self.agent.name)  # recorded: a restarted control plane collects it there
        request = messages.RunInputs(self.id, inputs, method, timeout, batch=batch, generator=on_item is not None)
        try:
            for kind, body in self.agent.peer.stream(
                "run", request, messages.Outcomes, timeout=timeout + REPLY_MARGIN_S
            ):
                if kind == "item" and on_item is not None:
                    on_item(body.value)
                elif kind == "reply":
                    reply: messages.Outcomes = body
        except PeerUnreachableError as exc:
            self._broken = True
            self._book.suspect(self.agent)
            why = "it is lost" if self.agent.lost else str(exc)
            raise AgentLostError(
                f"agent {self.agent.name} stopped answering while container {self.id} ran call "
                f"{', '.join(c for c, _ in inputs)} ({why})"
            ) from exc
        except ContainerCrashedError:
            self._broken = True
            raise
        self.calls_served += len(inputs)
        if reply.error_type is not None:
            self._broken = True  # the agent killed the container (a timeout, a crash)
            cls = getattr(errors, reply.error_type, None)
            if not (isinstance(cls, type) and issubclass(cls, WarmbootError)):
                cls = ContainerCrashedError
            raise cls(f"{reply.message} (on agent {self.agent.name})")
        return reply.outcomes

    def shutdown(self) -> None:
        self._stop(kill=False)

    def kill(self) -> None:
        """Stop it at once (``FunctionCall.cancel()``): its running input ends on the agent too."""
        self._broken = True
        self._stop(kill=True)

    def _stop(self, *, kill: bool) -> None:
        self._book.release(self.agent, self.id)
        if self.agent.lost:
            return
        try:
            self.agent.peer.request("stop", messages.StopContainer(self.id, kill=kill), messages.Empty, timeout=30)
        except WarmbootError as exc:
            log.info("stopping container %s on agent %s: %s", self.id, self.agent.name, exc)


class RemoteLauncher:
    """Starts containers of one function (variant) on agents (the pool's ``Launch``)."""

    def __init__(
        self,
        book: AgentBook,
        app: RunningApp,
        variant: Variant,
        stopped: threading.Event,
        secret_env: Callable[[], dict[str, str]],
        on_call: Callable[[str, str], None],
    ):
        self._book = book
        self._app = app
        self._variant = variant
        self._stopped = stopped
        self._secret_env = secret_env
        self._on_call = on_call
        fspec = variant.effective_spec(app.function_spec(variant.tag))
        self.label = f"{app.record.name}.{variant.describe()}"
        self.demand = Demand.from_options(
            fspec["options"], warm_key(app.record, variant), fspec.get("image_digest", "")
        )
        record = app.record
        self._source = (Path(record.code_dir) / APP_DIR.lstrip("/") / record.app_file).read_bytes()
        self._waiting_why = ""  #: what the last start that waited for an agent logged (under the book's lock)

    def __call__(self) -> RemoteContainer:
        tried: set[str] = set()
        last: WarmbootError | None = None
        for _ in range(START_ATTEMPTS):
            agent, key = self._reserve(tried)
            began = time.monotonic()
            # The first agent of its class to boot the function makes the class's snapshot; others boot plain.
            may_snapshot = self._book.claim_snapshot(self.demand.warm_key, agent)
            made = False
            try:
                started = agent.peer.request(
                    "start", self._start_request(may_snapshot), messages.ContainerStarted, timeout=None
                )
                made = started.made_snapshot
            except PeerUnreachableError as exc:
                self._book.release(agent, key)
                self._book.suspect(agent)
                tried.add(agent.name)
                last = exc
                self._app.event(f"Agent {agent.name} did not start a container for {self.label}: {exc}")
                continue
            except BaseException:
                self._book.release(agent, key)
                raise
            finally:
                # A snapshot made is claimed until the agent's heartbeat reports holding it (agents.heartbeat).
                if may_snapshot and not made:
                    self._book.release_snapshot(self.demand.warm_key, agent)
            fc = RemoteContainer(self._book, agent, started, self._on_call)
            with self._book.changed:
                reserved = agent.placed.pop(key, None)
                if reserved is not None and not agent.lost:
                    agent.placed[fc.id] = reserved
            how = "restored" if started.restored else "cold boot"
            self._app.event(
                f"Container {fc.id} started for {self.label} on agent {agent.name} "
                f"({how} in {started.seconds:.2f} s; {time.monotonic() - began:.2f} s from here)"
            )
            return fc
        raise ContainerBootError(f"{self.label}: no agent could start a container ({last})")

    def _reserve(self, tried: set[str]) -> tuple[Agent, str]:
        """An agent with room for one more container (waiting for one while none has), with the room taken."""
        with self._book.changed:
            while True:
                if self._stopped.is_set():
                    raise GpuAllocationCancelledError(
                        f"{self.label}: the pool stopped while its start waited for an agent"
                    )
                live = self._book.live()
                open_ = [a for a in live if not a.draining and not a.suspect]
                agents = [a for a in open_ if a.name not in tried] or open_
                candidates = [a.candidate() for a in agents]
                chosen = choose(self.demand, candidates)
                if chosen is not None:
                    self._waiting_why = ""
                    agent = next(a for a in agents if a.name == chosen.name)
                    gpus: list[int] = []
                    if self.demand.gpu:
                        gpus = chosen.free_gpus(self.demand.gpu)[: parse_request(self.demand.gpu)[1]]
                    key = "starting-" + uuid.uuid4().hex[:8]
                    agent.placed[key] = Placed(self.demand, gpus)
                    return agent, key
                why = describe_unfit(self.demand, candidates)
                if live and not open_:
                    why = "every agent is draining or has just stopped answering: " + ", ".join(a.name for a in live)
                if why != self._waiting_why:  # once for all of this function's starts that wait for the same reason
                    self._app.event(f"{self.label} waits for an agent: {why}")
                    self._waiting_why = why
                self._book.changed.wait()

    def _start_request(self, may_snapshot: bool) -> messages.StartContainer:
        record = self._app.record
        return messages.StartContainer(
            app_id=record.app_id,
            app_name=record.name,
            app_state=record.state,
            spec=record.spec,
            source=self._source,
            filename=record.app_file,
            tag=self._variant.tag,
            variant=self._variant.to_json() if self._variant.key != self._variant.tag else None,
            secret_env=self._secret_env(),
            may_snapshot=may_snapshot,
        )
