"""How pools of containers fail, retry, time out, scale down, scale out and hold memory limits, end to end.

Every test deploys its own app with the real CLI and calls it with the real SDK in a fresh process; the
containers are real (PID+mount namespaces, a cgroup when ``memory=`` is set). Functions that must meet each
other (a barrier) or count attempts use a Volume: a host directory under the platform's home, which the test
reads and writes directly too.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from platform_helpers import Platform

# Runs in a fresh SDK process: calls `target` (an expression using `f`) and prints one JSON line with the
# outcome: {"ok": true, "value": ...} or {"ok": false, "type": <exception class>, "message": ...}.
_CALL = """
import json, warmboot
f = warmboot.Function.from_name({app!r}, {fn!r})
out = []
for thunk in [{calls}]:
    try:
        out.append({{"ok": True, "value": thunk()}})
    except Exception as exc:
        out.append({{"ok": False, "type": type(exc).__name__, "message": str(exc)}})
print(json.dumps(out))
"""


def _outcomes(platform: Platform, app: str, fn: str, *calls: str) -> list[dict]:
    """Run each call expression (``f`` is the deployed function) in one SDK process; their outcomes, in order."""
    code = _CALL.format(app=app, fn=fn, calls=", ".join(f"lambda: {c}" for c in calls))
    proc = platform.python(code, timeout=180)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _deploy(platform: Platform, app: str, body: str) -> None:
    source = f"import warmboot as modal\n\napp = modal.App({app!r})\n" + body
    platform.cli("deploy", str(platform.write_app(app.replace("-", "_"), source)))


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _containers(platform: Platform, label: str) -> list[str]:
    """The ids of the containers `warmboot container list` shows for function ``label`` ("app.fn")."""
    listing = platform.cli("container", "list").stdout
    return [m.group(0) for line in listing.splitlines() if label in line for m in re.finditer(r"wc-[0-9a-f]+", line)]


def _volume(platform: Platform, name: str) -> Path:
    return platform.home / "volumes" / name


def _poll(predicate, deadline_s: float = 20.0, every: float = 0.2):  # type: ignore[no-untyped-def]
    """``predicate()``'s first truthy value within the deadline, else its last value."""
    end = time.monotonic() + deadline_s
    while True:
        value = predicate()
        if value or time.monotonic() > end:
            return value
        time.sleep(every)


# ----- crashes and retries ---------------------------------------------------------------------------


def test_crash_mid_call_fails_that_call_and_the_next_gets_a_fresh_container(platform: Platform) -> None:
    app = _unique("crash")
    _deploy(
        platform,
        app,
        """
import os

@app.function()
def work(mode):
    if mode == "exit":
        os._exit(1)
    return os.environ["WARMBOOT_CONTAINER_ID"]
""",
    )
    first, second, third = _outcomes(platform, app, "work", 'f.remote("ok")', 'f.remote("exit")', 'f.remote("ok")')
    assert first["ok"], first
    assert second["type"] == "ContainerCrashedError", second
    assert "died" in second["message"] and first["value"] in second["message"], second
    assert "exit status 1" in second["message"], second
    assert third["ok"], third
    assert third["value"] != first["value"], "the call after a crash must run in a fresh container"


def test_a_container_that_sigkills_itself_crashes_the_call(platform: Platform) -> None:
    app = _unique("sigkill")
    _deploy(
        platform,
        app,
        """
import os, signal

@app.function()
def work():
    os.kill(os.getpid(), signal.SIGKILL)
    return "survived SIGKILL"
""",
    )
    [outcome] = _outcomes(platform, app, "work", "f.remote()")
    assert outcome.get("type") == "ContainerCrashedError", outcome
    assert "killed by signal 9" in outcome["message"], outcome


RETRY_APP = """
import os, time

state = modal.Volume.from_name({volume!r}, create_if_missing=True)

def crash_on_first_attempt(counter, settle=0.0):
    path = "/state/" + counter
    attempt = int(open(path).read()) + 1 if os.path.exists(path) else 1
    with open(path, "w") as fh:
        fh.write(str(attempt))
    if attempt == 1:
        time.sleep(settle)
        os._exit(1)
    return attempt

@app.function(volumes={{"/state": state}}, retries=1)
def with_retry():
    return crash_on_first_attempt("with_retry")

@app.function(volumes={{"/state": state}}, retries=0)
def without_retry():
    return crash_on_first_attempt("without_retry")

@app.function(volumes={{"/state": state}}, retries=1, max_containers=2, scaledown_window=300)
def beside_idle(mode):
    if mode == "meet":  # two calls at once: two containers, idle (for 300 s) once these return
        open("/state/met-" + os.environ["WARMBOOT_CONTAINER_ID"], "w").close()
        while len([n for n in os.listdir("/state") if n.startswith("met-")]) < 2:
            time.sleep(0.05)
        return "met"
    # The pause lets the other container settle into waiting for inputs before this one crashes.
    return crash_on_first_attempt("beside_idle", settle=1.0)
"""


