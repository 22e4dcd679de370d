"""What makes a *variant* of a function: ``modal.parameter()`` values of a class, and ``with_options`` overrides.

Each distinct variant runs in its own pool of containers, with its own memory snapshot (the server puts the
parameter values, and the overrides that change what a container holds, into the pool and snapshot keys).

Parameters (Modal's rules): dataclass-style annotated class attributes, ``size: str = modal.parameter()``,
of type ``str``, ``int``, ``bool`` or ``bytes``, passed by keyword only (``Model(size="large")``), at most
16 KiB in all. A class with parameters may not define ``__init__``: the container sets the values on the
instance before any ``@enter`` hook runs.

They travel as plain data: in the deploy spec each declaration is ``{"type": "str"}`` plus ``"default"`` when
it has one (JSON-safe: bytes as base64), in a call's target as msgpack values, and into the container as
JSON in the ``WARMBOOT_PARAMETERS`` variable. Stdlib only: containers import this module.
"""

from __future__ import annotations

import json
from typing import Any

from warmboot.errors import InvalidOptionError

#: The types a parameter may have (Modal's), by the name the deploy spec uses.
TYPES: dict[str, type] = {"str": str, "int": int, "bool": bool, "bytes": bytes}
#: Modal's limit on the size of a class's parameter values, all together.
MAX_TOTAL_BYTES = 16 * 1024
_INT64 = (-(2**63), 2**63 - 1)
#: How the container receives its instance's parameter values (JSON: ``{name: json-safe value}``).
ENV_VAR = "WARMBOOT_PARAMETERS"


class _NoDefault:
    def __repr__(self) -> str:
        return "<no default>"


_NO_DEFAULT = _NoDefault()


class _Parameter:
    """The class attribute ``modal.parameter()`` leaves in the class body (like ``dataclasses.field``)."""

    def __init__(self, default: Any, init: bool):
        self.default = default
        self.init = init

    def __repr__(self) -> str:
        return f"modal.parameter(default={self.default!r})" if self.init else "modal.parameter(init=False)"


def parameter(*, default: Any = _NO_DEFAULT, init: bool = True) -> Any:
    """Declare a parameter of an ``@app.cls`` class, like ``dataclasses.field``::

        @app.cls()
        class Model:
            size: str = modal.parameter(default="small")

            @modal.method()
            def predict(self, x): ...

        Model(size="large").predict.remote(1)  # runs in containers whose instance has self.size == "large"

    Each distinct set of values runs in its own pool of containers (with its own memory snapshot). Types:
    ``str``, ``int``, ``bool``, ``bytes``. ``init=False`` only annotates an attribute (set by an ``@enter``
    hook, say): it is no parameter and has no effect at run time.
    """
    return _Parameter(default, bool(init))


# ----- declarations (at decoration, and in the deploy spec) ------------------------------------------------------


def _annotation_type(owner: type, name: str, annotation: Any) -> str:
    if isinstance(annotation, str):  # `from __future__ import annotations`: the annotation's source text
        type_name = annotation.strip().removeprefix("builtins.")
    else:
        type_name = getattr(annotation, "__name__", repr(annotation)) if annotation in TYPES.values() else ""
    if type_name not in TYPES:
        shown = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
        raise InvalidOptionError(
            f"{owner.__name__}.{name}: modal.parameter() supports the types str, int, bool and bytes, "
            f"not {shown}; annotate it with one of those (e.g. `{name}: str = modal.parameter()`)"
        )
    return type_name


def declarations(user_cls: type) -> dict[str, dict[str, Any]]:
    """The class's parameters, in definition order: ``{name: {"type": "str"[, "default": json-safe]}}``.

    Raises :class:`InvalidOptionError` at decoration for a parameter without a supported annotation, a default of
    the wrong type, or a class that has parameters and its own ``__init__`` (refused, as Modal does).
    """
    found: dict[str, dict[str, Any]] = {}
    for owner in reversed(user_cls.__mro__[:-1]):  # base classes first; object has none
        annotations = vars(owner).get("__annotations__", {})
        for name, member in vars(owner).items():
            if not isinstance(member, _Parameter) or not member.init:
                continue
            if name not in annotations:
                raise InvalidOptionError(
                    f"{owner.__name__}.{name}: a modal.parameter() needs a type annotation "
                    f"(str, int, bool or bytes), e.g. `{name}: str = modal.parameter()`"
                )
            decl: dict[str, Any] = {"type": _annotation_type(owner, name, annotations[name])}
            if member.default is not _NO_DEFAULT:
                check_value(f"{owner.__name__}.{name}: the default", decl["type"], member.default)
                decl["default"] = _to_json(member.default)
            found[name] = decl
    if found and "__init__" in vars(user_cls):
        raise InvalidOptionError(
            f"{user_cls.__name__} has modal.parameter()s and its own __init__: a parametrized class may not define "
            "__init__ (the parameters make its constructor); move that setup into an @modal.enter() method"
        )
    return found


