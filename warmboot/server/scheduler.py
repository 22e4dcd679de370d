"""Schedules: runs each scheduled function (``schedule=modal.Period(...)`` / ``modal.Cron(...)``) at its ticks.

Which apps: every running app, deployed or ephemeral (while ``warmboot run`` has it), as Modal does. A
redeploy is a new app version, so its schedules start again: a :class:`~warmboot.sdk.schedule.Period` counts
from the new deploy (Modal's documented behaviour), a cron schedule keeps to its clock times. ``warmboot app
stop`` ends them.

A tick is one call of the function with no arguments, submitted like ``.spawn()`` (:meth:`ControlPlane.accept_call`):
recorded in the calls table before it runs, so a server crash queues it again. The schedule's state (its next
tick) is claimed in the ``schedules`` table before the call is submitted, so a crash between the two loses that
tick rather than running it twice.

Across a server restart the next tick is read back, not computed again from "now": a ``Period(days=1)`` deployed
at 09:00 still runs at 09:00 after a restart at 08:00. Ticks that pass while the server is down (or too busy to
start them in time) are **missed**: written to the app log ("missed tick at ...") and never replayed. A tick runs
if the scheduler reaches it within :func:`grace` of its time (half the interval to the next tick, at most
:data:`MAX_GRACE_S`), so at most one run happens for the current time, however many ticks passed.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from warmboot.sdk.schedule import check_spec, describe, period_seconds, zone
from warmboot.server.state import ScheduleRow, State

if TYPE_CHECKING:
    from warmboot.server.daemon import ControlPlane

log = logging.getLogger("warmboot.scheduler")

#: The longest a tick may be late and still run (seconds); later than that it is missed.
MAX_GRACE_S = 300.0
#: The scheduler looks again at least this often (seconds), whatever the next tick: wall-clock jumps are caught.
MAX_SLEEP_S = 30.0
#: Missed ticks are counted one by one up to this many (for cron and calendar periods); past it the log says "at
#: least".
MAX_COUNT = 100_000
_EPS = 1e-3  # ticks are at least a second apart (schedule.MIN_PERIOD_S): this tells them apart


def when(ts: float) -> str:
    """A tick's time as ISO 8601 in UTC (what the app log and ``warmboot app list`` show)."""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


# ----- tick times -----------------------------------------------------------------------------------------


class Ticks:
    """The tick times of one schedule (POSIX timestamps)."""

    def after(self, t: float) -> float:
        """The first tick strictly after ``t``."""
        raise NotImplementedError

    def at_or_before(self, t: float) -> float | None:
        """The last tick at or before ``t`` (``None``: none yet)."""
        raise NotImplementedError

    def count(self, a: float, b: float) -> int:
        """How many ticks lie in ``[a, b]`` (at most :data:`MAX_COUNT`)."""
        raise NotImplementedError


class PeriodTicks(Ticks):
    """``anchor + k * period`` for k = 1, 2, ...: the first tick is one period after the schedule began.

    Years and months are calendar ones (in UTC: the same day of the month, or the month's last day when it is
    shorter), counted from the anchor each time so that a short month does not move later ticks.
    """

    def __init__(self, spec: dict[str, Any], anchor: float):
        self.spec = spec
        self.anchor = anchor
        self.months = 12 * spec["years"] + spec["months"]
        self.fixed = period_seconds({**spec, "years": 0, "months": 0})  # weeks..seconds: fixed lengths in UTC
        self.approx = period_seconds(spec)

    def tick(self, k: int) -> float:
        if not self.months:
            return self.anchor + k * self.fixed
        start = datetime.datetime.fromtimestamp(self.anchor, datetime.UTC)
        year, month0 = divmod(start.month - 1 + k * self.months, 12)
        year += start.year
        day = min(start.day, calendar.monthrange(year, month0 + 1)[1])
        return start.replace(year=year, month=month0 + 1, day=day).timestamp() + k * self.fixed

    def _index(self, t: float) -> int:
        """The largest k >= 0 with ``tick(k) <= t`` (k = 0 is the anchor, which is not a tick)."""
        if t < self.anchor:
            return 0
        k = max(0, math.floor((t - self.anchor) / self.approx))
        while self.tick(k + 1) <= t:
            k += 1
        while k > 0 and self.tick(k) > t:
            k -= 1
        return k

    def after(self, t: float) -> float:
        return self.tick(self._index(t) + 1)

    def at_or_before(self, t: float) -> float | None:
        k = self._index(t)
        return self.tick(k) if k >= 1 else None

    def count(self, a: float, b: float) -> int:
        if b < a:
            return 0
        return min(MAX_COUNT, self._index(b) - self._index(a - _EPS))


