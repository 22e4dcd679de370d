"""Schedules (``schedule=modal.Period(...)`` / ``modal.Cron(...)``).

A fast layer checks the rules at decoration and deploy, the tick arithmetic, and the scheduler itself on a fake
clock (missed ticks are logged and not replayed; a restart resumes from the state table). End to end, a real
server runs a deployed ``Period(seconds=1)`` function (its runs counted in a Volume file), keeps running it after
a server restart, and stops after ``warmboot app stop``; ``warmboot run`` runs the example's schedule.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from platform_helpers import Platform, wait_for

import warmboot as modal
from warmboot.errors import InvalidOptionError
from warmboot.server import scheduler as sched
from warmboot.server import specs
from warmboot.server.db import Database
from warmboot.server.state import State

EXAMPLES = Path(__file__).parent.parent / "examples"


def ts(*args: int, tz: str = "UTC") -> float:
    import zoneinfo

    return datetime.datetime(*args, tzinfo=zoneinfo.ZoneInfo(tz)).timestamp()


# ----- decoration and deploy checks --------------------------------------------------------------------------


def test_period_and_cron_become_plain_data_in_the_spec() -> None:
    app = modal.App("sched-spec")

    @app.function(schedule=modal.Period(hours=1, minutes=30))
    def every() -> None: ...

    @app.function(schedule=modal.Cron("0  6 * * 1-5", timezone="America/New_York"))
    def weekdays(x: int = 1) -> None: ...

    @app.function()
    def plain() -> None: ...

    fns = app.spec()["functions"]
    assert fns["every"]["schedule"] == {
        "kind": "period",
        "years": 0,
        "months": 0,
        "weeks": 0,
        "days": 0,
        "hours": 1,
        "minutes": 30,
        "seconds": 0,
    }
    assert fns["weekdays"]["schedule"] == {"kind": "cron", "cron": "0 6 * * 1-5", "timezone": "America/New_York"}
    assert fns["plain"]["schedule"] is None
    assert "schedule" not in fns["every"]["options"]
    assert modal.Cron("* * * * *").to_spec()["timezone"] == "UTC", "UTC by default, as Modal"
    specs.check("sched-spec", app.spec())  # the server takes what the SDK makes


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: modal.Cron("not a cron"), "invalid cron string 'not a cron'"),
        (lambda: modal.Cron("61 * * * *"), "invalid cron string '61 * * * *'"),
        (lambda: modal.Cron("* * * * * *"), "five crontab fields"),
        (lambda: modal.Cron(""), "non-empty"),
        (lambda: modal.Cron("0 6 * * *", timezone="Mars/Olympus"), "unknown timezone 'Mars/Olympus'"),
        (lambda: modal.Cron("0 6 * * *", timezone="../../etc/passwd"), "unknown timezone"),
        (lambda: modal.Period(), "at least 1 s"),
        (lambda: modal.Period(seconds=0.5), "at least 1 s"),
        (lambda: modal.Period(days=1.5), "days= must be an integer"),
        (lambda: modal.Period(hours=-1), "hours= must be an integer >= 0"),
        (lambda: modal.Period(seconds=float("inf")), "seconds= must be a number"),
    ],
)
def test_bad_schedules_are_refused_when_made(make: object, message: str) -> None:
    with pytest.raises(InvalidOptionError, match=re.escape(message)):
        make()  # type: ignore[operator]


def test_only_functions_callable_without_arguments_take_a_schedule() -> None:
    app = modal.App("sched-refuse")
    with pytest.raises(InvalidOptionError, match=r"requires x, y: give them default values"):

        @app.function(schedule=modal.Period(days=1))
        def needs(x: int, y: int, z: int = 0) -> None: ...

    @app.function(schedule=modal.Period(days=1))
    def fine(x: int = 0, *args: int, **kwargs: int) -> None: ...

    with pytest.raises(InvalidOptionError, match=r"@app.cls does not take schedule="):

        @app.cls(schedule=modal.Period(days=1))
        class Nope:
            @modal.method()
            def go(self) -> None: ...

    with pytest.raises(InvalidOptionError, match=r"schedule= takes modal.Period\(...\) or modal.Cron"):
        app.function(schedule="0 6 * * *")


def test_the_server_checks_the_schedule_data_again() -> None:
    app = modal.App("sched-server")

    @app.function(schedule=modal.Cron("0 6 * * *"))
    def f() -> None: ...

    spec = app.spec()
    for bad, message in [
        ({"kind": "cron", "cron": "0 25 * * *", "timezone": "UTC"}, "invalid cron string '0 25 * * *'"),
        ({"kind": "cron", "cron": "0 6 * * *", "timezone": "Nowhere/Town"}, "unknown timezone"),
        ({"kind": "period", "seconds": 0}, "at least 1 s"),
        ({"kind": "hourly"}, "a schedule is modal.Period"),
        ({"kind": "period", "seconds": 5, "jitter": 1}, "unknown field(s) 'jitter'"),
    ]:
        spec["functions"]["f"]["schedule"] = bad
        with pytest.raises(InvalidOptionError, match=re.escape(message)):
            specs.check("sched-server", spec)
    spec["functions"]["f"]["schedule"] = {"kind": "period", "seconds": 5}
    spec["functions"]["f"]["kind"] = "cls"
    spec["functions"]["f"]["lifecycle"] = {"methods": ["go"]}
    with pytest.raises(InvalidOptionError, match=r"only an @app\.function with no arguments takes a schedule"):
        specs.check("sched-server", spec)


# ----- tick arithmetic ------------------------------------------------------------------------------------


def test_period_ticks_count_from_the_anchor() -> None:
    ticks = sched.ticks_of(modal.Period(seconds=10).to_spec(), anchor=1000.0)
    assert ticks.after(1000.0) == 1010.0, "the first run is one period after the deploy"
    assert ticks.after(1010.0) == 1020.0
    assert ticks.at_or_before(1009.0) is None
    assert ticks.at_or_before(1020.0) == 1020.0
    assert ticks.at_or_before(1029.9) == 1020.0
    assert ticks.count(1010.0, 1050.0) == 5


def test_calendar_periods_keep_their_day() -> None:
    anchor = ts(2026, 1, 31, 9, 0)
    ticks = sched.ticks_of(modal.Period(months=1).to_spec(), anchor)
    first = ticks.after(anchor)
    assert first == ts(2026, 2, 28, 9, 0), "a shorter month: its last day"
    assert ticks.after(first) == ts(2026, 3, 31, 9, 0), "counted from the anchor: the 31st again"
    assert ticks.count(anchor, ts(2027, 1, 31, 9, 0)) == 12
    daily = sched.ticks_of(modal.Period(days=1).to_spec(), anchor)
    assert daily.after(ts(2026, 3, 10, 12, 0)) == ts(2026, 3, 11, 9, 0), "same time (UTC) every day"


def test_cron_ticks_follow_the_timezone_clock_through_daylight_saving() -> None:
    ticks = sched.ticks_of(modal.Cron("0 6 * * *", timezone="America/New_York").to_spec(), anchor=0.0)
    winter = ticks.after(ts(2026, 3, 7, 12, 0))
    assert winter == ts(2026, 3, 8, 6, 0, tz="America/New_York") == ts(2026, 3, 8, 10, 0)  # EDT began that night
    assert ticks.after(ts(2026, 3, 1, 0, 0)) == ts(2026, 3, 1, 11, 0), "06:00 EST is 11:00 UTC"
    utc = sched.ticks_of(modal.Cron("*/15 * * * *").to_spec(), anchor=0.0)
    assert utc.at_or_before(ts(2026, 5, 1, 10, 15)) == ts(2026, 5, 1, 10, 15)
    assert utc.at_or_before(ts(2026, 5, 1, 10, 29)) == ts(2026, 5, 1, 10, 15)
    assert utc.count(ts(2026, 5, 1, 10, 0), ts(2026, 5, 1, 11, 0)) == 5


def test_step_runs_a_due_tick_once_and_counts_late_ones_as_missed() -> None:
    ticks = sched.ticks_of(modal.Period(seconds=10).to_spec(), anchor=0.0)
    assert sched.step(ticks, 10.0, 9.9) == sched.Step(None, 10.0), "not due yet"
    assert sched.step(ticks, 10.0, 10.0) == sched.Step(10.0, 20.0)
    assert sched.step(ticks, 10.0, 14.9) == sched.Step(10.0, 20.0), "a little late (within half the period): runs"
    assert sched.step(ticks, 10.0, 15.1) == sched.Step(None, 20.0, 1, 10.0, 10.0), "too late: missed"
    # The server was down for ten periods: one run for now (50), the four ticks before it missed, none replayed.
    assert sched.step(ticks, 10.0, 51.0) == sched.Step(50.0, 60.0, 4, 10.0, 40.0)
    assert sched.step(ticks, 10.0, 57.0) == sched.Step(None, 60.0, 5, 10.0, 50.0)
    daily = sched.ticks_of(modal.Period(days=1).to_spec(), anchor=0.0)
    assert sched.step(daily, 86400.0, 86400.0 + 299).run == 86400.0
    assert sched.step(daily, 86400.0, 86400.0 + 301).run is None, "at most 5 minutes late"


# ----- the scheduler on a fake clock ---------------------------------------------------------------------


class Harness:
    """A scheduler on a fake clock and a real state database, whose calls and app-log lines are recorded."""

    def __init__(self, db: Callable[[], Database], apps: list[sched.ScheduledApp], now: float) -> None:
        self.now = now
        self.apps = apps
        self.calls: list[tuple[str, str, float]] = []
        self.log: list[str] = []
        self.state = State(db())
        self.scheduler = sched.Scheduler(
            self.state, apps=lambda: list(self.apps), submit=self.submit, event=self.event, clock=lambda: self.now
        )
        self.scheduler.sync()

    def submit(self, app: sched.ScheduledApp, tag: str) -> str:
        self.calls.append((app.app_id, tag, self.now))
        return f"fc-{len(self.calls)}"

    def event(self, app: sched.ScheduledApp, text: str) -> None:
        self.log.append(f"{app.name}: {text}")

    def at(self, now: float) -> None:
        self.now = now
        self.scheduler.run_due()


def period_app(app_id: str = "ap-1", seconds: float = 60) -> sched.ScheduledApp:
    return sched.ScheduledApp(app_id, "reports", {"tick": modal.Period(seconds=seconds).to_spec()})


def test_the_scheduler_runs_each_tick_once(open_db: Callable[[], Database]) -> None:
    h = Harness(open_db, [period_app()], now=1000.0)
    assert h.scheduler.describe("ap-1")[0]["next_tick"] == 1060.0
    h.at(1059.0)
    assert h.calls == []
    h.at(1060.2)
    h.at(1061.0)
    assert h.calls == [("ap-1", "tick", 1060.2)]
    assert h.log == ["reports: Scheduled run of tick (tick at 1970-01-01T00:17:40Z): call fc-1"]
    h.at(1120.0)
    assert [c[2] for c in h.calls] == [1060.2, 1120.0]
    assert h.scheduler.describe("ap-1") == [
        {"function": "tick", "schedule": "every 60s", "next_tick": 1180.0, "last_tick": 1120.0}
    ]


def test_missed_ticks_are_logged_not_replayed(open_db: Callable[[], Database]) -> None:
    h = Harness(open_db, [period_app()], now=1000.0)
    h.at(1000.0 + 60 * 10 + 5)  # busy (or down) through ten ticks: one run for now, nine missed
    assert len(h.calls) == 1
    assert "missed 9 ticks from 1970-01-01T00:17:40Z to 1970-01-01T00:25:40Z" in h.log[0], h.log
    h.at(1000.0 + 60 * 11 + 45)  # 45 s late for a 60 s period: missed, and the next one waits for its time
    assert len(h.calls) == 1
    assert h.log[-1].endswith("missed tick at 1970-01-01T00:27:40Z (the server was down or busy); not run late")
    h.at(1000.0 + 60 * 12)
    assert len(h.calls) == 2


def test_a_restart_resumes_the_next_tick_from_the_state(open_db: Callable[[], Database]) -> None:
    db = open_db
    h = Harness(db, [period_app(seconds=3600)], now=1000.0)
    h.at(4600.0)
    assert len(h.calls) == 1
    # The server stops at 5000 and a new one starts at 6000: the schedule is not reset to "now + 1 h".
    h2 = Harness(db, [period_app(seconds=3600)], now=6000.0)
    assert h2.scheduler.describe("ap-1")[0]["next_tick"] == 8200.0
    h2.at(8200.0)
    assert len(h2.calls) == 1
    # Down through the tick at 11800 and back more than 5 minutes later: missed (logged), the next one is on time.
    h3 = Harness(db, [period_app(seconds=3600)], now=12200.0)
    h3.at(12200.0)
    assert h3.calls == []
    assert "missed tick at 1970-01-01T03:16:40Z" in h3.log[0], h3.log
    assert h3.scheduler.describe("ap-1")[0]["next_tick"] == 15400.0


def test_stop_and_redeploy_end_or_restart_a_schedule(open_db: Callable[[], Database]) -> None:
    h = Harness(open_db, [period_app("ap-1")], now=1000.0)
    h.apps = [period_app("ap-2")]  # a redeploy: a new version (Modal: a Period starts again from the deploy)
    h.now = 1030.0
    h.scheduler.sync()
    assert h.scheduler.describe("ap-1") == []
    assert h.scheduler.describe("ap-2")[0]["next_tick"] == 1090.0
    assert [r.app_id for r in h.state.schedule_rows()] == ["ap-2"]
    h.apps = []  # warmboot app stop
    h.scheduler.sync()
    h.at(5000.0)
    assert h.calls == [] and h.state.schedule_rows() == []


def test_a_failing_submit_is_logged_and_the_schedule_goes_on(open_db: Callable[[], Database]) -> None:
    h = Harness(open_db, [period_app()], now=1000.0)

    def refuse(app: sched.ScheduledApp, tag: str) -> str:
        raise modal.WarmbootError("app reports is not running")

    h.scheduler._submit = refuse
    h.at(1060.0)
    assert "not started: app reports is not running" in h.log[-1]
    h.scheduler._submit = h.submit
    h.at(1120.0)
    assert len(h.calls) == 1


# ----- end to end ---------------------------------------------------------------------------------------

SOURCE = """
import os, time
import warmboot as modal

