"""``App``: a named group of functions and classes that is deployed, run and stopped together."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from warmboot import validation
from warmboot.errors import InvalidOptionError
from warmboot.sdk import options as option_rules
from warmboot.sdk.batching import batching_spec
from warmboot.sdk.concurrency import concurrency_of
from warmboot.sdk.function import Cls, Function
from warmboot.sdk.image import Image
from warmboot.sdk.partial import lifecycle
from warmboot.sdk.secret import Secret
from warmboot.sdk.volume import Volume
from warmboot.sdk.web import default_label, web_spec


class App:
    """A group of functions and classes that deploy together.

    Example::

        import warmboot as modal

        app = modal.App("example")

        @app.function(enable_memory_snapshot=True)
        def square(x: int) -> int:
            return x * x
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        image: Image | None = None,
        secrets: list[Secret] | None = None,
        volumes: dict[str, Volume] | None = None,
        reseed_after_restore: bool = True,
    ):
        self.name = validation.name("app", name) if name is not None else None
        # Reseed `random` (and numpy/torch) in containers restored from a memory snapshot, so copies differ.
        self.reseed_after_restore = bool(reseed_after_restore)
        self.image = image
        self.secrets = list(secrets or [])
        self.volumes = dict(volumes or {})
        self.registered: dict[str, Function | Cls] = {}
        self.local_entrypoints: dict[str, Callable[..., Any]] = {}
        self._app_id: str | None = None  # set while `warmboot run` has it running as an ephemeral app

    def __repr__(self) -> str:
        return f"App({self.name!r})"

    def _register(self, tag: str, obj: Function | Cls) -> None:
        if tag in self.registered:
            raise InvalidOptionError(f"app {self.name!r} already has a function or class named {tag!r}")
        self.registered[tag] = obj

    def function(self, _f: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Decorator: run this function in containers. Options: see ``warmboot.sdk.options.DEFAULTS``."""
        opts = option_rules.check("@app.function", options)

        def wrap(f: Callable[..., Any]) -> Function:
            if isinstance(f, type):
                raise InvalidOptionError(f"@app.function got class {f.__name__}; use @app.cls for classes")
            batching_spec(f, concurrency=concurrency_of(f))  # refuse a bad combination at decoration
            if opts["schedule"] is not None:
                _check_schedulable(f, opts["schedule"])
            fn = Function(self, f.__name__, f, opts)
            self._register(f.__name__, fn)
            return fn

        return wrap(_f) if _f is not None else wrap

    def cls(self, _c: type | None = None, **options: Any) -> Any:
        """Decorator: run instances of this class in containers, with ``@enter``/``@method``/``@exit`` hooks."""
        opts = option_rules.check("@app.cls", options)
        if opts["schedule"] is not None:
            raise InvalidOptionError(
                "@app.cls does not take schedule=: a schedule runs a function with no arguments; put it on an "
                "@app.function that calls the class's method (Cls().METHOD.remote())"
            )

        def wrap(user_cls: type) -> Cls:
            if not isinstance(user_cls, type):
                raise InvalidOptionError("@app.cls decorates classes; use @app.function for functions")
            batching_spec(user_cls, concurrency=concurrency_of(user_cls))
            c = Cls(self, user_cls.__name__, user_cls, opts)
            self._register(user_cls.__name__, c)
            return c

        return wrap(_c) if _c is not None else wrap

    def local_entrypoint(self, _f: Callable[..., Any] | None = None) -> Any:
        """Decorator: the function ``warmboot run FILE`` calls on your machine, with the app running."""

        def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
            self.local_entrypoints[f.__name__] = f
            return f

        return wrap(_f) if _f is not None else wrap

    def run(self) -> AbstractContextManager[App]:
        """Run the app for a ``with`` block, as ``warmboot run`` does (an ephemeral app, stopped at the end).

        Example::

            if __name__ == "__main__":
                with modal.enable_output(), app.run():
                    print(square.remote(4))
        """
        from warmboot.sdk.running import run_app

        return run_app(self)

    def deploy(self, *, name: str | None = None) -> App:
        """Deploy the app (as ``warmboot deploy FILE`` does): its functions stay callable by name."""
        from warmboot.sdk.running import deploy_app

        return deploy_app(self, name)

    def spec(self) -> dict[str, Any]:
        """What the server needs to deploy this app: each function's options, as plain data."""
        functions = {}
        for tag, obj in self.registered.items():
            opts = dict(obj.options)
            image = opts.pop("image") or self.image or Image.debian_slim()
            volumes = {**self.volumes, **opts.pop("volumes")}
            secrets = [*self.secrets, *opts.pop("secrets")]
            schedule = opts.pop("schedule", None)
            target = obj.user_cls if isinstance(obj, Cls) else obj.raw_f
            for path, vol in volumes.items():
                if not isinstance(vol, Volume):
                    raise InvalidOptionError(f"{tag}: volumes[{path!r}] must be a Volume, got {vol!r}")
            functions[tag] = {
                "kind": "cls" if isinstance(obj, Cls) else "function",
                "options": opts,
                "image": image.to_spec(),
                "volumes": {
                    path: {"name": v.name, "create_if_missing": v.create_if_missing} for path, v in volumes.items()
                },
                "secrets": [s.to_spec() for s in secrets],
                "lifecycle": lifecycle(obj.user_cls) if isinstance(obj, Cls) else None,
                "parameters": obj._parameters if isinstance(obj, Cls) else None,  # modal.parameter()s
                "schedule": schedule.to_spec() if schedule is not None else None,
                "concurrency": concurrency_of(target),
                "batching": batching_spec(target, concurrency=concurrency_of(target)),
                "web": web_spec(target),
            }
        _check_web_labels(self.name, functions)
        return {"name": self.name, "functions": functions, "reseed_after_restore": self.reseed_after_restore}


def _check_web_labels(app_name: str | None, functions: dict[str, dict[str, Any]]) -> None:
    """Two endpoints of one app cannot share a label: it is their URL."""
    seen: dict[str, str] = {}
    for tag, fspec in functions.items():
        for endpoint in fspec["web"] or []:
            where = f"{tag}.{endpoint['method']}" if endpoint["method"] else tag
            label = endpoint["label"] or default_label(app_name, tag, endpoint["method"])
            if label in seen:
                raise InvalidOptionError(
                    f"web endpoints {seen[label]} and {where} both have the label {label!r}; "
                    "give one of them another label= (the label is the endpoint's URL)"
                )
            seen[label] = where


def _check_schedulable(f: Callable[..., Any], schedule: Any) -> None:
    """A scheduled function is called with no arguments: refuse one that requires any, at decoration (as Modal)."""
    import inspect

    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):  # a builtin or C function without a signature: let the call say it
        return
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise InvalidOptionError(
            f"@app.function: {getattr(f, '__name__', f)} has schedule={schedule!r}, so it is called with no "
            f"arguments, but it requires {', '.join(required)}: give them default values or drop the schedule"
        )
