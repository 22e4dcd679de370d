"""Handles to functions and classes: ``.remote()``, ``.spawn()``, ``.map()``, ``.local()`` and lookup by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from warmboot.errors import InvalidOptionError, NotFoundError
from warmboot.sdk.partial import lifecycle

if TYPE_CHECKING:
    from warmboot.sdk.app import App


class FunctionCall:
    """A call started with ``.spawn()``; ``.get()`` waits for its result."""

    def __init__(self, call_id: str):
        self.object_id = call_id

    def __repr__(self) -> str:
        return f"FunctionCall({self.object_id!r})"

    @classmethod
    def from_id(cls, function_call_id: str) -> FunctionCall:
        """The call with this id (``.object_id`` of a spawned call), e.g. from another process or after a
        server restart: its ``.get()`` returns the result, or says why there is none."""
        if not isinstance(function_call_id, str) or not function_call_id.startswith("fc-"):
            raise InvalidOptionError(
                f"FunctionCall.from_id: {function_call_id!r} is not a call id (they look like 'fc-0123abcd...', "
                "the .object_id of a spawned call)"
            )
        return cls(function_call_id)

    def get(self, timeout: float | None = None) -> Any:
        """The call's result (or its exception, re-raised); ``TimeoutError`` if not done within ``timeout``."""
        from warmboot.sdk import client

        return client.get_result(self.object_id, timeout)


class _Invocable:
    """What functions and class methods share: the calls that route to a deployed or running app."""

    _app: App | None
    _app_name: str | None
    tag: str
    _method: str | None = None

    def _target(self) -> dict[str, Any]:
        if self._app is not None and self._app._app_id is not None:
            where: dict[str, Any] = {"app_id": self._app._app_id}
        else:
            name = self._app.name if self._app is not None else self._app_name
            if not name:
                raise NotFoundError(
                    f"{self.tag}: its App has no name, so no deployed app can be found; "
                    "give the App a name and `warmboot deploy` it, or use `warmboot run`"
                )
            where = {"app_name": name}
        return {**where, "tag": self.tag, "method": self._method}

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Run in a container and return the result (an exception in the container re-raises here)."""
        from warmboot.sdk import client

        return client.call(self._target(), args, kwargs)

    def spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        """Start a call in a container without waiting; returns a handle with ``.get(timeout=)``."""
        from warmboot.sdk import client

        return FunctionCall(client.submit(self._target(), args, kwargs))

    def map(self, *iterables: Iterable[Any]) -> Iterator[Any]:
        """Call once per item (zipped across iterables), in parallel; yields results in input order."""
        from warmboot.sdk import client

        target = self._target()
        call_ids = [client.submit(target, args, {}) for args in zip(*iterables, strict=False)]
        for call_id in call_ids:
            yield client.get_result(call_id, None)


class Function(_Invocable):
    """A function decorated with ``@app.function``."""

    def __init__(
        self,
        app: App | None,
        tag: str,
        raw: Callable[..., Any] | None,
        options: dict[str, Any],
        *,
        app_name: str | None = None,
    ):
        self._app = app
        self._app_name = app_name
        self.tag = tag
        self.raw_f = raw
        self.options = options
        if raw is not None:
            self.__doc__ = raw.__doc__
            self.__wrapped__ = raw

    def __repr__(self) -> str:
        return f"Function({self.tag!r})"

    @classmethod
    def from_name(cls, app_name: str, name: str) -> Function:
        """The function ``name`` of the deployed app ``app_name``."""
        return cls(None, name, None, {}, app_name=app_name)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function here, in this process."""
        if self.raw_f is None:
            raise NotFoundError(f"{self.tag} was looked up by name: its code is not here, use .remote()")
        return self.raw_f(*args, **kwargs)


class Cls:
    """A class decorated with ``@app.cls``; calling it gives an instance whose ``@method``s run remotely."""

    def __init__(
        self,
        app: App | None,
        tag: str,
        user_cls: type | None,
        options: dict[str, Any],
        *,
        app_name: str | None = None,
    ):
        self._app = app
        self._app_name = app_name
        self.tag = tag
        self.user_cls = user_cls
        self.options = options

    def __repr__(self) -> str:
        return f"Cls({self.tag!r})"

    @classmethod
    def from_name(cls, app_name: str, name: str) -> Cls:
        """The class ``name`` of the deployed app ``app_name``."""
        return cls(None, name, None, {}, app_name=app_name)

    def __call__(self, *args: Any, **kwargs: Any) -> Obj:
        if args or kwargs:
            raise InvalidOptionError(
                f"{self.tag}(): parametrized classes are not supported yet; call it with no arguments"
            )
        return Obj(self)


class Obj:
    """An instance of an ``@app.cls`` class, as seen by the caller."""

    def __init__(self, cls: Cls):
        self._cls = cls
        self._local: Any = None

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_"):
            raise AttributeError(name)
        user_cls = self._cls.user_cls
        if user_cls is not None and name not in lifecycle(user_cls)["methods"]:
            raise AttributeError(f"{self._cls.tag} has no @method() named {name!r}")
        return Method(self, name)

    def _local_instance(self) -> Any:
        """A local instance with its enter hooks run, for ``.local()`` calls."""
        if self._local is None:
            user_cls = self._cls.user_cls
            if user_cls is None:
                raise NotFoundError(f"{self._cls.tag} was looked up by name: its code is not here, use .remote()")
            instance = user_cls()
            hooks = lifecycle(user_cls)
            for hook in hooks["enter_snap"] + hooks["enter"]:
                getattr(instance, hook)()
            self._local = instance
        return self._local


class Method(_Invocable):
    """A ``@method`` of an ``@app.cls`` instance."""

    def __init__(self, obj: Obj, name: str):
        self._obj = obj
        self._app = obj._cls._app
        self._app_name = obj._cls._app_name
        self.tag = obj._cls.tag
        self._method = name

    def local(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._obj._local_instance(), self._method or "")(*args, **kwargs)
