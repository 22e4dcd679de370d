"""Scheduled functions: `warmboot deploy examples/schedules.py` runs them until `warmboot app stop schedules`.

`warmboot run examples/schedules.py` runs them too, while the run lasts: its entrypoint waits for two heartbeats.
`warmboot app list` shows each schedule's next run; `warmboot logs schedules` shows the runs (and missed ticks).
"""

import time
from datetime import UTC, datetime

import warmboot as modal

app = modal.App("schedules")
beats = modal.Volume.from_name("schedules-heartbeats", create_if_missing=True)


@app.function(schedule=modal.Period(seconds=2), volumes={"/beats": beats})
def heartbeat() -> None:
    """Every 2 seconds, counted from the deploy (a redeploy starts the period again)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    with open("/beats/heartbeats", "a") as f:
        f.write(now + "\n")
    print(f"heartbeat at {now}")


@app.function(schedule=modal.Cron("0 6 * * 1-5", timezone="America/New_York"))
def morning_report() -> None:
    """At 06:00 New York time on weekdays, whether daylight saving is in effect or not."""
    print("good morning, New York")


@app.function(volumes={"/beats": beats})
def heartbeats() -> int:
    """How many heartbeats the volume holds."""
    try:
        with open("/beats/heartbeats") as f:
            return len(f.read().splitlines())
    except FileNotFoundError:
        return 0


@app.local_entrypoint()
def main() -> None:
    start = heartbeats.remote()
    deadline = time.monotonic() + 120
    while heartbeats.remote() < start + 2:
        if time.monotonic() > deadline:
            raise SystemExit("the heartbeat schedule did not run twice in 2 minutes")
        time.sleep(0.5)
    print("heartbeat ran at least 2 times")
