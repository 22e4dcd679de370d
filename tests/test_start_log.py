"""Start times as data (``server.start_log``): each cold boot and restore with its phases, the percentiles
`warmboot snapshot list` shows, and the choice between restoring and booting cold.

The fast layer runs on an in-memory database and made-up times; the end-to-end test reads what a real server
recorded for real restores.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from collections.abc import Callable

import pytest
from platform_helpers import SNAPSHOT_LIST_COLUMNS, WARMBOOT, Platform

from warmboot.server.db import Database
from warmboot.server.start_log import KEEP_PER_KEY, StartChoice, StartLog, StartStats, cold_is_faster, stats_of


@pytest.fixture
def log(open_db: Callable[[], Database]) -> StartLog:
    return StartLog(open_db(), threading.Lock())


def test_percentiles_and_phase_medians() -> None:
    rows = [(float(ms), {"criu_ms": ms / 2}) for ms in (100, 110, 120, 130, 300)]
    stats = stats_of(rows)
    assert (stats.n, stats.p50_ms, stats.p95_ms) == (5, 120.0, 266.0)
    assert stats.phases_p50_ms == {"criu_ms": 60.0}
    assert stats_of([]) == StartStats()


def test_the_log_records_phases_adds_the_first_input_and_keeps_a_bounded_history(log: StartLog) -> None:
    row = log.record("k", "restore", "wc-1", 80.0, {"check_ms": 2.0, "criu_restore_ms": 50.0})
    log.first_input(row, 3.5)
    [recorded] = log.rows("k")
    assert recorded["phases"] == {"check_ms": 2.0, "criu_restore_ms": 50.0, "first_input_ms": 3.5}
    for i in range(KEEP_PER_KEY + 10):
        log.record("k", "cold", f"wc-{i}", 1000.0 + i, {})
    assert log.stats("k", "cold", last=10_000).n == KEEP_PER_KEY
    assert log.stats("k", "restore").n == 1, "pruning one kind leaves the other"


def _stats(p50: float, n: int = 5) -> StartStats:
    return StartStats(n, p50, p50)


def test_cold_wins_only_when_clearly_faster_with_enough_samples_of_each() -> None:
    assert cold_is_faster(_stats(50), _stats(70))
    assert not cold_is_faster(_stats(66), _stats(70)), "within 5% and 5 ms: not clearly faster"
    assert not cold_is_faster(_stats(10, n=2), _stats(70)), "two cold boots decide nothing"
    assert not cold_is_faster(_stats(200), _stats(70))


def test_the_choice_switches_says_why_once_and_rechecks_the_other_kind() -> None:
    choice = StartChoice(recheck_every=10)
    kinds = [choice.next_kind(_stats(90), _stats(70)) for _ in range(9)]
    assert kinds == [("restore", None)] * 9
    kind, why = choice.next_kind(_stats(90), _stats(70))  # the 10th of a close race: a cold boot, to compare
    assert kind == "cold" and "now and then" in (why or "")
    kind, why = choice.next_kind(_stats(40), _stats(70))
    assert kind == "cold" and why is not None and why.startswith("booting cold: a cold boot (p50 40 ms)")
    assert choice.next_kind(_stats(40), _stats(70)) == ("cold", None), "said once"
    kinds = [choice.next_kind(_stats(40), _stats(70))[0] for _ in range(8)]
    assert kinds == ["cold"] * 7 + ["restore"], "the 20th start restores, to recheck"
    kind, why = choice.next_kind(_stats(90), _stats(70))
    assert kind == "restore" and (why or "").startswith("restoring again")


def test_a_restore_that_wins_by_far_is_rechecked_rarely_and_the_setting_turns_it_off() -> None:
    rare = StartChoice(recheck_every=10, clear_win_recheck_s=3600)
    assert [rare.next_kind(_stats(4000), _stats(250))[0] for _ in range(50)] == ["restore"] * 50
    due = StartChoice(recheck_every=10, clear_win_recheck_s=0)
    assert due.next_kind(_stats(4000), _stats(250))[0] == "cold", "once the interval has passed"
    always = StartChoice(recheck_every=1, always_restore=True)
    assert [always.next_kind(_stats(10), _stats(250)) for _ in range(5)] == [("restore", None)] * 5


SOURCE = """
import os
import time

