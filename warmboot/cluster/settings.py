"""The environment the control plane and the agents read (one place, so the Kubernetes manifests' test can
check what they set against it).

Control plane: ``WARMBOOT_CLUSTER_LISTEN`` (``HOST:PORT`` of the agents' API; unset: the single-machine mode,
where the server runs its containers itself), ``WARMBOOT_JOIN_TOKEN[_FILE]``.
Agent: ``WARMBOOT_CONTROL_PLANE_URL``, ``WARMBOOT_JOIN_TOKEN[_FILE]``, ``WARMBOOT_AGENT_NAME`` (default: the host
name), ``WARMBOOT_AGENT_LISTEN`` (default ``127.0.0.1:0``), ``WARMBOOT_AGENT_URL`` (how the control plane
reaches it; default ``http://`` + the address it listens on), ``WARMBOOT_FINGERPRINT_EXTRA``.
Both: ``WARMBOOT_HEARTBEAT_S`` (1), ``WARMBOOT_AGENT_LOST_S`` (5: an agent silent that long is lost).
"""

from __future__ import annotations

import os
import socket

from warmboot import config
from warmboot.errors import HostSetupError, InvalidOptionError


def join_token() -> str:
    """The cluster's join token: agents present it to register. Refuses to run without one, or a short one."""
    token = config.value_or_file("WARMBOOT_JOIN_TOKEN")
    if not token:
        raise HostSetupError(
            "no join token: set WARMBOOT_JOIN_TOKEN_FILE (or WARMBOOT_JOIN_TOKEN) to the same secret on the "
            "control plane and every agent, e.g. `openssl rand -hex 32`"
        )
    if len(token) < 16:
        raise HostSetupError("the join token is shorter than 16 characters: use a long random one")
    return token


def split_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidOptionError(f"{what}={text!r} is not HOST:PORT (e.g. 127.0.0.1:8701)")
    return host.strip("[]"), int(port)


def cluster_listen() -> tuple[str, int] | None:
    """Where the control plane listens for agents, or None: no cluster (the single-machine default)."""
    text = os.environ.get("WARMBOOT_CLUSTER_LISTEN")
    return split_address(text, "WARMBOOT_CLUSTER_LISTEN") if text else None


def control_plane_url() -> str:
    url = os.environ.get("WARMBOOT_CONTROL_PLANE_URL")
    if not url:
        raise HostSetupError("an agent needs WARMBOOT_CONTROL_PLANE_URL (e.g. http://10.0.0.1:8701)")
    return url


def agent_name() -> str:
    return os.environ.get("WARMBOOT_AGENT_NAME") or socket.gethostname()


def agent_listen() -> tuple[str, int]:
    return split_address(os.environ.get("WARMBOOT_AGENT_LISTEN", "127.0.0.1:0"), "WARMBOOT_AGENT_LISTEN")


def agent_url(listening: str) -> str:
    return os.environ.get("WARMBOOT_AGENT_URL") or f"http://{listening}"


def heartbeat_s() -> float:
    return float(os.environ.get("WARMBOOT_HEARTBEAT_S", "1"))


def lost_after_s() -> float:
    return float(os.environ.get("WARMBOOT_AGENT_LOST_S", "5"))