class CronTicks(Ticks):
    """The times a cron expression names, on its timezone's clock (``croniter``), daylight saving included."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.tz = zone("cron schedule", spec["timezone"])

    def _iter(self, t: float) -> Any:
        from croniter import croniter

        return croniter(self.spec["cron"], datetime.datetime.fromtimestamp(t, self.tz))

    def after(self, t: float) -> float:
        return self._iter(t).get_next(datetime.datetime).timestamp()

    def at_or_before(self, t: float) -> float | None:
        prev = self._iter(t).get_prev(datetime.datetime).timestamp()  # strictly before t
        following = self.after(prev)
        return following if following <= t else prev

    def count(self, a: float, b: float) -> int:
        n, t = 0, a - _EPS
        it = self._iter(t)
        while n < MAX_COUNT:
            t = it.get_next(datetime.datetime).timestamp()
            if t > b:
                break
            n += 1
        return n


def ticks_of(spec: dict[str, Any], anchor: float) -> Ticks:
    """The ticks of a schedule's data (``Schedule.to_spec()``) that began at ``anchor``."""
    spec = check_spec("schedule", spec)
    return CronTicks(spec) if spec["kind"] == "cron" else PeriodTicks(spec, anchor)


def grace(ticks: Ticks, tick: float) -> float:
    """How late ``tick`` may start and still run: half the interval to the next tick, at most MAX_GRACE_S."""
    return min((ticks.after(tick) - tick) / 2, MAX_GRACE_S)


@dataclass(frozen=True)
class Step:
    """What the scheduler does for one schedule at one moment."""

    run: float | None  #: the tick to run now (None: nothing to run)
    next_tick: float  #: the tick to wait for afterwards
    missed: int = 0  #: ticks that passed without a run (logged, never replayed)
    first_missed: float | None = None
    last_missed: float | None = None


def step(ticks: Ticks, next_tick: float, now: float) -> Step:
    """Decide, at ``now``, for a schedule waiting for ``next_tick``: run the latest due tick if it is recent
    enough, count the ones before it (or all of them) as missed, and find the next tick after ``now``."""
    if now < next_tick:
        return Step(None, next_tick)
    latest = ticks.at_or_before(now)
    if latest is None or latest < next_tick:
        latest = next_tick
    due = max(1, ticks.count(next_tick, latest))
    following = ticks.after(now)
    if now - latest <= grace(ticks, latest):
        if due == 1:
            return Step(latest, following)
        return Step(latest, following, due - 1, next_tick, ticks.at_or_before(latest - _EPS))
    return Step(None, following, due, next_tick, latest)


def missed_text(tag: str, spec: dict[str, Any], s: Step) -> str:
    """The app log's line for missed ticks."""
    assert s.first_missed is not None
    what = f"Schedule of {tag} ({describe(spec)})"
    if s.missed == 1:
        return f"{what}: missed tick at {when(s.first_missed)} (the server was down or busy); not run late"
    more = "at least " if s.missed >= MAX_COUNT else ""
    last = when(s.last_missed) if s.last_missed is not None else "?"
    return (
        f"{what}: missed {more}{s.missed} ticks from {when(s.first_missed)} to {last} "
        "(the server was down or busy); they are not run late"
    )


# ----- the scheduler --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduledApp:
    """A running app's scheduled functions, as the scheduler sees them."""

    app_id: str
    name: str
    schedules: dict[str, dict[str, Any]]  #: tag -> the schedule's data


@dataclass
class _Entry:
    app: ScheduledApp
    tag: str
    spec: dict[str, Any]
    ticks: Ticks
    row: ScheduleRow


