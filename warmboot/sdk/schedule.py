"""Schedules: ``@app.function(schedule=modal.Period(...))`` and ``schedule=modal.Cron("...", timezone=...)``.

A schedule is checked here, at decoration, and travels to the server as plain data (:meth:`Schedule.to_spec`);
the server checks that data again (:func:`check_spec`) and computes the ticks (``warmboot/server/scheduler.py``).

This module is imported inside containers too (the app file is imported there), so it imports only the stdlib
at import time. The cron string's syntax (``croniter``) and the timezone (``zoneinfo``) are checked where the
app is decorated and deployed, not again in the container, whose image may have neither.
"""

from __future__ import annotations

import math
import os
from typing import Any

from warmboot.errors import InvalidOptionError

#: The shortest period a schedule may have, in seconds: a shorter one would keep a container busy doing nothing
#: but starting scheduled calls.
MIN_PERIOD_S = 1.0
#: Cron macros ``croniter`` understands, as a crontab does.
CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_PERIOD_UNITS = ("years", "months", "weeks", "days", "hours", "minutes", "seconds")
_APPROX_S = {
    "years": 365.2425 * 86400,
    "months": 30.436875 * 86400,
    "weeks": 7 * 86400,
    "days": 86400,
    "hours": 3600,
    "minutes": 60,
    "seconds": 1,
}


def _in_container() -> bool:
    from warmboot.sdk.image import IN_CONTAINER_ENV

    return bool(os.environ.get(IN_CONTAINER_ENV))


class Schedule:
    """A time schedule for a function: :class:`Period` or :class:`Cron`."""

    def to_spec(self) -> dict[str, Any]:  # pragma: no cover - each subclass has its own
        raise NotImplementedError


class Period(Schedule):
    """Run the function every given time interval, the first time one interval after the app is deployed.

    Example::

        @app.function(schedule=modal.Period(hours=4))
        def sync():
            ...

    Only ``seconds`` can be a float; the other units are integers. ``days=1`` runs at the same time (UTC) every
    day and ``months=1`` on the same day each month (the last day of a shorter month), counted from the deploy
    time. A redeploy starts the period again from the new deploy (use :class:`Cron` for a schedule that deploys
    do not move); a server restart does not: the next run stays where it was.
    """

    def __init__(
        self,
        *,
        years: int = 0,
        months: int = 0,
        weeks: int = 0,
        days: int = 0,
        hours: int = 0,
        minutes: int = 0,
        seconds: float = 0,
    ) -> None:
        spec = check_spec(
            "modal.Period",
            {
                "kind": "period",
                "years": years,
                "months": months,
                "weeks": weeks,
                "days": days,
                "hours": hours,
                "minutes": minutes,
                "seconds": seconds,
            },
        )
        self._spec = spec

    def __repr__(self) -> str:
        given = ", ".join(f"{u}={self._spec[u]!r}" for u in _PERIOD_UNITS if self._spec[u])
        return f"Period({given})"

    def to_spec(self) -> dict[str, Any]:
        """The schedule as plain data, for the deploy request."""
        return dict(self._spec)


class Cron(Schedule):
    """Run the function at the times a Unix cron expression names, in a timezone (UTC by default).

    Example::

        @app.function(schedule=modal.Cron("0 6 * * *", timezone="America/New_York"))
        def morning_report():
            ...

    The expression has the five crontab fields (minute, hour, day of month, month, day of week; see
    crontab.guru) or is a macro such as ``@daily``. Times follow the timezone's clock, daylight saving included.
    Deploys and server restarts do not move a cron schedule.
    """

    def __init__(self, cron_string: str, timezone: str = "UTC") -> None:
        self._spec = check_spec("modal.Cron", {"kind": "cron", "cron": cron_string, "timezone": timezone})

    def __repr__(self) -> str:
        return f"Cron({self._spec['cron']!r}, timezone={self._spec['timezone']!r})"

    def to_spec(self) -> dict[str, Any]:
        """The schedule as plain data, for the deploy request."""
        return dict(self._spec)


