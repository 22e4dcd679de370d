"""The program every function container runs: ``python -m warmboot.runtime``.

Phases, each announced on the control pipe (fd 4) so that the worker can act between them:

1. import the app file and, for classes, create the instance and run its ``@enter(snap=True)`` hooks;
2. ``snapshot_point``: initialised, no input taken: the worker may checkpoint the container here, and
   every restored copy continues from this very read of fd 3;
3. on ``start``: take this container's identity and current environment, run ``@enter(snap=False)`` hooks;
4. ``ready``, then serve ``call`` messages one at a time until ``shutdown`` (``@exit`` hooks) or EOF.
"""

from __future__ import annotations

import io
import os
import sys
import time
import traceback
from typing import Any

from warmboot.runtime import wire
from warmboot.runtime.executor import Executor

CONTROL_IN_FD = 3
CONTROL_OUT_FD = 4


def _load_target(app_file: str, tag: str) -> Any:
    """Import the app file as a module and return the ``Function`` or ``Cls`` registered as ``tag``."""
    import importlib.util

    from warmboot.sdk.app import App

    directory = os.path.dirname(app_file)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    name = os.path.splitext(os.path.basename(app_file))[0]
    spec = importlib.util.spec_from_file_location(name, app_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for value in list(vars(module).values()):
        if isinstance(value, App) and tag in value.registered:
            return value.registered[tag]
    raise LookupError(f"{os.path.basename(app_file)} defines no function or class {tag!r} on any App")


class _Service:
    """The user's callable: a function, or an instance of an ``@app.cls`` class with its hooks."""

    def __init__(self, target: Any):
        from warmboot.sdk.function import Cls
        from warmboot.sdk.partial import lifecycle

        self.instance = None
        self.function = None
        self.hooks: dict[str, list[str]] = {"enter_snap": [], "enter": [], "exit": [], "methods": []}
        if isinstance(target, Cls):
            self.instance = _instantiate(target.user_cls)
            self.hooks = lifecycle(target.user_cls)
        else:
            self.function = target.raw_f

    def run_hooks(self, kind: str, executor: Executor) -> None:
        for name in self.hooks[kind]:
            executor.run_hook(getattr(self.instance, name))

    def resolve(self, method: str | None) -> Any:
        if self.instance is None:
            return self.function
        if method not in self.hooks["methods"]:
            raise AttributeError(f"no @method() named {method!r}")
        return getattr(self.instance, method)


def _instantiate(user_cls: type) -> Any:
    """The class's instance, its ``modal.parameter()`` values set from ``WARMBOOT_PARAMETERS`` (the server's
    checked values for this pool) before any hook runs: they are part of what a snapshot of it holds."""
    from warmboot.sdk import parameter

    decls = parameter.declarations(user_cls)
    if not decls:
        return user_cls()
    given = parameter.decode(decls, os.environ.get(parameter.ENV_VAR) or "{}")
    return parameter.instantiate(user_cls, parameter.bind(user_cls.__name__, decls, (), given))


def _web_host(executor: Executor, target: Any) -> Any:
    """The target's web endpoints' host (``runtime.web``), imported only by containers that serve some."""
    from warmboot.sdk.web import web_spec

    endpoints = web_spec(getattr(target, "user_cls", None) or getattr(target, "raw_f", None))
    if not endpoints:
        return None
    from warmboot.runtime.web import WebHost

    return WebHost(executor, {endpoint["method"]: endpoint for endpoint in endpoints})


def _reseed() -> None:
    """Give a restored copy its own random streams: every copy starts from the same captured RNG state."""
    import random

    random.seed(os.urandom(32))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "manual_seed"):
        torch.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def _forget_cached_gpu_counts() -> None:
    """GPUs appeared after the snapshot point: drop what torch cached about there being none."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None:
        return
    if hasattr(cuda, "_cached_device_count"):
        cuda._cached_device_count = None
    for name in ("device_count", "_device_count_nvml", "_device_count_amdsmi"):
        clear = getattr(getattr(cuda, name, None), "cache_clear", None)
        if clear is not None:
            clear()


def main() -> int:
    control_in = os.fdopen(CONTROL_IN_FD, "rb", buffering=0)
    control_out = os.fdopen(CONTROL_OUT_FD, "wb", buffering=0)
    try:
        target = _load_target(os.environ["WARMBOOT_APP_FILE"], os.environ["WARMBOOT_TAG"])
        service = _Service(target)
        executor = Executor(service.resolve, control_out, int(os.environ.get("WARMBOOT_MAX_CONCURRENT_INPUTS", "1")))
        web = _web_host(executor, target)
        if web is not None:
            web.prewarm()
        service.run_hooks("enter_snap", executor)
    except BaseException:  # noqa: BLE001 - report any failure of user code, then stop
        wire.send_message(control_out, wire.InitError("import", traceback.format_exc()))
        return 1

    sys.stdout.flush()
    sys.stderr.flush()
    wire.send_message(control_out, wire.SnapshotPoint())
    try:
        start = wire.recv_message(control_in)  # a restored copy resumes here, on its own fresh pipe
    except wire.ChannelClosed:
        return 0
    if not isinstance(start, wire.Start):
        return 1  # the worker only ever sends START here, or closes the pipe
    os.environ.update(start.env)
    os.environ["WARMBOOT_CONTAINER_ID"] = start.container_id
    if start.reseed:
        _reseed()
    if start.gpus_added:
        _forget_cached_gpu_counts()
    entering = time.monotonic()
    try:
        service.run_hooks("enter", executor)
    except BaseException:  # noqa: BLE001
        wire.send_message(control_out, wire.InitError("enter", traceback.format_exc()))
        return 1
    if web is not None:
        try:
            web.start(service.resolve)
        except BaseException as exc:  # noqa: BLE001 - the endpoint cannot serve: say why, then stop
            detail = f"{type(exc).__name__}: {exc}"
            wire.send_message(control_out, wire.InitError("web", f"{traceback.format_exc()}\n{detail}"))
            return 1
    wire.send_message(control_out, wire.Ready(enter_ms=round((time.monotonic() - entering) * 1000, 2)))

    # Past the snapshot point the pipe is read here only, without deadlines: through a buffer, one read() takes
    # several frames (a web request's body chunks, concurrent inputs).
    inputs = io.BufferedReader(control_in, 1 << 16) if web is None else None
    while inputs is not None:
        try:
            message = wire.recv_message(inputs)
        except wire.ChannelClosed:
            break
        if isinstance(message, wire.CallInput):
            executor.submit(message)
        elif isinstance(message, wire.BatchInput):
            executor.submit_batch(message)
        else:
            break  # SHUTDOWN
    if web is not None:
        from warmboot.runtime.web import serve_inputs_on_loop

        serve_inputs_on_loop(control_in, executor, web)
    executor.drain()
    if web is not None:
        try:
            web.shutdown()
        except BaseException:  # noqa: BLE001 - a failing shutdown handler must not hide the @exit hooks
            traceback.print_exc()
    try:
        service.run_hooks("exit", executor)
    except BaseException:  # noqa: BLE001 - an exit hook failing must not hide the shutdown
        traceback.print_exc()
    return 0


if __name__ == "__main__":
    sys.exit(main())
