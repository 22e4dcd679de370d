"""Web endpoints: ``@modal.fastapi_endpoint``, ``@modal.asgi_app``, ``@modal.wsgi_app`` and ``@modal.web_server``.

Each decorator marks a function (under ``@app.function()``) or a method of an ``@app.cls`` class. The server's
HTTP gateway gives every endpoint a URL (``warmboot deploy`` prints them, ``Function.get_web_url()`` returns
them) and turns each request into an input of the function's pool: a request that finds no container waits
while one starts, restored from its memory snapshot where there is one.

- ``fastapi_endpoint``: the function handles one route (``/``) with FastAPI's request parsing; the image needs
  ``fastapi`` (``.pip_install("fastapi[standard]")``), as on Modal.
- ``asgi_app`` / ``wsgi_app``: the function returns an ASGI (FastAPI, Starlette, ...) or WSGI (Flask, Django, ...)
  application; it is called once per container, when the container starts.
- ``web_server(port)``: the function starts a server process listening on ``port`` inside the container; the
  gateway forwards HTTP to it once the port accepts connections (within ``startup_timeout`` seconds).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from warmboot.errors import InvalidOptionError

F = TypeVar("F", bound=Callable[..., Any])

WEB_ATTR = "_warmboot_web"
KINDS = ("fastapi_endpoint", "asgi_app", "wsgi_app", "web_server")
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
#: A label is one DNS name component: it names the endpoint in its URL.
LABEL = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
MAX_STARTUP_TIMEOUT = 3600.0


def _check_common(decorator: str, label: str | None, custom_domains: Any, requires_proxy_auth: Any) -> None:
    if label is not None:
        check_label(f"@modal.{decorator}", label)
    if custom_domains:
        raise InvalidOptionError(
            f"@modal.{decorator}: custom_domains= is not supported by warmboot (its gateway serves its own "
            "address); remove it and put your own reverse proxy in front of the gateway if you need a domain"
        )
    if not isinstance(requires_proxy_auth, bool):
        raise InvalidOptionError(
            f"@modal.{decorator}: requires_proxy_auth= must be True or False, got {requires_proxy_auth!r}"
        )


def check_label(where: str, label: Any) -> str:
    """``label`` if it can name an endpoint (lowercase letters, digits and dashes, at most 63), else a clear error."""
    if not isinstance(label, str) or not re.match(LABEL, label):
        raise InvalidOptionError(
            f"{where}: label={label!r} must be 1 to 63 lowercase letters, digits or dashes, "
            "starting and ending with a letter or digit (it becomes part of the endpoint's URL)"
        )
    return label


def _mark(decorator: str, info: dict[str, Any]) -> Callable[[F], F]:
    def mark(f: F) -> F:
        if hasattr(f, "raw_f") or hasattr(f, "user_cls"):
            raise InvalidOptionError(f"@modal.{decorator} goes below @app.function(), so that it applies first")
        if not callable(f) or isinstance(f, type):
            raise InvalidOptionError(f"@modal.{decorator} decorates a function or a method, got {f!r}")
        if hasattr(f, WEB_ATTR):
            raise InvalidOptionError(f"{f.__name__}: a function can be one web endpoint only")
        setattr(f, WEB_ATTR, {"kind": decorator, **info})
        return f

    return mark


def fastapi_endpoint(
    _warn_parentheses_missing: Any = None,
    *,
    method: str = "GET",
    label: str | None = None,
    custom_domains: Any = None,
    docs: bool = False,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Serve this function at its own URL as one FastAPI route: query parameters (GET) or the JSON body (POST)
    become its arguments, its return value the JSON response.

    Example::

        @app.function(image=modal.Image.debian_slim().pip_install("fastapi[standard]"))
        @modal.fastapi_endpoint(method="POST", docs=True)
        def square(item: dict) -> dict:
            return {"square": item["x"] ** 2}
    """
    if _warn_parentheses_missing is not None:
        raise InvalidOptionError("@modal.fastapi_endpoint takes parentheses: use @modal.fastapi_endpoint()")
    if not isinstance(method, str) or method.upper() not in HTTP_METHODS:
        raise InvalidOptionError(f"@modal.fastapi_endpoint: method={method!r} is not one of {', '.join(HTTP_METHODS)}")
    if not isinstance(docs, bool):
        raise InvalidOptionError(f"@modal.fastapi_endpoint: docs= must be True or False, got {docs!r}")
    _check_common("fastapi_endpoint", label, custom_domains, requires_proxy_auth)
    return _mark(
        "fastapi_endpoint",
        {"http_method": method.upper(), "label": label, "docs": docs, "requires_proxy_auth": requires_proxy_auth},
    )