def test_retries_rerun_a_call_whose_container_crashed(platform: Platform) -> None:
    app, volume = _unique("retry"), _unique("retry-state")
    _deploy(platform, app, RETRY_APP.format(volume=volume))
    [retried] = _outcomes(platform, app, "with_retry", "f.remote()")
    assert retried == {"ok": True, "value": 2}, "retries=1: the second attempt, in a fresh container, succeeds"
    [failed] = _outcomes(platform, app, "without_retry", "f.remote()")
    assert failed["type"] == "ContainerCrashedError", failed
    assert (_volume(platform, volume) / "without_retry").read_text() == "1", "retries=0 must not run it again"
    assert (_volume(platform, volume) / "with_retry").read_text() == "2"

    # With another container idle (and in no hurry to scale down), the retry must go to it at once.
    code = f"""
    import warmboot
    f = warmboot.Function.from_name({app!r}, "beside_idle")
    print([call.get(timeout=60) for call in [f.spawn("meet"), f.spawn("meet")]])
    print(f.spawn("crash").get(timeout=60))
    """
    assert platform.python(code).stdout.split() == ["['met',", "'met']", "2"]
    platform.cli("app", "stop", app)


def test_timeout_stops_the_call_and_the_next_call_succeeds(platform: Platform) -> None:
    app = _unique("timeout")
    _deploy(
        platform,
        app,
        """
import time

@app.function(timeout=2)
def nap(seconds):
    time.sleep(seconds)
    return f"slept {seconds}"
""",
    )
    slow, fast = _outcomes(platform, app, "nap", "f.remote(30)", "f.remote(0)")
    assert slow["type"] == "FunctionTimeoutError", slow
    assert "timeout of 2 s" in slow["message"], slow
    assert fast == {"ok": True, "value": "slept 0"}


def test_half_a_control_message_does_not_hold_the_call_past_its_timeout(platform: Platform) -> None:
    """A function that writes the start of a frame to its control fd and stops: its own timeout still ends it."""
    app = _unique("half-frame")
    _deploy(
        platform,
        app,
        """
import os, struct, threading

@app.function(timeout=2)
def stutter(half):
    if half:
        os.write(4, struct.pack(">II", 1000, 0) + b'{"type": "res')  # a header promising more, then nothing
        threading.Event().wait()  # stalls for good: only the call's timeout can end it
    return "fine"
""",
    )
    stuck, after = _outcomes(platform, app, "stutter", "f.remote(True)", "f.remote(False)")
    assert stuck["type"] == "FunctionTimeoutError", stuck
    assert "timeout of 2 s" in stuck["message"], stuck
    assert after == {"ok": True, "value": "fine"}


def test_every_accepted_call_ends_even_when_every_container_crashes(platform: Platform) -> None:
    app = _unique("always-crash")
    _deploy(
        platform,
        app,
        """
import os

@app.function(max_containers=2)
def doomed(i):
    os._exit(3)
""",
    )
    code = f"""
    import json, warmboot
    f = warmboot.Function.from_name({app!r}, "doomed")
    calls = [f.spawn(i) for i in range(6)]
    out = []
    for call in calls:
        try:
            out.append(["returned", call.get(timeout=60)])
        except Exception as exc:
            out.append([type(exc).__name__, str(exc)])
    print(json.dumps(out))
    """
    outcomes = json.loads(platform.python(code, timeout=180).stdout.strip().splitlines()[-1])
    assert [kind for kind, _ in outcomes] == ["ContainerCrashedError"] * 6, outcomes
    assert all("exit status 3" in message for _, message in outcomes), outcomes


# ----- scaling -----------------------------------------------------------------------------------------


