"""The agent's bookkeeping on its own: apps it forgets, outcomes it keeps for a restarted control plane."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from warmboot.agent import host as agent_host
from warmboot.cluster import messages
from warmboot.protocol import Outcome


def test_past_its_bound_an_agent_forgets_the_oldest_apps_that_run_nothing_here(tmp_path: Path) -> None:
    machine = agent_host.AgentHost(tmp_path)
    for i in range(agent_host.MAX_APPS + 6):
        machine._apps[f"ap-{i}"] = (SimpleNamespace(), SimpleNamespace())
        machine._launchers[f"ap-{i}/f"] = SimpleNamespace()
        machine._warm_keys[f"ap-{i}/f"] = f"app{i}/f"
    machine._started["wc-1"] = SimpleNamespace(pool="ap-0/f")  # the oldest app still has a container here
    with machine._lock:
        machine._forget_idle_apps_locked()
    assert len(machine._apps) == agent_host.MAX_APPS
    assert "ap-0" in machine._apps and "ap-0/f" in machine._launchers  # busy: kept, however old
    gone = [f"ap-{i}" for i in range(1, 7)]
    assert not any(a in machine._apps for a in gone) and not any(f"{a}/f" in machine._warm_keys for a in gone)


def test_an_outcome_is_kept_for_collection_and_a_running_call_is_waited_for(tmp_path: Path) -> None:
    machine = agent_host.AgentHost(tmp_path)
    done = threading.Event()
    machine._running["fc-running"] = done
    machine._keep([("fc-done", b"")], [Outcome(ok=True, value=b"7")], threading.Event())
    assert machine.collect(messages.CollectCall("fc-done", 0)).outcome == Outcome(ok=True, value=b"7")
    assert machine.collect(messages.CollectCall("fc-unknown", 0)) == messages.Collected(known=False)
    waiting = machine.collect(messages.CollectCall("fc-running", 0))
    assert waiting.known and waiting.outcome is None  # still running: asked again later