class Scheduler:
    """Keeps each running app's schedules and submits their ticks; one thread (:meth:`start`).

    ``apps()`` lists the running apps; ``submit(app, tag)`` starts one call and returns its id; ``event(app,
    text)`` writes to the app's log; ``clock`` is the wall clock (cron times are wall-clock times).
    """

    def __init__(
        self,
        state: State,
        *,
        apps: Callable[[], list[ScheduledApp]],
        submit: Callable[[ScheduledApp, str], str],
        event: Callable[[ScheduledApp, str], None],
        clock: Callable[[], float] = time.time,
    ):
        self.state = state
        self._apps = apps
        self._submit = submit
        self._event = event
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    # ----- which schedules exist ------------------------------------------------------------------------

    def sync(self) -> None:
        """Match the schedules to the running apps: a new app's begin now (or resume from the state table
        after a restart), a stopped or replaced app's end. Called on every deploy, stop and start."""
        with self._lock:  # apps() inside: two syncs (a deploy, a stop) must not apply stale lists out of order
            apps = self._apps()
            now = self._clock()
            stored = {(r.app_id, r.tag): r for r in self.state.schedule_rows()}
            wanted: dict[tuple[str, str], tuple[ScheduledApp, dict[str, Any]]] = {
                (a.app_id, tag): (a, spec) for a in apps for tag, spec in a.schedules.items()
            }
            for key in set(self._entries) - set(wanted):
                del self._entries[key]
            for key in set(stored) - set(wanted):
                self.state.delete_schedule(*key)
            for key, (app, spec) in wanted.items():
                if key in self._entries:
                    continue
                try:
                    row = stored.get(key)
                    ticks = ticks_of(spec, row.anchor if row else now)
                    if row is None:
                        row = ScheduleRow(app.app_id, key[1], anchor=now, next_tick=ticks.after(now))
                        self.state.put_schedule(row)
                except Exception as exc:  # a bad schedule must not stop the others (specs were checked at deploy)
                    log.exception("schedule of %s.%s", app.name, key[1])
                    self._event(app, f"Schedule of {key[1]} cannot run: {type(exc).__name__}: {exc}")
                    continue
                self._entries[key] = _Entry(app, key[1], spec, ticks, row)
        self._wake.set()

    def describe(self, app_id: str) -> list[dict[str, Any]]:
        """An app's schedules: each function's schedule (as text), next and last tick."""
        with self._lock:
            entries = [e for (a, _), e in self._entries.items() if a == app_id]
        return [
            {
                "function": e.tag,
                "schedule": describe(e.spec),
                "next_tick": e.row.next_tick,
                "last_tick": e.row.last_tick,
            }
            for e in sorted(entries, key=lambda e: e.tag)
        ]

    # ----- ticking ----------------------------------------------------------------------------------------

    def run_due(self, now: float | None = None) -> float | None:
        """Handle every schedule that is due at ``now``: claim its tick, log what was missed, submit the run.
        Returns the earliest next tick (None: no schedules)."""
        now = self._clock() if now is None else now
        todo: list[tuple[_Entry, Step]] = []
        with self._lock:
            for entry in self._entries.values():
                if entry.row.next_tick > now:
                    continue
                s = step(entry.ticks, entry.row.next_tick, now)
                entry.row = replace(
                    entry.row, next_tick=s.next_tick, last_tick=s.run if s.run is not None else entry.row.last_tick
                )
                self.state.put_schedule(entry.row)  # claimed before the call exists: a crash loses it, never twice
                todo.append((entry, s))
            earliest = min((e.row.next_tick for e in self._entries.values()), default=None)
        for entry, s in todo:
            if s.missed:
                self._event(entry.app, missed_text(entry.tag, entry.spec, s))
            if s.run is None:
                continue
            try:
                call_id = self._submit(entry.app, entry.tag)
            except Exception as exc:  # noqa: BLE001 - the app stopped meanwhile, or its function takes no calls
                log.warning("scheduled run of %s.%s not submitted: %s", entry.app.name, entry.tag, exc)
                self._event(entry.app, f"Scheduled run of {entry.tag} (tick at {when(s.run)}) not started: {exc}")
                continue
            self._event(entry.app, f"Scheduled run of {entry.tag} (tick at {when(s.run)}): call {call_id}")
            with self._lock:
                if self._entries.get((entry.app.app_id, entry.tag)) is entry:
                    entry.row = replace(entry.row, last_call_id=call_id)
                    self.state.put_schedule(entry.row)
        return earliest

    # ----- the thread ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self.sync()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                earliest = self.run_due()
            except Exception:  # keep scheduling: one failure (a full disk for the state) must not end them all
                log.exception("scheduler")
                earliest = None
            delay = MAX_SLEEP_S if earliest is None else min(MAX_SLEEP_S, max(0.0, earliest - self._clock()))
            self._wake.wait(delay)
            self._wake.clear()


# ----- the server's scheduler ---------------------------------------------------------------------------


def for_plane(plane: ControlPlane) -> Scheduler:
    """The scheduler of a control plane: its running apps' schedules, whose ticks are spawned calls."""
    import cloudpickle

    from warmboot import protocol

    no_args = cloudpickle.dumps(((), {}))

    def apps() -> list[ScheduledApp]:
        with plane._lock:
            running = list(plane.apps.values())
        return [
            ScheduledApp(
                a.record.app_id,
                a.record.name,
                {tag: f["schedule"] for tag, f in a.record.spec["functions"].items() if f.get("schedule")},
            )
            for a in running
        ]

    def event(app: ScheduledApp, text: str) -> None:
        log.info("%s: %s", app.name, text)
        plane.logs.write(app.name, "warmboot", text)

    def submit(app: ScheduledApp, tag: str) -> str:
        call = plane.accept_call(protocol.Target(tag=tag, app_id=app.app_id), no_args, True)

        def done(c: Any) -> None:
            outcome = c.outcome
            if outcome is not None and not outcome.ok:
                event(app, f"Scheduled run of {tag} ({c.call_id}) failed: {outcome.error_type}: {outcome.message}")
            plane.calls.delivered(c)  # nobody fetches a scheduled call's result: do not keep it for a day

        call.when_done(done)
        return call.call_id

    return Scheduler(plane.state, apps=apps, submit=submit, event=event)
