"""Running an app from Python (``with app.run():``, ``app.deploy()``) and asking where code runs.

``warmboot run FILE`` and ``app.run()`` share :func:`ephemeral`: deploy the app's file as an ephemeral app,
point the App's functions at it, follow its log while the caller works, and stop it at the end.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from warmboot.errors import AppFileError, InvalidOptionError, WarmbootError

if TYPE_CHECKING:
    from warmboot.sdk.app import App

_output = 0  #: depth of ``enable_output()`` blocks: output is shown while it is above 0
_output_lock = threading.Lock()


def is_local() -> bool:
    """True in your own process, False inside a function's container (``modal.is_local()``)."""
    return not os.environ.get("WARMBOOT_IN_CONTAINER")


def current_function_call_id() -> str | None:
    """The id of the call this code runs for ("fc-..."), inside a container; None elsewhere."""
    from warmboot.sdk.context import current_call_id

    return current_call_id()


@contextlib.contextmanager
def enable_output(show_progress: bool = True) -> Iterator[None]:
    """Show what ``app.run()`` and ``app.deploy()`` do, as ``warmboot run`` does: deploy progress, and the
    output of the app's containers, on stderr (``modal.enable_output()``)."""
    global _output
    with _output_lock:
        _output += 1
    try:
        yield
    finally:
        with _output_lock:
            _output -= 1


def output_enabled() -> bool:
    return _output > 0


def _show(line: str) -> None:
    from warmboot.cli.manage import printable  # a local process: the CLI's dependencies are here

    print(printable(line), file=sys.stderr, flush=True)


def app_file(app: App, what: str) -> Path:
    """The file that defines ``app``: the one its functions' code comes from (or the script being run)."""
    for obj in app.registered.values():
        code = getattr(obj, "raw_f", None) or getattr(obj, "user_cls", None)
        module = sys.modules.get(getattr(code, "__module__", "") or "")
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py"):
            return Path(file).resolve()
    file = getattr(sys.modules.get("__main__"), "__file__", None)
    if file and file.endswith(".py"):
        return Path(file).resolve()
    raise AppFileError(
        f"{what}: cannot tell which .py file defines app {app.name!r} (it has no functions, and this is not a "
        "script run from a file); define the app in a file and run that file, or use `warmboot run FILE`"
    )


def deploy(
    app: App, path: Path, *, name: str, ephemeral: bool, on_log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Send ``path`` (which defines ``app``) to the server to be deployed; the server's reply (``app_id``,
    ``name``, ``version``, ``functions``). ``on_log`` gets each line of progress (image builds)."""
    from warmboot.sdk import client

    result: dict[str, Any] = {}
    for event in client.stream(
        "deploy", spec=app.spec(), source=path.read_bytes(), filename=path.name, name=name, ephemeral=ephemeral
    ):
        if "log" in event and on_log is not None:
            on_log(event["log"])
        if event.get("done"):
            result = event["value"]
    return result


def _refuse_in_container(what: str) -> None:
    if not is_local():
        raise InvalidOptionError(
            f"{what} was called inside a container: the app file is imported there too, so run the app only "
            'from your own process, under `if __name__ == "__main__":` (or with `warmboot run`)'
        )


@contextlib.contextmanager
def ephemeral(
    app: App,
    path: Path,
    *,
    on_log: Callable[[str], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Run ``app`` (defined in ``path``) as an ephemeral app for the ``with`` block, then stop it.

    Inside the block the App's functions call this running app. ``on_log``: deploy progress lines; ``on_line``:
    the app's log (its containers' output), followed from a thread until the app has stopped.
    """
    _refuse_in_container("app.run()")
    if app._app_id is not None:
        raise InvalidOptionError(f"app {app.name!r} is already running here (app.run() inside app.run()?)")
    result = deploy(app, path, name=app.name or path.stem, ephemeral=True, on_log=on_log)
    app_id = result["app_id"]
    app._app_id = app_id
    stop = threading.Event()
    follower = None
    if on_line is not None:
        follower = threading.Thread(target=_follow, args=(app_id, on_line, stop), daemon=True)
        follower.start()
    try:
        yield result
    finally:
        app._app_id = None
        from warmboot.sdk import client

        try:
            client.request("app_stop", app=app_id)
        except WarmbootError as exc:
            print(f"warning: could not stop app {app.name or path.stem}: {exc}", file=sys.stderr)
        if follower is not None:
            time.sleep(0.3)  # the containers are stopped and their output written: let the last lines through
            stop.set()


def _follow(app_id: str, on_line: Callable[[str], None], stop: threading.Event) -> None:
    from warmboot.sdk import client

    try:
        for event in client.stream("logs", app=app_id, from_end=True, follow=True):
            if "line" in event:
                on_line(event["line"])
            if stop.is_set():
                return
    except WarmbootError:
        return


@contextlib.contextmanager
def run_app(app: App) -> Iterator[App]:
    """``app.run()``: the app runs (ephemerally) for the ``with`` block; with :func:`enable_output`, its deploy
    progress and its containers' output show on stderr."""
    _refuse_in_container("app.run()")
    path = app_file(app, "app.run()")
    shown = _show if output_enabled() else None
    with ephemeral(app, path, on_log=shown, on_line=shown):
        yield app


def deploy_app(app: App, name: str | None) -> App:
    """``app.deploy()``: deploy it as ``warmboot deploy FILE`` does; its functions stay callable by name."""
    _refuse_in_container("app.deploy()")
    path = app_file(app, "app.deploy()")
    result = deploy(
        app, path, name=name or app.name or path.stem, ephemeral=False, on_log=_show if output_enabled() else None
    )
    if output_enabled():
        _show(f"Deployed app {result['name']} version {result['version']}: {', '.join(result['functions'])}")
    return app