def test_idle_container_scales_down_but_min_containers_stay(platform: Platform) -> None:
    app, volume = _unique("scaledown"), _unique("scaledown-gate")
    _deploy(
        platform,
        app,
        f"""
import os, time

gate = modal.Volume.from_name({volume!r}, create_if_missing=True)

@app.function(scaledown_window=1, volumes={{"/gate": gate}})
def gated():
    # Busy until the test opens the gate, so that the test can list it while it is surely there.
    open("/gate/entered", "w").write(os.environ["WARMBOOT_CONTAINER_ID"])
    deadline = time.monotonic() + 60
    while not os.path.exists("/gate/open") and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.environ["WARMBOOT_CONTAINER_ID"]

@app.function(scaledown_window=1, min_containers=1)
def warm():
    return os.environ["WARMBOOT_CONTAINER_ID"]
""",
    )
    warm_label, gated_label = f"{app}.warm", f"{app}.gated"
    warm_ids = _poll(lambda: _containers(platform, warm_label))
    assert len(warm_ids) == 1, f"min_containers=1 must start one container at deploy, without calls: {warm_ids}"
    assert _containers(platform, gated_label) == [], "no calls yet, no min_containers: no container"

    gate = _volume(platform, volume)
    call_id = platform.python(
        f"""
        import warmboot
        print(warmboot.Function.from_name({app!r}, "gated").spawn().object_id)
        """
    ).stdout.strip()
    assert _poll(lambda: (gate / "entered").exists(), deadline_s=60), "the gated call never started"
    gated_id = (gate / "entered").read_text()
    assert _containers(platform, gated_label) == [gated_id]
    (gate / "open").touch()
    result = platform.python(
        f"""
        import warmboot
        print(warmboot.FunctionCall({call_id!r}).get(timeout=60))
        """
    )
    assert result.stdout.strip() == gated_id

    gone = _poll(lambda: not _containers(platform, gated_label))
    assert gone, "an idle container must stop once its scaledown_window (1 s) has passed"
    # The warm container has now been idle longer than its own 1 s window too: it stays, the same one.
    assert _containers(platform, warm_label) == warm_ids
    [warm_call] = _outcomes(platform, app, "warm", "f.remote()")
    assert warm_call == {"ok": True, "value": warm_ids[0]}, "the kept container serves the call"


BARRIER_APP = """
import os, time, uuid

state = modal.Volume.from_name({volume!r}, create_if_missing=True)

def meet(group, n):
    # A barrier: sign in, then wait (up to 60 s) until n calls of this group have signed in. No call leaves
    # before the n-th arrives, so meeting it means n calls were running at once. Returns (container, met).
    here = "/state/" + group
    os.makedirs(here, exist_ok=True)
    open(os.path.join(here, uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + 60
    while (arrived := len(os.listdir(here))) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return os.environ["WARMBOOT_CONTAINER_ID"], arrived >= n

@app.function(max_containers=2, volumes={{"/state": state}})
def capped(group, n):
    return meet(group, n)

@app.function(max_containers=4, volumes={{"/state": state}})
def wide(group, n):
    return meet(group, n)
"""


def test_spawned_calls_scale_out_up_to_max_containers(platform: Platform) -> None:
    app, volume = _unique("scaleout"), _unique("scaleout-state")
    _deploy(platform, app, BARRIER_APP.format(volume=volume))
    code = f"""
    import json, warmboot
    out = {{}}
    for fn in ("capped", "wide"):
        f = warmboot.Function.from_name({app!r}, fn)
        calls = [f.spawn(fn, 2 if fn == "capped" else 4) for _ in range(4)]
        out[fn] = [call.get(timeout=120) for call in calls]
    print(json.dumps(out))
    """
    out = json.loads(platform.python(code, timeout=300).stdout.strip().splitlines()[-1])
    # Each container runs one call at a time, so a met barrier of n proves n containers ran at once.
    assert all(met for _, met in out["capped"] + out["wide"]), out
    # max_containers=2: the first two calls meet (2 containers), and the cap allows no third for the rest.
    assert len({cid for cid, _ in out["capped"]}) == 2, out["capped"]
    # max_containers=4: all four calls had to run at once, in four containers.
    assert len({cid for cid, _ in out["wide"]}) == 4, out["wide"]


# ----- memory ---------------------------------------------------------------------------------------------


def test_memory_limit_kills_a_container_that_exceeds_it(platform: Platform) -> None:
    app = _unique("hog")  # not "memory": the error message names the app
    _deploy(
        platform,
        app,
        """
@app.function(memory=64)
def hog(mib):
    chunks = [b"x" * (1024 * 1024) for _ in range(mib)]  # written, so really resident
    return sum(len(c) for c in chunks) // (1024 * 1024)
""",
    )
    small, big, small_again = _outcomes(platform, app, "hog", "f.remote(4)", "f.remote(300)", "f.remote(4)")
    assert small == {"ok": True, "value": 4}
    assert big["type"] == "ContainerCrashedError", big
    assert "out of memory" in big["message"] and "memory=64 MiB" in big["message"], big
    assert small_again == {"ok": True, "value": 4}
