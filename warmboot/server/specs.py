"""The shape of a deploy request's ``App.spec()``, checked field by field before the server acts on it.

The SDK makes these specs, but the server's socket takes them from any root process: each field is checked
for its type here (msgspec names the path of a bad one), and the values by the same rules the SDK applies at
decoration (``sdk.options.check``, ``validation``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from warmboot import validation
from warmboot.errors import InvalidOptionError
from warmboot.sdk import options as option_rules


@dataclass(frozen=True)
class VolumeRef:
    name: str
    create_if_missing: bool = False


@dataclass(frozen=True)
class SecretRef:
    name: str | None = None  #: a named secret, read from the server's state at each container start
    values: dict[str, Any] | None = None  #: an inline ``Secret.from_dict``


@dataclass(frozen=True)
class Lifecycle:
    enter_snap: list[str] = field(default_factory=list)
    enter: list[str] = field(default_factory=list)
    exit: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Concurrency:
    max_inputs: int
    target_inputs: int | None = None


@dataclass(frozen=True)
class Batching:
    max_batch_size: int
    wait_ms: int
    method: str | None = None  #: a class's one batched method


@dataclass(frozen=True)
class WebEndpoint:
    """A web decorator's settings (``sdk.web``): what the gateway routes to the function or method."""

    kind: Literal["fastapi_endpoint", "asgi_app", "wsgi_app", "web_server"]
    method: str | None = None  #: a class's web method
    label: str | None = None  #: None: ``<app>-<function>[-<method>]``
    requires_proxy_auth: bool = False
    http_method: str | None = None  #: fastapi_endpoint
    docs: bool = False  #: fastapi_endpoint
    port: int | None = None  #: web_server
    startup_timeout: float | None = None  #: web_server


@dataclass(frozen=True)
class FunctionSpec:
    kind: Literal["function", "cls"]
    options: dict[str, Any]
    image: dict[str, Any]
    volumes: dict[str, VolumeRef] = field(default_factory=dict)
    secrets: list[SecretRef] = field(default_factory=list)
    lifecycle: Lifecycle | None = None
    concurrency: Concurrency | None = None  #: ``@modal.concurrent``
    parameters: dict[str, dict[str, Any]] | None = None  #: ``modal.parameter()`` declarations (a class's)
    batching: Batching | None = None  #: ``@modal.batched``
    web: list[WebEndpoint] | None = None  #: web endpoint decorators
    schedule: dict[str, Any] | None = None  #: ``schedule=modal.Period(...)`` / ``modal.Cron(...)``, as plain data


@dataclass(frozen=True)
class AppSpec:
    functions: dict[str, FunctionSpec]
    name: str | None = None
    reseed_after_restore: bool = True


def check(app_name: str, spec: dict[str, Any]) -> AppSpec:
    """The typed spec, or :class:`InvalidOptionError` naming the function and option that is wrong."""
    try:
        typed = msgspec.convert(spec, AppSpec)
    except msgspec.ValidationError as exc:
        raise InvalidOptionError(f"app {app_name!r}: the deploy request's spec is malformed: {exc}") from None
    for tag, fspec in typed.functions.items():
        label = f"{app_name}.{tag}"
        if not tag.isidentifier() or len(tag) > validation.MAX_NAME:
            raise InvalidOptionError(f"app {app_name!r}: function name {tag[:40]!r} is not a Python identifier")
        option_rules.check(label, fspec.options)
        for path in fspec.volumes:
            validation.mount_point(f"{label}: volumes=", path)
        for volume in fspec.volumes.values():
            validation.name("volume", volume.name)
        for secret in fspec.secrets:
            if secret.name is not None:
                validation.name("secret", secret.name)
            else:
                validation.environment(f"{label}: Secret.from_dict()", secret.values)
        if fspec.concurrency is not None:
            from warmboot.sdk.concurrency import concurrent

            concurrent(max_inputs=fspec.concurrency.max_inputs, target_inputs=fspec.concurrency.target_inputs)
        if fspec.batching is not None:
            _check_batching(label, fspec)
        if fspec.web:
            _check_web(label, fspec)
        if fspec.parameters:
            from warmboot.sdk.parameter import check_declarations

            if fspec.kind != "cls":
                raise InvalidOptionError(f"{label}: only classes take modal.parameter()s")
            check_declarations(label, fspec.parameters)
        if fspec.schedule is not None:
            from warmboot.sdk.schedule import check_spec

            if fspec.kind == "cls" or fspec.batching is not None:
                raise InvalidOptionError(f"{label}: only an @app.function with no arguments takes a schedule")
            check_spec(f"{label}: schedule=", fspec.schedule)
        if fspec.kind == "cls" and fspec.lifecycle is None:
            raise InvalidOptionError(f"{label}: a class's spec needs its lifecycle (its @method()s)")
    return typed


def _check_batching(label: str, fspec: FunctionSpec) -> None:
    from warmboot.sdk.batching import batched

    assert fspec.batching is not None
    batched(max_batch_size=fspec.batching.max_batch_size, wait_ms=fspec.batching.wait_ms)  # the same ranges
    if fspec.concurrency is not None:
        raise InvalidOptionError(f"{label}: @modal.batched and @modal.concurrent do not combine")
    method = fspec.batching.method
    if fspec.kind == "cls":
        methods = fspec.lifecycle.methods if fspec.lifecycle is not None else []
        if method is None or methods != [method]:
            raise InvalidOptionError(f"{label}: a batched class has exactly one method, its batched one")
    elif method is not None:
        raise InvalidOptionError(f"{label}: a batched function names no method")


def _check_web(label: str, fspec: FunctionSpec) -> None:
    from warmboot.sdk import web

    assert fspec.web is not None
    methods = fspec.lifecycle.methods if fspec.lifecycle is not None else []
    for endpoint in fspec.web:
        if endpoint.label is not None:
            web.check_label(f"{label}: web endpoint", endpoint.label)
        if fspec.kind == "cls" and endpoint.method not in methods:
            raise InvalidOptionError(f"{label}: web endpoint method {endpoint.method!r} is not a method of the class")
        if fspec.kind == "function" and endpoint.method is not None:
            raise InvalidOptionError(f"{label}: a function's web endpoint names no method")
        if endpoint.kind == "web_server":
            web.web_server(endpoint.port, startup_timeout=endpoint.startup_timeout or 5.0)  # the same ranges
        if endpoint.kind == "fastapi_endpoint":
            web.fastapi_endpoint(method=endpoint.http_method or "GET")
    if fspec.kind == "function" and len(fspec.web) > 1:
        raise InvalidOptionError(f"{label}: a function is one web endpoint at most")
    if fspec.batching is not None:
        raise InvalidOptionError(f"{label}: a web endpoint cannot be @modal.batched")
