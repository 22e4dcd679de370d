"""Web endpoints end to end: a real server and its HTTP gateway, real containers, real HTTP and websockets.

One app holds every kind of endpoint; the tests speak to it through the gateway URLs that `warmboot deploy`
prints and `Function.get_web_url()` returns.
"""

from __future__ import annotations

import json
import re
import textwrap
import uuid

import httpx
import pytest
from platform_helpers import Platform

SOURCE = """
import os, uuid
import warmboot as modal

image = modal.Image.debian_slim().pip_install("fastapi")
app = modal.App({app!r})


@app.function(image=image)
@modal.fastapi_endpoint()
def hello(name: str = "world"):
    return {{"hello": name}}


@app.function(image=image)
@modal.fastapi_endpoint(method="POST", label={echo_label!r}, docs=True)
def echo(item: dict):
    return {{"got": item}}


@app.function(image=image)
@modal.fastapi_endpoint(requires_proxy_auth=True)
def private():
    return "only with a token"


@app.function(image=image)
@modal.concurrent(max_inputs=4)
@modal.asgi_app()
def api():
    import asyncio
    from fastapi import FastAPI, Request, WebSocket
    from fastapi.responses import StreamingResponse

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_web):
        yield {{"started_by": "lifespan"}}  # ASGI lifespan state: every request's scope gets a copy

    web = FastAPI(lifespan=lifespan)

    @web.get("/events")
    async def events(n: int = 3):
        async def stream():
            for i in range(n):
                yield f"data: tick {{i}}\\n\\n"
                await asyncio.sleep(0)
        return StreamingResponse(stream(), media_type="text/event-stream")

    @web.post("/upload")
    async def upload(request: Request):
        sizes = [len(chunk) async for chunk in request.stream()]
        return {{"bytes": sum(sizes), "headers_seen": sorted(request.headers)}}

    @web.get("/where")
    def where(request: Request):
        scope = request.scope
        return {{"root_path": scope.get("root_path"), "path": request.url.path, "state": request.state.started_by}}

    @web.websocket("/ws")
    async def ws(websocket: WebSocket):
        await websocket.accept()
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                await websocket.close()
                return
            await websocket.send_text(text.upper())

    return web


@app.function(image=image, timeout=3)
@modal.asgi_app()
def fragile():
    from fastapi import FastAPI

    web = FastAPI()

    @web.get("/who")
    def who():
        return {{"container": os.environ["WARMBOOT_CONTAINER_ID"]}}

    @web.get("/crash")
    def crash():
        os._exit(3)

    @web.get("/hang")
    def hang():
        import threading

        threading.Event().wait()

    return web


@app.function()
@modal.wsgi_app()
def plain():
    def application(environ, start_response):
        body = environ["wsgi.input"].read().decode()
        text = f"{{environ['REQUEST_METHOD']}} {{environ['PATH_INFO']}} {{environ['SCRIPT_NAME']}} {{body}}"
        start_response("201 Created", [("Content-Type", "text/plain")])
        return [text.encode()]
    return application


@app.function()
@modal.web_server(8080, startup_timeout=30)
def files():
    import subprocess
    os.makedirs("/tmp/site", exist_ok=True)
    with open("/tmp/site/index.html", "w") as f:
        f.write("served by http.server")
    subprocess.Popen(["python3", "-m", "http.server", "8080", "--directory", "/tmp/site"])


@app.function()
@modal.web_server(8081, startup_timeout=1)
def never_listens():
    pass


@app.cls(image=image, enable_memory_snapshot=True, max_inputs=1)
class Model:
    @modal.enter(snap=True)
    def load(self):
        self.loaded_in = uuid.uuid4().hex  # made once, before the snapshot: every restored copy has the same

    @modal.method()
    def double(self, x):
        return [x * 2, self.loaded_in is not None]

    @modal.fastapi_endpoint()
    def predict(self, x: int = 1):
        return {{"y": x * 2, "loaded_in": self.loaded_in, "container": os.environ["WARMBOOT_CONTAINER_ID"]}}
"""


@pytest.fixture(scope="module")
def web_app(platform: Platform) -> dict[str, str]:
    """The app's name and its endpoints' URLs, as `warmboot deploy` printed them."""
    name = f"web-{uuid.uuid4().hex[:6]}"
    source = SOURCE.format(app=name, echo_label=f"{name}-echo-label")
    proc = platform.cli("deploy", str(platform.write_app(name.replace("-", "_"), source)), timeout=600)
    urls = dict(re.findall(r"^\s+(\S+) => (http://\S+)", proc.stderr + proc.stdout, re.M))
    expected = {"hello", "echo", "private", "api", "fragile", "plain", "files", "never_listens", "Model.predict"}
    assert set(urls) == expected, urls
    return {"name": name, **urls}


