"""The dashboard in a real browser (headless Chromium through Selenium), on a real server with real containers.

One app, deployed once for the module: a function with a memory snapshot, called so that it boots cold, runs
warm, fails once, and (after a stop and an unchanged redeploy) restores its snapshot; and a parametrized class
called with a value full of HTML. The tests sign the browser in with the URL `warmboot dashboard` prints and
check what the pages show against the calls made: their ids, statuses and start kinds, one chart point per
successful call, the snapshot's restores, the live log tail; that a request without the token is refused; and
that values holding HTML or script are shown as text and never run.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import Dashboard, browser  # noqa: F401 - the session's browser fixture
from platform_helpers import Platform

SOURCE = """
import warmboot as modal

app = modal.App({app!r})


@app.function(enable_memory_snapshot=True, scaledown_window=600)
def work(text: str) -> str:
    if text == "fail":
        raise ValueError("asked to fail")
    print(text, flush=True)
    return text.upper()


@app.cls(enable_memory_snapshot=True, scaledown_window=600)
class Model:
    name: str = modal.parameter()

    @modal.method()
    def hello(self) -> str:
        return "hello " + self.name
"""

# Runs in a fresh SDK process: spawns one call (so that its id is known), waits for its outcome, prints both.
_CALL = """
import json, warmboot
app, tag, method, params, args = {app!r}, {tag!r}, {method!r}, {params!r}, {args!r}
fn = getattr(warmboot.Cls.from_name(app, tag)(**params), method) if method else warmboot.Function.from_name(app, tag)
handle = fn.spawn(*args)
try:
    out = {{"id": handle.object_id, "ok": True, "result": handle.get(timeout=120)}}
except Exception as exc:
    out = {{"id": handle.object_id, "ok": False, "error": str(exc)}}