def check_declarations(label: str, decls: Any) -> dict[str, dict[str, Any]]:
    """A deploy spec's ``parameters`` (from any client), checked: the server's side of :func:`declarations`."""
    if decls is None:
        return {}
    if not isinstance(decls, dict):
        raise InvalidOptionError(f"{label}: the spec's parameters must be a map of name to declaration")
    for name, decl in decls.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidOptionError(f"{label}: parameter name {name!r} is not a Python identifier")
        if not isinstance(decl, dict) or decl.get("type") not in TYPES or set(decl) - {"type", "default"}:
            raise InvalidOptionError(
                f"{label}: parameter {name!r} is declared as {decl!r}; expected {{'type': one of "
                f"{', '.join(TYPES)}[, 'default': value]}}"
            )
        if "default" in decl:
            check_value(
                f"{label}: the default of parameter {name!r}", decl["type"], _from_json(decl["type"], decl["default"])
            )
    return decls


# ----- values ------------------------------------------------------------------------------------------------


def check_value(what: str, type_name: str, value: Any) -> Any:
    """``value`` if it has the parameter's type (a bool is no int here, an int no bool), else an error."""
    expected = TYPES[type_name]
    if type(value) is not expected:
        raise InvalidOptionError(
            f"{what} must be {'an' if type_name == 'int' else 'a'} {type_name}, "
            f"got {type(value).__name__} {_short(value)}"
        )
    if expected is int and not _INT64[0] <= value <= _INT64[1]:
        raise InvalidOptionError(f"{what} is {value}: an int parameter must fit in 64 bits")
    return value