def test_deploy_prints_endpoint_urls_and_get_web_url_returns_them(platform: Platform, web_app: dict[str, str]) -> None:
    name = web_app["name"]
    assert web_app["hello"] == f"{platform.gateway_url}/{name}-hello"
    assert web_app["echo"] == f"{platform.gateway_url}/{name}-echo-label"
    assert web_app["Model.predict"] == f"{platform.gateway_url}/{name}-model-predict"
    out = platform.python(
        f"""
        import json, warmboot
        print(json.dumps([
            warmboot.Function.from_name({name!r}, "hello").get_web_url(),
            warmboot.Cls.from_name({name!r}, "Model")().predict.get_web_url(),
        ]))
        """
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [web_app["hello"], web_app["Model.predict"]]


def test_fastapi_endpoints_take_query_parameters_and_json_bodies(web_app: dict[str, str]) -> None:
    assert httpx.get(web_app["hello"], params={"name": "gateway"}, timeout=120).json() == {"hello": "gateway"}
    response = httpx.post(web_app["echo"], json={"a": [1, 2]}, timeout=120)
    assert response.status_code == 200 and response.json() == {"got": {"a": [1, 2]}}
    assert httpx.get(web_app["echo"] + "/docs", timeout=60).status_code == 200, "docs=True serves /docs"
    assert httpx.get(web_app["echo"], timeout=60).status_code == 405, "a POST endpoint refuses GET"


def test_requests_stream_both_ways_and_server_sent_events_arrive_as_sent(web_app: dict[str, str]) -> None:
    with httpx.stream("GET", web_app["api"] + "/events", params={"n": 4}, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events == [f"data: tick {i}" for i in range(4)]

    def chunks():  # a chunked upload: the body is sent in pieces, with no length known in advance
        for _ in range(64):
            yield b"x" * 16384

    response = httpx.post(web_app["api"] + "/upload", content=chunks(), timeout=120)
    assert response.json()["bytes"] == 64 * 16384


def test_an_asgi_app_sees_its_root_path_and_lifespan_state_and_host_routing_works(
    platform: Platform, web_app: dict[str, str]
) -> None:
    name = web_app["name"]
    expected = {"root_path": f"/{name}-api", "path": "/where", "state": "lifespan"}
    assert httpx.get(web_app["api"] + "/where", timeout=120).json() == expected
    by_host = httpx.get(platform.gateway_url + "/where", headers={"Host": f"{name}-api.localhost"}, timeout=120).json()
    assert by_host == {"root_path": "", "path": "/where", "state": "lifespan"}


def test_websockets_carry_messages_both_ways(web_app: dict[str, str]) -> None:
    from websockets.sync.client import connect

    with connect(web_app["api"].replace("http://", "ws://") + "/ws", open_timeout=120) as ws:
        replies = []
        for word in ("warm", "boot"):
            ws.send(word)
            replies.append(ws.recv(timeout=60))
        ws.send("bye")
    assert replies == ["WARM", "BOOT"]


def test_a_wsgi_app_gets_method_path_script_name_and_body(web_app: dict[str, str]) -> None:
    name = web_app["name"]
    response = httpx.put(web_app["plain"] + "/a/b", content=b"payload", timeout=120)
    assert response.status_code == 201
    assert response.text == f"PUT /a/b /{name}-plain payload"


def test_a_web_server_function_is_reached_through_its_port(web_app: dict[str, str]) -> None:
    response = httpx.get(web_app["files"] + "/", timeout=120)
    assert response.status_code == 200 and response.text == "served by http.server"
    assert httpx.get(web_app["files"] + "/missing.html", timeout=60).status_code == 404


def test_a_web_server_that_never_listens_fails_with_the_port_and_startup_timeout(web_app: dict[str, str]) -> None:
    response = httpx.get(web_app["never_listens"], timeout=120)
    assert response.status_code == 502
    error = response.json()["error"]
    assert "nothing accepted connections on port 8081 within startup_timeout=1 s" in error, error


def test_proxy_auth_endpoints_need_a_token_from_the_cli(platform: Platform, web_app: dict[str, str]) -> None:
    refused = httpx.get(web_app["private"], timeout=60)
    assert refused.status_code == 401 and "warmboot token create" in refused.json()["error"]
    created = platform.cli("token", "create").stdout
    key = re.search(r"Modal-Key: (\S+)", created).group(1)  # type: ignore[union-attr]
    secret = re.search(r"Modal-Secret: (\S+)", created).group(1)  # type: ignore[union-attr]
    wrong = httpx.get(web_app["private"], headers={"Modal-Key": key, "Modal-Secret": secret + "x"}, timeout=60)
    assert wrong.status_code == 401
    allowed = httpx.get(web_app["private"], headers={"Modal-Key": key, "Modal-Secret": secret}, timeout=120)
    assert allowed.status_code == 200 and allowed.json() == "only with a token"
    platform.cli("token", "rm", key)
    assert (
        httpx.get(web_app["private"], headers={"Modal-Key": key, "Modal-Secret": secret}, timeout=60).status_code == 401
    )


def test_a_restored_endpoint_answers_its_first_request_without_initialising(
    platform: Platform, web_app: dict[str, str]
) -> None:
    # max_inputs=1: each request gets a container of its own. The first boots cold and makes the snapshot;
    # the second is a copy restored from it, with the state its @enter(snap=True) made, never made again.
    first = httpx.get(web_app["Model.predict"], params={"x": 2}, timeout=300).json()
    second = httpx.get(web_app["Model.predict"], params={"x": 3}, timeout=300).json()
    assert (first["y"], second["y"]) == (4, 6)
    assert first["container"] != second["container"]
    assert first["loaded_in"] == second["loaded_in"]
    log = platform.log_text(web_app["name"])
    assert f"Restored {web_app['name']}.Model from memory snapshot" in log and second["container"] in log


def test_a_class_with_a_web_endpoint_serves_its_other_methods_as_calls(
    platform: Platform, web_app: dict[str, str]
) -> None:
    out = platform.python(
        f"""
        import json, warmboot
        print(json.dumps(warmboot.Cls.from_name({web_app["name"]!r}, "Model")().double.remote(21)))
        """
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == [42, True]


def test_unknown_labels_are_a_clear_404(platform: Platform) -> None:
    response = httpx.get(platform.gateway_url + "/no-such-endpoint/x", timeout=60)
    assert response.status_code == 404
    assert "no web endpoint is labelled 'no-such-endpoint'" in response.json()["error"]


BAD = {
    "same_label": (
        """
        @app.function()
        @modal.fastapi_endpoint(label="dup")
        def a():
            return 1

        @app.function()
        @modal.asgi_app(label="dup")
        def b():
            return None
        """,
        "web endpoints a and b both have the label 'dup'",
    ),
    "bad_label": (
        """
        @app.function()
        @modal.fastapi_endpoint(label="Not_A_Label")
        def a():
            return 1
        """,
        "label='Not_A_Label' must be 1 to 63 lowercase letters, digits or dashes",
    ),
    "bad_port": (
        """
        @app.function()
        @modal.web_server(70000)
        def a():
            pass
        """,
        "port must be a TCP port number (1-65535), got 70000",
    ),
    "no_parentheses": (
        """
        @app.function()
        @modal.asgi_app
        def a():
            pass
        """,
        "@modal.asgi_app takes parentheses",
    ),
    "bad_method": (
        """
        @app.function()
        @modal.fastapi_endpoint(method="FETCH")
        def a():
            pass
        """,
        "method='FETCH' is not one of GET, POST",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_endpoint_definitions_are_refused_with_a_clear_error(platform: Platform, case: str) -> None:
    body, expected = BAD[case]
    source = "import warmboot as modal\napp = modal.App('bad-web')\n" + textwrap.dedent(body)
    proc = platform.cli("deploy", str(platform.write_app(f"bad_web_{case}", source)), check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_a_label_another_app_serves_is_refused_at_deploy(platform: Platform, web_app: dict[str, str]) -> None:
    taken = f"{web_app['name']}-echo-label"
    source = f"""
        import warmboot as modal
        app = modal.App("label-thief")

        @app.function()
        @modal.fastapi_endpoint(label={taken!r})
        def steal():
            return 1
        """
    proc = platform.cli("deploy", str(platform.write_app("label_thief", source)), check=False)
    assert proc.returncode == 1
    assert f"which app {web_app['name']!r} already serves" in proc.stderr


def _fragile_container(web_app: dict[str, str]) -> str:
    """The container that answers the fragile endpoint now."""
    return httpx.get(web_app["fragile"] + "/who", timeout=120).json()["container"]


def test_a_container_that_dies_mid_request_answers_502_and_the_next_request_gets_a_new_one(
    web_app: dict[str, str],
) -> None:
    first = _fragile_container(web_app)
    # The container is warm and idle: this request takes the gateway's fast path (a lent slot).
    crashed = httpx.get(web_app["fragile"] + "/crash", timeout=120)
    assert crashed.status_code == 502
    assert f"container {first} of {web_app['name']}.fragile died" in crashed.json()["error"]
    second = _fragile_container(web_app)
    assert second != first


def test_a_request_past_the_function_timeout_answers_504_and_its_container_is_replaced(
    web_app: dict[str, str],
) -> None:
    first = _fragile_container(web_app)
    hung = httpx.get(web_app["fragile"] + "/hang", timeout=120)
    assert hung.status_code == 504
    assert "exceeded the function's timeout of 3 s; the container was stopped" in hung.json()["error"]
    assert _fragile_container(web_app) != first
