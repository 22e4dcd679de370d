"""Web endpoints, in Modal's style: a FastAPI route, a whole ASGI app (with server-sent events and a websocket),
a Flask app, a server of your own on a port, and a class whose endpoint restores from a memory snapshot.

    warmboot deploy examples/web_endpoints.py     # prints each endpoint's URL
    curl "$(warmboot endpoint list | grep hello)"  # or: curl http://127.0.0.1:8700/example-web-hello?name=you
    warmboot serve examples/web_endpoints.py      # serves the -dev URLs, reloading on every edit
    warmboot run examples/web_endpoints.py        # runs main() below against the -dev URLs
"""

import json
import os
import urllib.request

import warmboot as modal

image = modal.Image.debian_slim().pip_install("fastapi[standard]", "flask")
app = modal.App("example-web", image=image)


@app.function()
@modal.fastapi_endpoint(docs=True)
def hello(name: str = "world"):
    return {"hello": name}


@app.function()
@modal.fastapi_endpoint(method="POST")
def square(item: dict):
    return {"square": item["x"] ** 2}


@app.function()
@modal.concurrent(max_inputs=20)
@modal.asgi_app()
def api():
    import asyncio

    from fastapi import FastAPI, WebSocket
    from fastapi.responses import StreamingResponse

    web = FastAPI()

    @web.get("/countdown")
    async def countdown(n: int = 3):
        async def events():
            for i in range(n, 0, -1):
                yield f"data: {i}\n\n"
                await asyncio.sleep(0.1)

        return StreamingResponse(events(), media_type="text/event-stream")

    @web.websocket("/shout")
    async def shout(websocket: WebSocket):
        await websocket.accept()
        async for text in websocket.iter_text():
            await websocket.send_text(text.upper())

    return web


@app.function()
@modal.wsgi_app()
def flask_app():
    from flask import Flask, request

    web = Flask(__name__)

    @web.route("/", methods=["GET", "POST"])
    def index():
        return {"method": request.method, "script_root": request.script_root}

    return web


@app.function(image=modal.Image.debian_slim())
@modal.web_server(8000, startup_timeout=10)
def file_server():
    import subprocess

    os.makedirs("/srv", exist_ok=True)
    with open("/srv/index.html", "w") as f:
        f.write("<h1>served by python -m http.server</h1>\n")
    subprocess.Popen(["python3", "-m", "http.server", "8000", "--directory", "/srv"])


@app.cls(enable_memory_snapshot=True)
class Greeter:
    @modal.enter(snap=True)
    def load(self):
        # Expensive set-up goes here: it runs once, before the snapshot; restored containers start with it done.
        self.templates = {"en": "Hello, {}!", "fr": "Bonjour, {} !"}

    @modal.fastapi_endpoint()
    def greet(self, who: str = "world", lang: str = "en"):
        return {"greeting": self.templates[lang].format(who)}


@app.function()
@modal.fastapi_endpoint(requires_proxy_auth=True)
def private():
    return {"secret": "only with a token from `warmboot token create`"}


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read().decode()


@app.local_entrypoint()
def main():
    print(_get(hello.get_web_url() + "?name=warmboot"))
    request = urllib.request.Request(
        square.get_web_url(), data=json.dumps({"x": 12}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        print(response.read().decode())
    print(_get(api.get_web_url() + "/countdown?n=3").strip().replace("\n\n", " | "))
    print(_get(flask_app.get_web_url() + "/"))
    print(_get(file_server.get_web_url() + "/").strip())
    print(_get(Greeter().greet.get_web_url() + "?who=Ada&lang=fr"))
