"""Web traffic and scaling, and `warmboot serve`: real server, real gateway, real containers, real HTTP.

Requests that hold their input meet through files in a Volume: each writes "running-<tag>" and waits for a
release file, so a test knows how many run at once without timing anything.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import signal
import subprocess
import uuid
from pathlib import Path

import httpx
from platform_helpers import WARMBOOT, Platform, wait_for

HELD = """
import fcntl, os, time
import warmboot as modal

app = modal.App({app!r})
meet = modal.Volume.from_name({volume!r}, create_if_missing=True)


@app.function(volumes={{"/meet": meet}}, max_containers=1)
@modal.concurrent(max_inputs=2)
@modal.wsgi_app()
def held():
    def application(environ, start_response):
        tag = environ["PATH_INFO"].strip("/")
        with open("/meet/lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            now = len([n for n in os.listdir("/meet") if n.startswith("running-")]) + 1
            open(f"/meet/running-{{tag}}", "w").close()
            peak = int(open("/meet/peak").read()) if os.path.exists("/meet/peak") else 0
            with open("/meet/peak", "w") as f:
                f.write(str(max(peak, now)))
        while not os.path.exists("/meet/release"):
            time.sleep(0.01)
        with open("/meet/lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            os.remove(f"/meet/running-{{tag}}")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [os.environ["WARMBOOT_CONTAINER_ID"].encode()]
    return application
"""


def test_requests_beyond_what_containers_accept_queue_within_max_containers(platform: Platform) -> None:
    name = f"held-{uuid.uuid4().hex[:6]}"
    volume = f"{name}-meet"
    platform.cli("deploy", str(platform.write_app(name.replace("-", "_"), HELD.format(app=name, volume=volume))))
    meet = platform.home / "volumes" / volume
    url = f"{platform.gateway_url}/{name}-held"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(httpx.get, f"{url}/{tag}", timeout=300) for tag in ("a", "b", "c")]
        wait_for("two requests run in the one container", lambda: len(list(meet.glob("running-*"))) == 2, watch=meet)
        (meet / "release").touch()
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert len({r.text for r in responses}) == 1, "max_containers=1: one container served all three"
    assert (meet / "peak").read_text() == "2", "max_inputs=2: the third request queued until a slot was free"


SERVED = """
import warmboot as modal

app = modal.App({app!r})


@app.function()
@modal.wsgi_app()
def page():
    def application(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"{version}"]
    return application
"""


def test_serve_reloads_the_app_when_its_file_changes_and_stops_it_on_ctrl_c(platform: Platform) -> None:
    name = f"served-{uuid.uuid4().hex[:6]}"
    path: Path = platform.write_app(name.replace("-", "_"), SERVED.format(app=name, version="version one"))
    proc = subprocess.Popen(
        [WARMBOOT, "serve", str(path)], env=platform.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:  # the URL line comes once the app serves
            found = re.search(r"page => (http://\S+)", line)
            if found:
                url = found.group(1)
                break
        assert url is not None and url.endswith(f"/{name}-page-dev"), url
        assert httpx.get(url, timeout=120).text == "version one"
        path.write_text(SERVED.format(app=name, version="version two"))
        # The server logs the new version's deploy, then the old one's stop once the URLs have moved.
        wait_for(
            "the new version serves",
            lambda: httpx.get(url, timeout=120).text == "version two",
            watch=platform.home / "logs",
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    apps = json.loads(
        platform.python("import json, warmboot.sdk.client as c; print(json.dumps(c.request('app_list')))").stdout
    )
    assert not [a for a in apps if a["name"] == name], "Ctrl-C stopped the served app"
    assert httpx.get(url, timeout=60).status_code == 404