print(json.dumps(out))
"""

KIND = {"cold": "cold boot", "warm": "warm container", "restore": "snapshot restore"}
#: Shown by the pages as text; window.__pwned stays unset unless one of them runs.
XSS_LOG_LINE = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
XSS_PARAM = "<script>window.__pwned=3</script>"


@dataclass
class Call:
    id: str
    ok: bool
    kind: str | None  #: the start kind this call must have had, where the test knows it


@dataclass
class DeployedApp:
    name: str
    path: Path
    version: str
    calls: list[Call] = field(default_factory=list)  #: every call of `work`, in order

    def call(self, platform: Platform, text: str, kind: str | None = None) -> Call:
        """Call work(text) and wait for its outcome."""
        out = _spawn(platform, self.name, "work", None, {}, (text,))
        call = Call(out["id"], out["ok"], kind)
        assert out["ok"] == (text != "fail"), out
        if out["ok"]:
            assert out["result"] == text.upper()
        else:
            assert "asked to fail" in out["error"], out
        self.calls.append(call)
        return call


def _spawn(platform: Platform, app: str, tag: str, method: str | None, params: dict, args: tuple) -> dict[str, Any]:
    code = _CALL.format(app=app, tag=tag, method=method, params=params, args=args)
    proc = platform.python(code, timeout=240)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _restores(platform: Platform, label: str) -> int:
    return platform.log_text(label.split(".")[0]).count(f"Restored {label} from memory snapshot")


def _app_version(platform: Platform, name: str) -> str:
    out = platform.cli("app", "list").stdout
    row = next((line for line in out.splitlines() if f" {name} " in line), None)
    assert row is not None, out
    cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
    versions = [c for c in cells if re.fullmatch(r"v?\d+", c)]
    assert versions, row
    return versions[0]


@pytest.fixture(scope="module")
def deployed(platform: Platform) -> DeployedApp:
    """The app, after a cold boot, a warm call, a failed call, a stop, an unchanged redeploy and a restore."""
    name = f"dash-{uuid.uuid4().hex[:8]}"
    path = platform.write_app(name.replace("-", "_"), SOURCE.format(app=name))
    platform.cli("deploy", str(path), timeout=600)
    app = DeployedApp(name, path, "")
    app.call(platform, "first", "cold")
    app.call(platform, "second", "warm")
    app.call(platform, "fail", "warm")
    platform.cli("app", "stop", name)
    platform.cli("deploy", str(path))  # unchanged: the same snapshot key, and no container left
    app.call(platform, "restored", "restore")
    assert _restores(platform, f"{name}.work") == 1, platform.log_text(name)[-3000:]
    app.version = _app_version(platform, name)
    return app


@pytest.fixture(scope="module")
def board(platform: Platform, browser: Any) -> Dashboard:  # noqa: F811 - the fixture imported above
    return Dashboard(platform, browser)


@pytest.fixture
def dash(board: Dashboard) -> Iterator[Dashboard]:
    """The dashboard, the browser signed in (a test may have dropped its cookie)."""
    board.sign_in()
    yield board


def _points(dash: Dashboard, chart: str) -> list[str]:
    """The data-kind of every point of ``svg.chart.<chart>`` on the page ("" for points without one)."""
    return dash.driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(function (c) {"
        "  return c.getAttribute('data-kind') || ''; });",
        f"svg.chart.{chart} circle.point",
    )


# ----- what the pages show -----------------------------------------------------------------------------------


def test_pages_show_the_deploy_calls_start_kinds_chart_snapshot_and_container(
    platform: Platform, deployed: DeployedApp, dash: Dashboard
) -> None:
    name = deployed.name
    # The apps page: the app, its version and functions.
    dash.open("")
    apps = {r["app"]: r for r in dash.table("apps")}
    assert name in apps, apps
    assert apps[name]["version"] == deployed.version.lstrip("v")
    assert "work" in apps[name]["functions"] and "Model" in apps[name]["functions"]
    assert apps[name]["state"]

    # The function page: every call made, with its status and start kind.
    mine = {c.id for c in deployed.calls}
    rows = dash.open_until(
        f"functions/{name}/work",
        lambda _d: (rows := {r["call"]: r for r in dash.table("calls")}) and mine <= set(rows) and rows,
        "every call of work",
    )
    assert set(rows) == mine, "the page shows exactly the calls made"
    for call in deployed.calls:
        row = rows[call.id]
        assert row["status"] == ("ok" if call.ok else "ValueError"), row
        if call.kind is not None:
            assert row["start"] == KIND[call.kind], (call, row)
    starts = [rows[c.id]["start"] for c in deployed.calls if c.kind is not None]
    assert starts == ["cold boot", "warm container", "warm container", "snapshot restore"]

    # The chart: one point per successful call, in the column of its start kind.
    points = _points(dash, "by-kind")
    expected = {k: sum(r["status"] == "ok" and r["start"] == label for r in rows.values()) for k, label in KIND.items()}
    assert {k: points.count(k) for k in KIND} == expected, points
    assert len(points) == sum(c.ok for c in deployed.calls)
    assert expected["cold"] == 1 and expected["restore"] == 1 and expected["warm"] >= 1

    # The snapshot, with the restore counted.
    snaps = dash.open_until(
        f"functions/{name}/work",
        lambda _d: (s := dash.table("snapshots")) and int(s[0]["restores"] or 0) >= 1 and s,
        "the snapshot with its restore",
    )
    assert len(snaps) == 1 and snaps[0]["state"] == "ok", snaps
    assert "config" in [t.get_attribute("id") for t in dash.driver.find_elements("css selector", "table")]
    options = {r["option"]: r["value"] for r in dash.table("config")}
    assert options.get("enable_memory_snapshot") == "True", options

    # The container that restored the snapshot, still running (scaledown_window=600).
    restored = rows[deployed.calls[-1].id]
    assert restored["container"], restored
    dash.open("containers")
    containers = {r["container"]: r for r in dash.table("containers")}
    assert restored["container"] in containers, containers
    assert containers[restored["container"]]["app"] == name
    assert containers[restored["container"]]["function"] == f"{name}.work"

    # The snapshots page, and the snapshot's own page: a chart with one point per restore.
    dash.open("snapshots")
    listed = [r for r in dash.table("snapshots") if r["function"] == f"{name}.work"]
    assert len(listed) == 1 and listed[0]["state"] == "ok", listed
    assert listed[0]["key"] == snaps[0]["snapshot"]
    link = dash.driver.find_element("link text", listed[0]["key"])
    link.click()
    dash.wait(
        lambda d: "/_dashboard/snapshots/" in d.current_url and d.find_elements("css selector", "main h1"),
        "the snapshot's page is open",
    )
    assert dash.text("main h1") == f"Snapshot of {name}.work"
    restores = _restores(platform, f"{name}.work")
    assert len(_points(dash, "over-time")) == restores == int(listed[0]["restores"])


def test_the_log_tail_shows_a_new_line_without_a_reload(
    platform: Platform, deployed: DeployedApp, dash: Dashboard
) -> None:
    dash.open(f"logs/{deployed.name}")
    log = dash.driver.find_element("id", "log")
    dash.wait(lambda d: d.find_element("id", "tail-state").text == "live", "the tail is live")
    line = f"tail-{uuid.uuid4().hex}"
    assert line not in log.text
    deployed.call(platform, line)
    dash.wait(lambda _d: line in log.text, "the new line reaches the page")
    assert dash.driver.find_element("id", "log") == log, "the same page: nothing reloaded it"
    assert dash.driver.find_element("id", "tail-state").text == "live"


# ----- signing in ------------------------------------------------------------------------------------------


def test_without_the_token_every_page_and_api_is_refused(deployed: DeployedApp, board: Dashboard) -> None:
    driver = board.driver
    driver.get(board.url())  # on the dashboard's origin, to drop its cookie
    driver.delete_all_cookies()
    for path in ("", f"functions/{deployed.name}/work", "secrets"):
        driver.get(board.url(path))
        board.wait(lambda d: d.find_elements("css selector", "main h1"), f"{path} answers")
        assert board.text("main h1") == "Not signed in"
        assert deployed.name not in driver.page_source

    with httpx.Client(trust_env=False, follow_redirects=False, timeout=30) as http:
        for path in ("/", f"/api/logs/{deployed.name}?after=0", "/secrets", "/static/tail.js"):
            r = http.get(board.base + path)
            assert r.status_code == 401, (path, r.status_code)
            assert "Not signed in" in r.text and deployed.name not in r.text
        assert http.get(f"{board.base}/?token=not-the-token").status_code == 401
        assert http.get(f"{board.base}/", headers={"cookie": "warmboot_dashboard=not-the-token"}).status_code == 401
        assert http.get(f"{board.base}/", headers={"authorization": "Bearer not-the-token"}).status_code == 401
        bearer = http.get(f"{board.base}/", headers={"authorization": f"Bearer {board.token}"})
        assert bearer.status_code == 200 and deployed.name in bearer.text  # the CLI's way in: no cookie needed

        r = http.get(board.login_url)
        assert r.status_code == 303 and r.headers["location"] == "/_dashboard/"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"warmboot_dashboard={board.token};") and "HttpOnly" in cookie, cookie
        assert "SameSite=Strict" in cookie and "Path=/_dashboard" in cookie, cookie
    with httpx.Client(trust_env=False, follow_redirects=False, timeout=30, cookies=r.cookies) as signed_in:
        signed = signed_in.get(f"{board.base}/api/logs/{deployed.name}?after=0")
        assert signed.status_code == 200 and isinstance(signed.json()["lines"], list), signed.text
        # Signed in, still only the dashboard's own data: a name that is a path (encoded twice, so that one
        # decoding leaves "%2F") reads no other file, and a malformed offset is a clear error, not a failure.
        for path in ("/logs/..%252F..%252Fstate", "/api/logs/..%252Fstate?after=0", "/volumes/..%252Flogs"):
            outside = signed_in.get(board.base + path)
            assert outside.status_code in (400, 404) and "Traceback" not in outside.text, (path, outside.text)
        bad = signed_in.get(f"{board.base}/api/logs/{deployed.name}?after=abc")
        assert bad.status_code == 400 and "byte offset" in bad.text, bad.text

    board.sign_in()
    (cookie,) = [c for c in driver.get_cookies() if c["name"] == "warmboot_dashboard"]
    assert cookie["httpOnly"] and cookie["value"] == board.token
    assert "warmboot_dashboard" not in driver.execute_script("return document.cookie")


# ----- escaping --------------------------------------------------------------------------------------------


def _assert_shown_as_text(dash: Dashboard, needle: str, where: str = "main") -> None:
    assert needle in dash.text(where), f"{needle!r} not shown as text in {where}"
    assert dash.driver.execute_script("return window.__pwned") is None
    assert dash.driver.find_elements("css selector", "main img, main script") == []
    scripts = [s.get_attribute("src") for s in dash.driver.find_elements("css selector", "script")]
    assert all(s and s.endswith("/_dashboard/static/tail.js") for s in scripts), scripts


def test_html_and_script_in_values_are_shown_as_text_never_run(
    platform: Platform, deployed: DeployedApp, dash: Dashboard
) -> None:
    name = deployed.name
    # (a) A log line, as the live tail appends it and as the page renders it on load.
    dash.open(f"logs/{name}")
    log = dash.driver.find_element("id", "log")
    dash.wait(lambda d: d.find_element("id", "tail-state").text == "live", "the tail is live")
    deployed.call(platform, XSS_LOG_LINE)
    dash.wait(lambda _d: XSS_LOG_LINE in log.text, "the line reaches the page")
    _assert_shown_as_text(dash, XSS_LOG_LINE, "#log")
    dash.open(f"logs/{name}")
    _assert_shown_as_text(dash, XSS_LOG_LINE, "#log")

    # (b) A modal.parameter() value: in the container list and the snapshot list, as Model(name='<script>...').
    out = _spawn(platform, name, "Model", "hello", {"name": XSS_PARAM}, ())
    assert out["ok"] and out["result"] == "hello " + XSS_PARAM, out
    label = f"{name}.Model(name={XSS_PARAM!r})"
    dash.open_until(
        "containers", lambda _d: label in {r["function"] for r in dash.table("containers")}, "the variant's container"
    )
    _assert_shown_as_text(dash, label)
    rows = dash.open_until(
        "snapshots", lambda _d: [r for r in dash.table("snapshots") if r["function"] == label], "the variant's snapshot"
    )
    _assert_shown_as_text(dash, label)
    dash.driver.find_element("link text", rows[0]["key"]).click()
    dash.wait(
        lambda d: "/_dashboard/snapshots/" in d.current_url and d.find_elements("css selector", "main h1"),
        "the variant snapshot's page is open",
    )
    _assert_shown_as_text(dash, f"Snapshot of {label}", "main h1")
    assert XSS_PARAM in dash.driver.title
    dash.open_until(
        f"functions/{name}/Model",
        lambda _d: out["id"] in {r["call"] for r in dash.table("calls")},
        "the variant's call",
    )
    _assert_shown_as_text(dash, out["id"])

    # (c) A secret's key: only names a shell accepts, so none can hold HTML; its value is never shown at all.
    refused = platform.cli("secret", "create", f"{name}-xss", "<b>K</b>=v", check=False)
    assert refused.returncode != 0 and "is not a valid variable name" in refused.stdout + refused.stderr


# ----- secrets and volumes ---------------------------------------------------------------------------------


def test_secrets_show_names_and_keys_never_values_and_volumes_their_files(
    platform: Platform, deployed: DeployedApp, dash: Dashboard
) -> None:
    secret, value = f"{deployed.name}-secret", f"value-{uuid.uuid4().hex}<b>x</b>"
    platform.cli("secret", "create", secret, "API_KEY=" + value, "OTHER_KEY=" + value[::-1])
    dash.open("secrets")
    rows = {r["secret"]: r for r in dash.table("secrets")}
    assert secret in rows, rows
    page = dash.driver.page_source
    assert value.split("<")[0] not in page and value[::-1].split(">")[-1] not in page, "a secret's value is shown"
    assert rows[secret]["keys"] == "API_KEY, OTHER_KEY"

    volume = f"{deployed.name}-vol"
    local = platform.apps_dir / f"{volume}.txt"
    local.write_text("a" * 1500)
    platform.cli("volume", "put", volume, str(local), "/data/file.txt")
    dash.open("volumes")
    rows = {r["volume"]: r for r in dash.table("volumes")}
    assert volume in rows, rows
    assert rows[volume]["files"] == "1" and rows[volume]["size"] == "1.5 KB"
    dash.driver.find_element("link text", volume).click()
    dash.wait(lambda d: d.current_url.endswith(f"/volumes/{volume}"), "the volume's page is open")
    assert dash.table("files") == [{"file": "data/file.txt", "size": "1.5 KB"}]
