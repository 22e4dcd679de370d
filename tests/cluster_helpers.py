"""A cluster on this machine for tests: a control plane (a real server with ``WARMBOOT_CLUSTER_LISTEN`` on
loopback) and agent processes (``python -m warmboot.agent``), each with its own ``WARMBOOT_HOME``.

Readiness is read from the control plane's own database (its ``agents`` table), woken by its writes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from platform_helpers import Platform, wait_for

from warmboot.devservices import processes
from warmboot.worker import container

#: Short enough that a test sees a loss quickly, long enough for a busy 2-core machine not to see false ones.
HEARTBEAT_S = "0.5"
LOST_AFTER_S = "3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class AgentProcess:
    name: str
    home: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> str:
        return (self.home / "agent.log").read_text()

    def volume(self, name: str) -> Path:
        return self.home / "volumes" / name


class Cluster:
    """A control plane and its agents; :meth:`close` stops them all and removes their homes."""

    def __init__(self, *, control_env: dict[str, str] | None = None, agent_env: dict[str, str] | None = None):
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.control = Platform(
            extra_env={
                "WARMBOOT_CLUSTER_LISTEN": self.url.removeprefix("http://"),
                "WARMBOOT_JOIN_TOKEN": self.token,
                "WARMBOOT_AGENT_LOST_S": LOST_AFTER_S,
                **(control_env or {}),
            }
        )
        self.agent_env = agent_env or {}
        self.agents: dict[str, AgentProcess] = {}

    def start(self) -> Cluster:
        self.control.start_server()
        return self

    def add_agent(self, name: str, *, env: dict[str, str] | None = None, wait: bool = True) -> AgentProcess:
        home = Path(tempfile.mkdtemp(prefix=f"warmboot-agent-{name}-", dir="/var/tmp"))
        agent_env = {
            **os.environ,
            "WARMBOOT_HOME": str(home),
            "WARMBOOT_AGENT_NAME": name,
            "WARMBOOT_CONTROL_PLANE_URL": self.url,
            "WARMBOOT_JOIN_TOKEN": self.token,
            "WARMBOOT_HEARTBEAT_S": HEARTBEAT_S,
            **self.agent_env,
            **(env or {}),
        }
        log = open(home / "agent.log", "ab")  # noqa: SIM115 - kept open for the agent's life
        proc = subprocess.Popen(
            [sys.executable, "-m", "warmboot.agent"], env=agent_env, stdout=log, stderr=log, stdin=subprocess.DEVNULL
        )
        agent = self.agents[name] = AgentProcess(name, home, proc)
        if wait:
            self.wait_state(name, "alive")
        return agent

    def agent_states(self) -> dict[str, str]:
        db = sqlite3.connect(f"file:{self.control.home / 'state.db'}?mode=ro", uri=True, timeout=10)
        try:
            return dict(db.execute("SELECT name, state FROM agents").fetchall())
        except sqlite3.OperationalError:  # the table is made when the server starts
            return {}
        finally:
            db.close()

    def wait_state(self, name: str, state: str, timeout: float = 60) -> None:
        agent = self.agents.get(name)

        def reached() -> bool:
            if agent is not None and state == "alive" and agent.process.poll() is not None:
                raise AssertionError(f"agent {name} exited {agent.process.returncode}:\n{agent.log[-3000:]}")
            return self.agent_states().get(name) == state

        wait_for(f"agent {name} {state}", reached, watch=self.control.home, timeout=timeout)

    def kill_agent(self, name: str) -> None:
        """The machine dies: the agent and its containers are killed at once, nothing is said to anyone."""
        agent = self.agents[name]
        processes.kill_agent(agent.process, agent.home)

    def stop_agent(self, name: str) -> None:
        agent = self.agents[name]
        processes.stop(agent.process, timeout=60)
        container.remove_leftovers(agent.home / "containers", f"agent {name}")

    def close(self) -> None:
        for name, agent in self.agents.items():
            if agent.process.poll() is None:
                self.stop_agent(name)
        self.control.close()
        for agent in self.agents.values():
            shutil.rmtree(agent.home, ignore_errors=True)