#: Modal's earlier name for :func:`fastapi_endpoint`.
web_endpoint = fastapi_endpoint


def asgi_app(
    _warn_parentheses_missing: Any = None,
    *,
    label: str | None = None,
    custom_domains: Any = None,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Serve the ASGI application this function returns (FastAPI, Starlette, ...): every path under its URL,
    streaming bodies both ways, server-sent events and websockets.

    Example::

        @app.function(image=modal.Image.debian_slim().pip_install("fastapi[standard]"))
        @modal.concurrent(max_inputs=100)
        @modal.asgi_app()
        def api():
            from fastapi import FastAPI

            web = FastAPI()

            @web.get("/hello")
            def hello():
                return {"hello": "world"}

            return web
    """
    if _warn_parentheses_missing is not None:
        raise InvalidOptionError("@modal.asgi_app takes parentheses: use @modal.asgi_app()")
    _check_common("asgi_app", label, custom_domains, requires_proxy_auth)
    return _mark("asgi_app", {"label": label, "requires_proxy_auth": requires_proxy_auth})


def wsgi_app(
    _warn_parentheses_missing: Any = None,
    *,
    label: str | None = None,
    custom_domains: Any = None,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Serve the WSGI application this function returns (Flask, Django, ...) at its URL.

    Example::

        @app.function(image=modal.Image.debian_slim().pip_install("flask"))
        @modal.wsgi_app()
        def flask_app():
            from flask import Flask

            web = Flask(__name__)

            @web.get("/")
            def home():
                return "hello"

            return web
    """
    if _warn_parentheses_missing is not None:
        raise InvalidOptionError("@modal.wsgi_app takes parentheses: use @modal.wsgi_app()")
    _check_common("wsgi_app", label, custom_domains, requires_proxy_auth)
    return _mark("wsgi_app", {"label": label, "requires_proxy_auth": requires_proxy_auth})


def web_server(
    port: int,
    *,
    startup_timeout: float = 5.0,
    label: str | None = None,
    custom_domains: Any = None,
    requires_proxy_auth: bool = False,
) -> Callable[[F], F]:
    """Forward HTTP to a server this function starts (in the background) on ``port`` inside the container.

    The container counts as started once something accepts connections on the port, within
    ``startup_timeout`` seconds; otherwise its start fails with an error that names the port.

    Example::

        @app.function()
        @modal.web_server(8000)
        def files():
            import subprocess

            subprocess.Popen("python -m http.server -b 0.0.0.0 8000", shell=True)
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidOptionError(f"@modal.web_server: port must be a TCP port number (1-65535), got {port!r}")
    if (
        isinstance(startup_timeout, bool)
        or not isinstance(startup_timeout, int | float)
        or not 0 < startup_timeout <= MAX_STARTUP_TIMEOUT
    ):
        raise InvalidOptionError(
            f"@modal.web_server: startup_timeout= is seconds, above 0 and at most {MAX_STARTUP_TIMEOUT:g}, "
            f"got {startup_timeout!r}"
        )
    _check_common("web_server", label, custom_domains, requires_proxy_auth)
    return _mark(
        "web_server",
        {
            "port": port,
            "startup_timeout": float(startup_timeout),
            "label": label,
            "requires_proxy_auth": requires_proxy_auth,
        },
    )


def web_of(target: Any) -> dict[str, Any] | None:
    """What a web decorator set on a function or method, if anything."""
    return getattr(target, WEB_ATTR, None)


def web_spec(target: Any) -> list[dict[str, Any]] | None:
    """The web endpoints of an ``@app.function`` function or an ``@app.cls`` class, as plain data for the spec.

    A class has one endpoint per web method; ``web_server`` starts a process per container, so a class has at
    most one ``web_server`` method.
    """
    if isinstance(target, type):
        found = [{**info, "method": name} for name, member in vars(target).items() if (info := web_of(member))]
        if sum(1 for e in found if e["kind"] == "web_server") > 1:
            raise InvalidOptionError(f"{target.__name__}: a class can have one @modal.web_server method at most")
    else:
        info = web_of(target)
        found = [{**info, "method": None}] if info else []
    return found or None


def default_label(app_name: str | None, tag: str, method: str | None) -> str:
    """The label an endpoint gets when its decorator names none: ``<app>-<function>[-<method>]``, made a DNS name."""
    parts = [p for p in (app_name, tag, method) if p]
    label = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if len(label) > 63:
        import hashlib

        digest = hashlib.sha256(label.encode()).hexdigest()[:8]
        label = label[:54].rstrip("-") + "-" + digest
    return label or "endpoint"