app = modal.App({app!r})
beats = modal.Volume.from_name({volume!r}, create_if_missing=True)


@app.function(schedule=modal.Period(seconds=1), volumes={{"/beats": beats}})
def beat():
    with open("/beats/beats", "a") as f:
        f.write(f"{{time.time()}}\\n")


@app.function(schedule=modal.Cron("0 6 * * *", timezone="America/New_York"))
def morning():
    print("good morning")
"""


def _beats(volume: Path) -> int:
    path = volume / "beats"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _ticks_pass(platform: Platform) -> None:
    """Until the scheduler has run a 1 s Period twice more: a witness app's schedule, deployed now, beats twice.
    A schedule that (wrongly) went on would have run too by then."""
    name = f"witness-{uuid.uuid4().hex[:8]}"
    volume = platform.home / "volumes" / f"{name}-beats"
    source = SOURCE.format(app=name, volume=f"{name}-beats")
    platform.cli("deploy", str(platform.write_app(name.replace("-", "_"), source)))
    wait_for("the witness schedule ran twice", lambda: _beats(volume) >= 2, watch=volume, timeout=180)
    platform.cli("app", "stop", name)


def test_a_deployed_period_runs_survives_a_restart_and_stops_with_the_app(platform: Platform) -> None:
    name = f"sched-{uuid.uuid4().hex[:8]}"
    volume = platform.home / "volumes" / f"{name}-beats"
    app_file = platform.write_app(name.replace("-", "_"), SOURCE.format(app=name, volume=f"{name}-beats"))
    platform.cli("deploy", str(app_file))

    listed = platform.cli("app", "list").stdout
    assert "beat:" in listed and "every 1s" in listed, listed
    assert "morning:" in listed and "America/New_York" in listed, listed

    wait_for("the schedule ran twice", lambda: _beats(volume) >= 2, watch=volume, timeout=180)
    assert "Scheduled run of beat" in platform.log_text(name)

    platform.restart_server()
    after_restart = _beats(volume)
    wait_for(
        "the schedule ran twice after the restart",
        lambda: _beats(volume) >= after_restart + 2,
        watch=volume,
        timeout=180,
    )

    platform.cli("app", "stop", name)
    stopped_at = _beats(volume)
    _ticks_pass(platform)
    assert _beats(volume) == stopped_at, "a scheduled run happened after `warmboot app stop`"
    assert name not in platform.cli("app", "list").stdout


def test_a_schedule_runs_while_app_run_is_active_and_ends_with_it(platform: Platform) -> None:
    name = f"sched-run-{uuid.uuid4().hex[:8]}"
    volume = platform.home / "volumes" / f"{name}-beats"
    script = platform.write_app(
        name.replace("-", "_"),
        SOURCE.format(app=name, volume=f"{name}-beats")
        + f"""

