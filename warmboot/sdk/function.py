"""Handles to functions and classes: ``.remote()``, ``.spawn()``, ``.map()``, ``.local()`` and lookup by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from warmboot.errors import InvalidOptionError, NotFoundError
from warmboot.sdk import mapping
from warmboot.sdk.aio import aio_method
from warmboot.sdk.partial import lifecycle

if TYPE_CHECKING:
    from warmboot.sdk.app import App


class FunctionCall:
    """A call started with ``.spawn()`` (or the inputs of a ``.spawn_map()``): ``.get()`` waits for its result.

    ``.object_id`` names it for :meth:`from_id`, in another process or after a server restart.
    """

    def __init__(self, call_ids: str | list[str]):
        self._call_ids = [call_ids] if isinstance(call_ids, str) else list(call_ids)
        #: The call's id ("fc-..."); a ``.spawn_map()`` handle's ids joined with commas.
        self.object_id = ",".join(self._call_ids)

    def __repr__(self) -> str:
        return f"FunctionCall({self.object_id!r})"

    @classmethod
    def from_id(cls, function_call_id: str) -> FunctionCall:
        """The call with this id (``.object_id`` of a spawned call), e.g. from another process or after a
        server restart: its ``.get()`` returns the result, or says why there is none."""
        ids = function_call_id.split(",") if isinstance(function_call_id, str) else [function_call_id]
        if not all(isinstance(i, str) and i.startswith("fc-") for i in ids):
            raise InvalidOptionError(
                f"FunctionCall.from_id: {function_call_id!r} is not a call id (they look like 'fc-0123abcd...', "
                "the .object_id of a spawned call)"
            )
        return cls(ids)

    def num_inputs(self) -> int:
        """How many inputs this handle covers: 1 for ``.spawn()``, the number of inputs for ``.spawn_map()``."""
        return len(self._call_ids)

    @aio_method
    def get(self, timeout: float | None = None, *, index: int = 0) -> Any:
        """The result of input ``index`` (0 for a ``.spawn()``), or its exception re-raised.

        Waits up to ``timeout`` seconds (``None``: as long as it takes; 0: only look), then raises
        :class:`~warmboot.errors.OutputTimeoutError` (a ``TimeoutError``; the call goes on running).
        """
        from warmboot.sdk import client

        return client.get_result(self._input(index), timeout)

    @aio_method(iterates=True)
    def iter(self, *, start: int = 0, end: int | None = None) -> Iterator[Any]:
        """The results of inputs ``start`` to ``end`` (exclusive; default: all), in input order."""
        from warmboot.sdk import client

        stop = len(self._call_ids) if end is None else end
        ids = [self._input(i) for i in range(start, stop)]
        for call_id in ids:
            yield client.get_result(call_id, None)

    @aio_method
    def cancel(self, terminate_containers: bool = False) -> None:
        """Cancel the call (every input of a ``.spawn_map()``): ``.get()`` then raises
        :class:`~warmboot.exception.InputCancellation`.

        An input still queued ends at once. A running one ends too, and the container running it is stopped
        (killed: a container cannot drop one input halfway), whatever ``terminate_containers`` says; other inputs
        that container ran at the same time are retried, or fail, as after a crash. A finished call is left as
        it is.
        """
        from warmboot import protocol
        from warmboot.sdk import client

        for call_id in self._call_ids:
            client.request(protocol.Cancel(call_id=call_id, terminate_containers=bool(terminate_containers)))

    @aio_method(static=True)
    def gather(*function_calls: FunctionCall) -> list[Any]:
        """Wait for every call; their results in the order given. The first call (in that order) that failed
        raises its error, once all have finished."""
        return gather(*function_calls)

    def _input(self, index: int) -> str:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._call_ids):
            raise InvalidOptionError(
                f"FunctionCall.get(index={index!r}): this call has {len(self._call_ids)} input(s), so index is "
                f"0{'' if len(self._call_ids) == 1 else f' to {len(self._call_ids) - 1}'}"
            )
        return self._call_ids[index]


def gather(*function_calls: FunctionCall) -> list[Any]:
    """``FunctionCall.gather``: every call's result, in order; raises the first failed call's error (in the
    order given) once all have finished, as Modal does."""
    for fc in function_calls:
        if not isinstance(fc, FunctionCall):
            raise InvalidOptionError(f"FunctionCall.gather() takes FunctionCalls (from .spawn()), got {fc!r}")
    results: list[Any] = []
    first_error: BaseException | None = None
    for fc in function_calls:
        try:
            results.append(fc.get())
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the others finished
            results.append(None)
            first_error = first_error or exc
    if first_error is not None:
        raise first_error
    return results


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
        return {**where, "tag": self.tag, "method": self._method, **self._variant()}

    def _variant(self) -> dict[str, Any]:
        """Parameter values and ``with_options`` overrides, when the call goes to a variant's own pool."""
        return {}

    def get_web_url(self) -> str | None:
        """The URL of this web endpoint (``@modal.fastapi_endpoint``, ``asgi_app``, ``wsgi_app``,
        ``web_server``) on the server's HTTP gateway; ``None`` if it is not a web endpoint."""
        from warmboot.sdk import client

        return client.request("web_url", target=self._target())

    @aio_method
    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Run in a container and return the result (an exception in the container re-raises here)."""
        from warmboot.sdk import client

        return client.call(self._target(), args, kwargs)

    @aio_method(iterates=True)
    def remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Run a generator function in a container: each value it yields, as it yields it (then its error, if
        it raised)."""
        from warmboot.sdk import client

        yield from client.call_gen(self._target(), args, kwargs)

    @aio_method
    def spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        """Start a call in a container without waiting; returns a handle with ``.get(timeout=)``."""
        from warmboot.sdk import client

        return FunctionCall(client.submit(self._target(), args, kwargs))

    @aio_method(iterates=True)
    def map(
        self,
        *input_iterators: Iterable[Any],
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
        wrap_returned_exceptions: bool = True,
    ) -> Iterator[Any]:
        """Call once per input (the iterators zipped, like ``map``), in parallel; yields each result.

        ``kwargs``: passed to every call. ``order_outputs=False``: results as they finish, not in input order.
        ``return_exceptions=True``: a failed input yields its exception instead of raising it (the exception
        itself: ``wrap_returned_exceptions`` is accepted and ignored, as in Modal 1.x).
        """
        return mapping.run(self, zip(*input_iterators, strict=False), kwargs, order_outputs, return_exceptions)

    @aio_method(iterates=True)
    def starmap(
        self,
        input_iterator: Iterable[Iterable[Any]],
        *,
        kwargs: dict[str, Any] | None = None,
        order_outputs: bool = True,
        return_exceptions: bool = False,
        wrap_returned_exceptions: bool = True,
    ) -> Iterator[Any]:
        """Like :meth:`map`, with each input a tuple of arguments: ``f.starmap([(1, 2), (3, 4)])``."""
        return mapping.run(self, (tuple(a) for a in input_iterator), kwargs, order_outputs, return_exceptions)

    @aio_method
    def for_each(
        self, *input_iterators: Iterable[Any], kwargs: dict[str, Any] | None = None, ignore_exceptions: bool = False
    ) -> None:
        """Like :meth:`map`, for the side effects: waits for every input; raises the first failure unless
        ``ignore_exceptions``."""
        for _ in mapping.run(self, zip(*input_iterators, strict=False), kwargs, False, ignore_exceptions):
            pass

    @aio_method
    def spawn_map(self, *input_iterators: Iterable[Any], kwargs: dict[str, Any] | None = None) -> FunctionCall:
        """Start one call per input without waiting; returns one handle for all of them:
        ``.get(index=i)``, ``.iter()``, ``.num_inputs()``, ``.cancel()``."""
        return FunctionCall(mapping.submit_all(self, zip(*input_iterators, strict=False), kwargs))


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

    _overrides: dict[str, Any] | None = None  #: ``with_options`` overrides, as sent to the server

    def with_options(self, **options: Any) -> Function:
        """A handle to this function whose calls run with these options instead of the deployed ones (its own
        pool; its own memory snapshot when they change what the container holds). Takes what
        ``Cls.with_options`` takes."""
        from warmboot.sdk.parameter import function_with_options

        return function_with_options(self, options)

    def _variant(self) -> dict[str, Any]:
        return {"options": self._overrides} if self._overrides else {}

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function here, in this process."""
        if self.raw_f is None:
            raise NotFoundError(f"{self.tag} was looked up by name: its code is not here, use .remote()")
        return self.raw_f(*args, **kwargs)


class Cls:
    """A class decorated with ``@app.cls``; calling it gives an instance whose ``@method``s run remotely.

    ``Cls(**parameters)`` picks the instance's ``modal.parameter()`` values (each distinct set runs in its own
    pool); ``Cls.with_options(...)`` gives a handle whose instances run with other resources or scaling.
    """

    def __init__(
        self,
        app: App | None,
        tag: str,
        user_cls: type | None,
        options: dict[str, Any],
        *,
        app_name: str | None = None,
    ):
        from warmboot.sdk.parameter import declarations

        self._app = app
        self._app_name = app_name
        self.tag = tag
        self.user_cls = user_cls
        self.options = options
        #: ``modal.parameter()`` declarations (checked here, at decoration); None when looked up by name.
        self._parameters = declarations(user_cls) if user_cls is not None else None
        self._overrides: dict[str, Any] = {}  #: ``with_options`` overrides, as sent to the server

    def __repr__(self) -> str:
        return f"Cls({self.tag!r})"

    @classmethod
    def from_name(cls, app_name: str, name: str) -> Cls:
        """The class ``name`` of the deployed app ``app_name``."""
        return cls(None, name, None, {}, app_name=app_name)

    def __call__(self, *args: Any, **kwargs: Any) -> Obj:
        """An instance with these ``modal.parameter()`` values (keyword arguments only).

        A class looked up by name has no declarations here: the server checks its parameters at the first call.
        """
        from warmboot.sdk import parameter

        if self._parameters is not None:
            return Obj(self, parameter.bind(self.tag, self._parameters, args, kwargs))
        if args:
            raise InvalidOptionError(
                f"{self.tag}() takes its parameters by keyword only, got {len(args)} positional argument(s)"
            )
        for name, value in kwargs.items():
            if type(value) not in parameter.TYPES.values():
                raise InvalidOptionError(
                    f"{self.tag}(): parameter {name!r} must be a str, int, bool or bytes, got {type(value).__name__}"
                )
        return Obj(self, dict(kwargs))

    def with_options(
        self,
        *,
        cpu: float | None = None,
        memory: int | None = None,
        gpu: str | None = None,
        env: dict[str, str] | None = None,
        secrets: list[Any] | None = None,
        volumes: dict[str, Any] | None = None,
        retries: int | None = None,
        max_containers: int | None = None,
        scaledown_window: float | None = None,
        timeout: float | None = None,
        **unsupported: Any,
    ) -> Cls:
        """A handle to this class whose instances run with these options instead of the deployed ones.

        Its instances get a pool of their own (and a memory snapshot of their own when the options change what
        the container holds: gpu, cpu, memory, env, secrets, volumes). ``None`` keeps the deployed value;
        ``secrets`` are added to the class's, ``env`` and ``volumes`` merged into its. Calls stack:
        ``Cls.with_options(gpu="h100").with_options(timeout=60)``.
        """
        from warmboot.sdk.parameter import option_overrides

        given = dict(
            cpu=cpu, memory=memory, gpu=gpu, env=env, secrets=secrets, volumes=volumes, retries=retries,
            max_containers=max_containers, scaledown_window=scaledown_window, timeout=timeout, **unsupported,
        )  # fmt: skip
        handle = Cls(None, self.tag, None, self.options, app_name=self._app_name)
        handle._app, handle.user_cls, handle._parameters = self._app, self.user_cls, self._parameters
        handle._overrides = option_overrides(self.tag, self._overrides, given)
        return handle


class Obj:
    """An instance of an ``@app.cls`` class, as seen by the caller (its parameter values, if any)."""

    def __init__(self, cls: Cls, parameters: dict[str, Any] | None = None):
        self._cls = cls
        self._parameters = parameters or {}
        self._local: Any = None

    def __getattr__(self, name: str) -> Method:
        if name.startswith("_"):
            raise AttributeError(name)
        user_cls = self._cls.user_cls
        if user_cls is not None and name not in lifecycle(user_cls)["methods"]:
            raise AttributeError(f"{self._cls.tag} has no @method() named {name!r}")
        return Method(self, name)

    def _local_instance(self) -> Any:
        """A local instance with its parameters set and its enter hooks run, for ``.local()`` calls."""
        if self._local is None:
            from warmboot.sdk.parameter import instantiate

            user_cls = self._cls.user_cls
            if user_cls is None:
                raise NotFoundError(f"{self._cls.tag} was looked up by name: its code is not here, use .remote()")
            instance = instantiate(user_cls, self._parameters)
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

    def _variant(self) -> dict[str, Any]:
        variant: dict[str, Any] = {}
        if self._obj._parameters or self._obj._cls._parameters:
            variant["parameters"] = dict(self._obj._parameters)
        if self._obj._cls._overrides:
            variant["options"] = self._obj._cls._overrides
        return variant

    def local(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._obj._local_instance(), self._method or "")(*args, **kwargs)
