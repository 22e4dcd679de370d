"""The typed messages between the control plane and its agents.

Two directions, each authenticated by a bearer token (``transport``):

- agent -> control plane, on ``WARMBOOT_CLUSTER_LISTEN``: :class:`Register` (with the cluster's join token),
  then :class:`Heartbeat` every ``heartbeat_s`` (with the session token :class:`Registered` gave it);
- control plane -> agent, on the agent's own listener: :class:`StartContainer`, :class:`RunInputs`,
  :class:`StopContainer`, :class:`CollectCall` (with the agent's token, which the agent made itself and gave
  at registration: nobody who lacks it can make an agent run anything).

Arguments and results stay opaque cloudpickle bytes end to end: neither side unpickles them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from warmboot.protocol import Outcome


@dataclass(frozen=True)
class Resources:
    """What an agent's machine offers to containers."""

    cpus: float
    memory_mb: int
    gpus: list[str] = field(default_factory=list)  #: one model name per GPU (``"NVIDIA H100 80GB HBM3"``)


@dataclass(frozen=True)
class Register:
    """An agent joining (again, after a control-plane restart): who it is and how to reach it."""

    name: str  #: unique in the cluster (the node's name)
    url: str  #: where the control plane reaches the agent's API (``http://10.0.0.5:8702``)
    token: str  #: what the control plane must present to that API
    fingerprint: str  #: the agent's snapshot class (``worker.host.fingerprint``): who can restore whose snapshots
    resources: Resources
    incarnation: str  #: new at every agent process start: a restarted agent ran none of its old containers


@dataclass(frozen=True)
class Registered:
    agent_id: str
    session_token: str  #: what the agent presents with its heartbeats
    heartbeat_s: float
    lost_after_s: float


@dataclass(frozen=True)
class ContainerLine:
    """One line a container wrote, forwarded to the control plane's logs."""

    app_name: str
    source: str  #: ``"<tag> <container id>"``
    line: str


@dataclass(frozen=True)
class Heartbeat:
    """An agent is alive; what it runs and holds (the placement prefers agents that hold a function's snapshot)."""

    agent_id: str
    taken_at: float  #: the agent's clock when it listed ``containers`` (compared with ContainerStarted.at)
    containers: list[str]  #: ids of the containers alive on it
    warm: list[str] = field(default_factory=list)  #: ``server.apps.warm_key`` of the snapshots it holds locally
    images: list[str] = field(default_factory=list)  #: image digests it holds locally
    lines: list[ContainerLine] = field(default_factory=list)  #: container output since the last heartbeat
    #: Its snapshots as `warmboot snapshot list` rows, sent when they changed since the last heartbeat (else None)
    snapshots: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class HeartbeatReply:
    known: bool  #: False: the control plane does not know this session (it restarted): register again


@dataclass(frozen=True)
class StartContainer:
    """Start a container of one function: restore its snapshot if the agent has (or can fetch) one, else boot."""

    app_id: str
    app_name: str
    app_state: str  #: ``deployed`` or ``ephemeral``: only deployed apps snapshot
    spec: dict[str, Any]  #: the app's spec as the control plane recorded it (images pinned by digest)
    source: bytes  #: the app file
    filename: str
    tag: str
    variant: str | None  #: ``apps.Variant.to_json()`` (parameters, overrides), None for the deployed pool
    secret_env: dict[str, str]  #: the function's secrets' values now (secrets live in the control plane)
    #: Whether a cold boot may make the snapshot: one agent of a fingerprint class at a time makes it
    may_snapshot: bool = True


@dataclass(frozen=True)
class ContainerStarted:
    container_id: str
    restored: bool
    seconds: float
    at: float  #: the agent's clock when the container was ready (a later heartbeat must list it, or it died)
    made_snapshot: bool = False  #: its cold boot made the function's snapshot for the agent's class


@dataclass(frozen=True)
class RunInputs:
    """Run one input (or, ``batch``, several as one ``@modal.batched`` call) on a container."""

    container_id: str
    inputs: list[tuple[str, bytes]]  #: ``(call id, cloudpickled args)``
    method: str | None
    timeout: float
    batch: bool = False
    generator: bool = False  #: stream the values it yields (:class:`Item` frames before the outcomes)


@dataclass(frozen=True)
class Item:
    """A value a generator yielded, streamed before the outcome."""

    value: bytes


@dataclass(frozen=True)
class Outcomes:
    """How the inputs of a :class:`RunInputs` ended (one per input), or the error that ended them all."""

    outcomes: list[Outcome] = field(default_factory=list)
    error_type: str | None = None  #: a warmboot error class (``FunctionTimeoutError``, ``ContainerCrashedError``)
    message: str = ""


@dataclass(frozen=True)
class StopContainer:
    container_id: str
    kill: bool = False  #: at once (a cancelled call's container), not after its @exit hooks


@dataclass(frozen=True)
class CollectCall:
    """A restarted control plane asks for the outcome of a call it had running on this agent (waits up to
    ``wait_s`` for it to end)."""

    call_id: str
    wait_s: float


@dataclass(frozen=True)
class Collected:
    known: bool  #: False: the agent never ran it, or restarted since
    outcome: Outcome | None = None  #: None while it still runs


@dataclass(frozen=True)
class Empty:
    pass


@dataclass(frozen=True)
class Failure:
    """The reply to a request that failed: a warmboot error's class name and message."""

    error_type: str
    message: str