import warmboot as modal

app = modal.App({app!r})


@app.cls(enable_memory_snapshot=True, max_inputs=1)
class Squarer:
    @modal.enter(snap=False)
    def connect(self):
        started = time.perf_counter()
        self.table = sorted(str(i) for i in range(200_000))  # the hook's own work, timed by itself
        self.hook_ms = (time.perf_counter() - started) * 1000

    @modal.method()
    def square(self, x):
        return {{"value": x * x, "container": os.environ["WARMBOOT_CONTAINER_ID"], "hook_ms": self.hook_ms}}
"""


def test_restores_record_their_phases_and_snapshot_list_shows_percentiles(platform: Platform) -> None:
    name = f"starts-{uuid.uuid4().hex[:6]}"
    platform.cli("deploy", str(platform.write_app(name.replace("-", "_"), SOURCE.format(app=name))))
    out = platform.python(
        f"""
        import json, warmboot
        from warmboot.sdk import client
        f = warmboot.Cls.from_name({name!r}, "Squarer")().square
        results = [f.remote(i) for i in range(4)]  # max_inputs=1: a cold boot (the snapshot's), then 3 restores
        [record] = [r for r in client.request("snapshot_list") if r["app_name"] == {name!r}]
        print(json.dumps({{"results": results, "record": record,
                           "starts": client.request("start_log", key=record["key"])}}))
        """,
        timeout=300,
    ).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert [r["value"] for r in got["results"]] == [0, 1, 4, 9]
    hook_ms = {r["container"]: r["hook_ms"] for r in got["results"]}
    starts = got["starts"]
    assert [s["kind"] for s in starts] == ["cold", "restore", "restore", "restore"]
    start_parts = {"network_ms", "resume_ms", "enter_ms"}
    assert set(starts[0]["phases"]) == {"boot_ms", "start_ms", "first_input_ms"} | start_parts
    restore_phases = {"cgroup_ms", "check_ms", "unpack_ms", "mounts_ms", "criu_restore_ms", "pages_ms", "start_ms"}
    for start in starts:
        phases = start["phases"]
        assert phases["enter_ms"] >= hook_ms[start["container_id"]] - 0.01, (phases, hook_ms)
        assert sum(phases[p] for p in start_parts) == pytest.approx(phases["start_ms"], abs=0.1)
    for restore in starts[1:]:
        assert restore_phases | start_parts | {"first_input_ms"} <= set(restore["phases"])
        assert restore["total_ms"] >= restore["phases"]["criu_restore_ms"] > 0
        assert 0 < restore["phases"]["pages_ms"] <= restore["phases"]["criu_restore_ms"], restore["phases"]
    record = got["record"]
    restore_ms = sorted(s["total_ms"] for s in starts[1:])
    assert record["restore_p50_ms"] == pytest.approx(restore_ms[1], abs=0.1)
    assert record["cold_p50_ms"] == pytest.approx(starts[0]["total_ms"], abs=0.1) and record["cold_starts"] == 1
    assert record["boots_cold"] is False, "one cold boot decides nothing"
    env = {**platform.env, "COLUMNS": "400"}
    table = subprocess.run([WARMBOOT, "snapshot", "list"], env=env, capture_output=True, text=True, check=True)
    rows = [
        dict(zip(SNAPSHOT_LIST_COLUMNS, cells, strict=True))
        for line in table.stdout.splitlines()
        if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == len(SNAPSHOT_LIST_COLUMNS)
        and cells[0] == f"{name}.Squarer"
    ]
    assert len(rows) == 1
    assert rows[0]["restore p50/p95"] == f"{record['restore_p50_ms']:.0f}/{record['restore_p95_ms']:.0f} ms"
    assert rows[0]["cold p50"] == f"{record['cold_p50_ms']:.0f} ms"