if __name__ == "__main__":
    with app.run():
        deadline = time.monotonic() + 180
        while not os.path.exists({str(volume / "beats")!r}) or len(open({str(volume / "beats")!r}).readlines()) < 2:
            assert time.monotonic() < deadline, "the schedule did not run twice"
            time.sleep(0.05)
    print("ran twice", flush=True)
""",
    )
    proc = subprocess.run(
        [sys.executable, str(script)], env=platform.env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0 and "ran twice" in proc.stdout, proc.stdout + proc.stderr
    assert name not in platform.cli("app", "list").stdout, "the ephemeral app (and its schedule) ended"
    ended = _beats(volume)
    _ticks_pass(platform)
    assert _beats(volume) == ended, "a scheduled run happened after app.run() ended"


def test_an_invalid_cron_string_is_refused_at_deploy(platform: Platform) -> None:
    app_file = platform.write_app(
        "bad_cron",
        """
        import warmboot as modal
        app = modal.App("bad-cron")

        @app.function(schedule=modal.Cron("every day at six"))
        def f():
            pass
        """,
    )
    proc = platform.cli("deploy", str(app_file), check=False)
    assert proc.returncode == 1
    assert "invalid cron string 'every day at six'" in proc.stderr, proc.stderr
    assert "bad-cron" not in platform.cli("app", "list").stdout


def test_the_example_runs_its_schedule_under_warmboot_run(platform: Platform) -> None:
    proc = platform.cli("run", str(EXAMPLES / "schedules.py"), timeout=300)
    assert "heartbeat ran at least 2 times" in proc.stdout, proc.stdout + proc.stderr
    assert "Scheduled run of heartbeat" in proc.stderr, proc.stderr