def describe(spec: dict[str, Any]) -> str:
    """A schedule's data as a short text, e.g. ``every 1h 30m`` or ``cron '0 6 * * *' America/New_York``."""
    if spec["kind"] == "cron":
        return f"cron {spec['cron']!r} {spec['timezone']}"
    short = {"years": "y", "months": "mo", "weeks": "w", "days": "d", "hours": "h", "minutes": "m", "seconds": "s"}
    return "every " + " ".join(f"{spec[u]:g}{short[u]}" for u in _PERIOD_UNITS if spec[u])


def period_seconds(spec: dict[str, Any]) -> float:
    """A period's approximate length in seconds (months and years taken at their average length)."""
    return sum(spec[u] * _APPROX_S[u] for u in _PERIOD_UNITS)


def check_spec(label: str, spec: Any) -> dict[str, Any]:
    """A schedule's plain data, checked (from the SDK or a deploy request): the normalised data, or
    :class:`InvalidOptionError` naming what is wrong."""
    if not isinstance(spec, dict) or spec.get("kind") not in ("period", "cron"):
        raise InvalidOptionError(f"{label}: a schedule is modal.Period(...) or modal.Cron(...), got {spec!r}"[:300])
    if spec["kind"] == "period":
        return _check_period(label, spec)
    return _check_cron(label, spec)


def _check_period(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec) - {"kind", *_PERIOD_UNITS})
    if unknown:
        raise InvalidOptionError(f"{label}: unknown field(s) {', '.join(map(repr, unknown))}")
    out: dict[str, Any] = {"kind": "period"}
    for unit in _PERIOD_UNITS:
        value = spec.get(unit, 0)
        ok_type = int | float if unit == "seconds" else int
        if isinstance(value, bool) or not isinstance(value, ok_type) or not math.isfinite(value) or value < 0:
            what = "a number" if unit == "seconds" else "an integer"
            raise InvalidOptionError(f"{label}: {unit}= must be {what} >= 0, got {value!r}")
        out[unit] = value
    total = period_seconds(out)
    if total < MIN_PERIOD_S:
        raise InvalidOptionError(
            f"{label}: the period is {total:g} s; a schedule's period must be at least {MIN_PERIOD_S:g} s "
            "(give it days=, hours=, minutes= or seconds=)"
        )
    return out


def _check_cron(label: str, spec: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(spec) - {"kind", "cron", "timezone"})
    if unknown:
        raise InvalidOptionError(f"{label}: unknown field(s) {', '.join(map(repr, unknown))}")
    cron, tz = spec.get("cron"), spec.get("timezone", "UTC")
    if not isinstance(cron, str) or not cron.strip():
        raise InvalidOptionError(f"{label}: the cron string must be a non-empty str, got {cron!r}")
    if not isinstance(tz, str) or not tz:
        raise InvalidOptionError(f"{label}: timezone= must be an IANA timezone name such as 'UTC', got {tz!r}")
    cron = " ".join(cron.split())
    fields = cron.split(" ")
    if len(cron) > 200 or not (len(fields) == 5 or (len(fields) == 1 and cron.lower() in CRON_MACROS)):
        raise InvalidOptionError(
            f"{label}: invalid cron string {cron[:200]!r}: it needs the five crontab fields "
            "'minute hour day-of-month month day-of-week' (e.g. '*/15 * * * *'; see crontab.guru) "
            f"or one of {', '.join(CRON_MACROS)}"
        )
    if not _in_container():  # checked at decoration and again by the server; the container may lack both
        from croniter import croniter

        if not croniter.is_valid(cron):
            raise InvalidOptionError(
                f"{label}: invalid cron string {cron!r}: a field is out of range or malformed "
                "(minute 0-59, hour 0-23, day of month 1-31, month 1-12, day of week 0-6; see crontab.guru)"
            )
        zone(label, tz)
    return {"kind": "cron", "cron": cron, "timezone": tz}


def zone(label: str, name: str) -> Any:
    """The ``zoneinfo.ZoneInfo`` named ``name``, or :class:`InvalidOptionError` naming it."""
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidOptionError(
            f"{label}: unknown timezone {name[:100]!r}: give an IANA timezone name such as 'UTC', "
            "'Europe/Paris' or 'America/New_York'"
        ) from None