def bind(label: str, decls: dict[str, dict[str, Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The complete parameter values of ``Cls(*args, **kwargs)`` (defaults filled in), checked.

    Raises :class:`InvalidOptionError` naming the parameter for positional arguments, unknown names, missing
    required parameters, wrong types, and values over :data:`MAX_TOTAL_BYTES` in all.
    """
    if args:
        names = ", ".join(f"{n}=..." for n in decls) or "no arguments"
        raise InvalidOptionError(
            f"{label}() takes its parameters by keyword only ({names}), got {len(args)} positional argument(s)"
        )
    if not decls and kwargs:
        raise InvalidOptionError(
            f"{label}() takes no arguments: it declares no modal.parameter() (got {', '.join(map(repr, kwargs))}); "
            f"declare them as class attributes, e.g. `{next(iter(kwargs))}: str = modal.parameter()`"
        )
    unknown = [n for n in kwargs if n not in decls]
    if unknown:
        raise InvalidOptionError(
            f"{label}() got unknown parameter(s) {', '.join(map(repr, unknown))}; its parameters are: "
            f"{', '.join(decls)}"
        )
    values: dict[str, Any] = {}
    for name, decl in decls.items():
        if name in kwargs:
            values[name] = check_value(f"{label}(): parameter {name!r}", decl["type"], kwargs[name])
        elif "default" in decl:
            values[name] = _from_json(decl["type"], decl["default"])
        else:
            raise InvalidOptionError(f"{label}() is missing the required parameter {name!r} ({decl['type']})")
    size = len(encode(values))
    if size > MAX_TOTAL_BYTES:
        raise InvalidOptionError(
            f"{label}(): the parameter values take {size} bytes encoded, more than the {MAX_TOTAL_BYTES} allowed; "
            "pass large data to the methods instead, or through a Volume"
        )
    return values


def encode(values: dict[str, Any]) -> str:
    """Parameter values as canonical JSON (sorted; bytes as base64): what the container gets and keys hash."""
    return json.dumps({k: _to_json(v) for k, v in values.items()}, sort_keys=True, separators=(",", ":"))


def decode(decls: dict[str, dict[str, Any]], text: str) -> dict[str, Any]:
    """The values :func:`encode` wrote, typed by the class's declarations."""
    data = json.loads(text)
    return {name: _from_json(decls[name]["type"], data[name]) for name in decls if name in data}


def _to_json(value: Any) -> Any:
    if not isinstance(value, bytes):
        return value
    import base64  # bytes parameters only: containers import this module at start

    return {"base64": base64.b64encode(value).decode()}


def _from_json(type_name: str, value: Any) -> Any:
    if type_name == "bytes" and isinstance(value, dict) and isinstance(value.get("base64"), str):
        import base64

        return base64.b64decode(value["base64"])
    return value


def describe(values: dict[str, Any], limit: int = 60) -> str:
    """``size='large', n=3``, shortened: for pool labels and snapshot lists."""
    text = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def instantiate(user_cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``user_cls`` with its parameter values set (before any ``@enter`` hook runs).

    A parametrized class has no ``__init__`` of its own (refused at decoration): the instance is made without
    calling one, as a dataclass's synthesized constructor would only assign the fields.
    """
    if not declarations(user_cls):
        return user_cls()
    instance = user_cls.__new__(user_cls)
    for name, value in values.items():
        setattr(instance, name, value)
    return instance


# ----- with_options ------------------------------------------------------------------------------------------

#: What ``with_options`` may override: options the runtime honours per pool.
OVERRIDABLE = ("cpu", "memory", "gpu", "env", "secrets", "volumes", "retries", "max_containers", "scaledown_window",
               "timeout")  # fmt: skip
#: Modal's with_options arguments warmboot cannot honour, and what to do instead.
_REFUSED = {
    "buffer_containers": "warmboot keeps no buffer of idle containers; use min_containers in the decorator",
    "region": "warmboot runs on this machine only",
    "cloud": "warmboot runs on this machine only",
    "concurrency_limit": "it is called max_containers now",
    "container_idle_timeout": "it is called scaledown_window now",
    "allow_concurrent_inputs": "use @modal.concurrent(max_inputs=...) on the class or function",
}


def option_overrides(label: str, previous: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """``with_options(**given)`` on a handle that already overrides ``previous``: the merged overrides, as plain
    data for the call's target (secrets and volumes as their specs). ``None`` means "keep"; a later call
    overrides an earlier one, except secrets (added) and env and volumes (merged by key)."""
    from warmboot import validation
    from warmboot.sdk.secret import Secret
    from warmboot.sdk.volume import Volume

    what = f"{label}.with_options"
    for name, value in given.items():
        if name in _REFUSED and value is not None:
            raise InvalidOptionError(f"{what}: {name}= is not supported: {_REFUSED[name]}")
        if name not in OVERRIDABLE and name not in _REFUSED:
            raise InvalidOptionError(f"{what}: unknown option {name!r}; it can override: {', '.join(OVERRIDABLE)}")
    merged = dict(previous)
    for name in OVERRIDABLE:  # in a fixed order: the same overrides make the same variant
        value = given.get(name)
        if value is None:
            continue
        if name == "secrets":
            if not isinstance(value, list | tuple) or not all(isinstance(s, Secret) for s in value):
                raise InvalidOptionError(f"{what}: secrets= is a list of Secrets, got {_short(value)}")
            merged["secrets"] = [*merged.get("secrets", []), *(s.to_spec() for s in value)]
        elif name == "volumes":
            if not isinstance(value, dict) or not all(isinstance(v, Volume) for v in value.values()):
                raise InvalidOptionError(f"{what}: volumes= maps absolute paths to Volumes, got {_short(value)}")
            specs = {path: {"name": v.name, "create_if_missing": v.create_if_missing} for path, v in value.items()}
            merged["volumes"] = {**merged.get("volumes", {}), **specs}
        elif name == "env":
            merged["env"] = {**merged.get("env", {}), **validation.environment(f"{what}: env=", value)}
        else:
            merged[name] = value
    return check_overrides(what, merged)


def function_with_options(fn: Any, given: dict[str, Any]) -> Any:
    """The body of ``Function.with_options``: a copy of the handle carrying the merged overrides."""
    import copy

    handle = copy.copy(fn)
    handle._overrides = option_overrides(fn.tag, fn._overrides or {}, given)
    return handle


def check_overrides(what: str, overrides: Any) -> dict[str, Any]:
    """The overrides' values, by the rules the decorators apply (used by the SDK and again by the server)."""
    from warmboot import validation
    from warmboot.sdk import options as option_rules

    if not isinstance(overrides, dict):
        raise InvalidOptionError(f"{what}: the option overrides must be a map")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise InvalidOptionError(
            f"{what}: option(s) {', '.join(map(repr, unknown))} cannot be overridden; it can override: "
            f"{', '.join(OVERRIDABLE)}"
        )
    plain = {k: v for k, v in overrides.items() if k not in ("secrets", "volumes")}
    normal = option_rules.check(what, plain)  # timeouts become floats: 10 and 10.0 are the same variant
    result = {**overrides, **{k: normal[k] for k in plain}}
    for path, volume in (overrides.get("volumes") or {}).items():
        validation.mount_point(f"{what}: volumes=", path)
        if not isinstance(volume, dict) or not isinstance(volume.get("create_if_missing", False), bool):
            raise InvalidOptionError(f"{what}: volumes[{path!r}] must name a volume")
        validation.name("volume", volume.get("name"))
    secrets = overrides.get("secrets") or []
    if not isinstance(secrets, list):
        raise InvalidOptionError(f"{what}: secrets= must be a list")
    for secret in secrets:
        if not isinstance(secret, dict):
            raise InvalidOptionError(f"{what}: each secret must be a Secret")
        if secret.get("name") is not None:
            validation.name("secret", secret["name"])
        else:
            validation.environment(f"{what}: Secret.from_dict()", secret.get("values"))
    return result


def variant_id(values: dict[str, Any] | None, overrides: dict[str, Any] | None) -> str:
    """A short digest naming a variant (its parameter values and overrides): its pool's key."""
    material = json.dumps(
        {"parameters": json.loads(encode(values or {})), "options": overrides or {}}, sort_keys=True, default=str
    )
    import hashlib  # the server's and caller's: a container never names variants

    return hashlib.sha256(material.encode()).hexdigest()[:16]
