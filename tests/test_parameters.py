"""``modal.parameter()`` classes and ``with_options``: each variant runs in its own pool with its own snapshot.

Two layers. The fast one checks the parameter rules (declarations, binding, encoding), the option overrides,
and the server's variant keys without containers. The end-to-end one deploys a real app on a real server
(the session's ``platform``) and calls it from fresh SDK processes: two parameter sets get different
containers and different snapshots, the same set reuses its pool and (after a cold start) restores its own
snapshot, ``@enter`` hooks see the values, ``with_options(timeout=/max_containers=/env=)`` change what the
containers do, and bad parameters or options are refused with errors that name them.
"""

from __future__ import annotations

import json
import subprocess
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from platform_helpers import SNAPSHOT_LIST_COLUMNS, WARMBOOT, Platform, wait_for

import warmboot as modal
from warmboot.errors import InvalidOptionError, ServerRestartedError, UnsupportedOptionError
from warmboot.protocol import Target
from warmboot.sdk import parameter
from warmboot.server import apps as apps_module
from warmboot.server import specs
from warmboot.server.apps import RunningApp, Variant, variant_of, variant_snapshot_key
from warmboot.server.calls import CallBook
from warmboot.server.db import Database
from warmboot.server.state import AppRecord

# ----- fast: the parameter rules ----------------------------------------------------------------------------


def _model_cls() -> Any:
    app = modal.App("fast-params")

    @app.cls()
    class Model:
        size: str = modal.parameter(default="small")
        n: int = modal.parameter()
        flag: bool = modal.parameter(default=False)
        blob: bytes = modal.parameter(default=b"\x00\xff")
        note: str = modal.parameter(init=False)  # not a parameter: annotation only

        @modal.enter()
        def setup(self) -> None:
            self.seen = (self.size, self.n)

        @modal.method()
        def info(self) -> tuple[Any, ...]:
            return (self.size, self.n, self.flag, self.blob, self.seen)

    return app, Model


def test_parameters_are_declared_in_order_with_json_safe_defaults() -> None:
    app, _ = _model_cls()
    decls = app.spec()["functions"]["Model"]["parameters"]
    assert decls == {
        "size": {"type": "str", "default": "small"},
        "n": {"type": "int"},
        "flag": {"type": "bool", "default": False},
        "blob": {"type": "bytes", "default": {"base64": "AP8="}},
    }
    json.dumps(decls)  # the server stores specs as JSON
    assert specs.check("fast-params", app.spec()).functions["Model"].parameters == decls


def test_instances_bind_keyword_values_and_local_calls_see_them() -> None:
    _, Model = _model_cls()
    assert Model(n=3).info.local() == ("small", 3, False, b"\x00\xff", ("small", 3))
    assert Model(n=2, size="large", flag=True, blob=b"x").info.local() == ("large", 2, True, b"x", ("large", 2))
    target = Model(n=3, size="large").info._target()
    assert target["parameters"] == {"size": "large", "n": 3, "flag": False, "blob": b"\x00\xff"}


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((1,), {}, "keyword only"),
        ((), {}, "missing the required parameter 'n' (int)"),
        ((), {"n": "3"}, "parameter 'n' must be an int, got str '3'"),
        ((), {"n": True}, "parameter 'n' must be an int, got bool True"),
        ((), {"n": 1, "flag": 1}, "parameter 'flag' must be a bool, got int 1"),
        ((), {"n": 1, "blob": "text"}, "parameter 'blob' must be a bytes"),
        ((), {"n": 1, "colour": "red"}, "unknown parameter(s) 'colour'; its parameters are: size, n, flag, blob"),
        ((), {"n": 1, "note": "x"}, "unknown parameter(s) 'note'"),
        ((), {"n": 2**63}, "must fit in 64 bits"),
        ((), {"n": 1, "size": "x" * 20_000}, "more than the 16384 allowed"),
    ],
)
def test_bad_parameters_are_refused_at_instantiation(
    args: tuple[Any, ...], kwargs: dict[str, Any], message: str
) -> None:
    _, Model = _model_cls()
    with pytest.raises(InvalidOptionError) as exc:
        Model(*args, **kwargs)
    assert message in str(exc.value)
    assert str(exc.value).startswith("Model(")


def test_bad_declarations_are_refused_at_decoration() -> None:
    app = modal.App("fast-bad")
    with pytest.raises(InvalidOptionError, match=r"supports the types str, int, bool and bytes, not float"):

        @app.cls()
        class F:
            x: float = modal.parameter()

    with pytest.raises(InvalidOptionError, match=r"G.x: a modal.parameter\(\) needs a type annotation"):

        @app.cls()
        class G:
            x = modal.parameter()

    with pytest.raises(InvalidOptionError, match=r"H.x: the default must be an int, got str"):

        @app.cls()
        class H:
            x: int = modal.parameter(default="1")

    with pytest.raises(InvalidOptionError, match=r"has modal.parameter\(\)s and its own __init__"):

        @app.cls()
        class I:  # noqa: E742
            x: int = modal.parameter(default=1)

            def __init__(self) -> None:
                self.y = 1


def test_a_class_without_parameters_takes_no_arguments() -> None:
    app = modal.App("fast-plain")

    @app.cls()
    class Plain:
        @modal.method()
        def m(self) -> int:
            return 1

    with pytest.raises(InvalidOptionError, match=r"Plain\(\) takes no arguments: it declares no modal.parameter"):
        Plain(x=1)
    assert "parameters" not in Plain().m._target()


def test_string_annotations_work_too() -> None:
    namespace: dict[str, Any] = {}
    exec(  # a class body under `from __future__ import annotations`, as app files often are
        "from __future__ import annotations\nimport warmboot as modal\n"
        "class S:\n    a: str = modal.parameter()\n    b: bytes = modal.parameter(default=b'')\n",
        namespace,
    )
    assert parameter.declarations(namespace["S"]) == {
        "a": {"type": "str"},
        "b": {"type": "bytes", "default": {"base64": ""}},
    }


def test_encoding_round_trips_and_is_canonical() -> None:
    decls = {"a": {"type": "str"}, "b": {"type": "bytes"}, "c": {"type": "int"}, "d": {"type": "bool"}}
    values = {"a": "é", "b": b"\x00\x01", "c": -5, "d": True}
    assert parameter.decode(decls, parameter.encode(values)) == values
    assert parameter.encode(values) == parameter.encode(dict(reversed(values.items())))


def test_the_server_rebinds_what_any_client_sends() -> None:
    decls = {"size": {"type": "str", "default": "small"}, "blob": {"type": "bytes", "default": {"base64": "AP8="}}}
    assert parameter.bind("M", decls, (), {}) == {"size": "small", "blob": b"\x00\xff"}
    with pytest.raises(InvalidOptionError, match="unknown parameter"):
        parameter.bind("M", decls, (), {"../etc": "x"})
    with pytest.raises(InvalidOptionError, match=r"parameter 'size'.* must be a str"):
        parameter.bind("M", decls, (), {"size": ["list"]})
    for bad in ({"x": {"type": "float"}}, {"x": {"type": "int", "default": "1"}}, {"1x": {"type": "int"}}, ["x"]):
        with pytest.raises(InvalidOptionError):
            parameter.check_declarations("app.M", bad)


# ----- fast: with_options -----------------------------------------------------------------------------------


def test_with_options_merges_overrides_and_checks_them() -> None:
    _, Model = _model_cls()
    vol = modal.Volume.from_name("v1", create_if_missing=True)
    handle = Model.with_options(gpu=None, timeout=10, env={"A": "1"}, secrets=[modal.Secret.from_name("s1")])
    handle = handle.with_options(max_containers=2, env={"B": "2"}, volumes={"/data": vol})
    assert handle(n=1).info._target()["options"] == {
        "timeout": 10.0,
        "env": {"A": "1", "B": "2"},
        "secrets": [{"name": "s1"}],
        "max_containers": 2,
        "volumes": {"/data": {"name": "v1", "create_if_missing": True}},
    }
    assert "options" not in Model(n=1).info._target(), "with_options returns a new handle, the class is unchanged"
    assert handle(n=1).info.local()[1] == 1, "a with_options handle keeps the class's code and parameters"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"region": "us-east"}, "region= is not supported: warmboot runs on this machine only"),
        ({"buffer_containers": 2}, "buffer_containers= is not supported"),
        ({"concurrency_limit": 2}, "it is called max_containers now"),
        ({"image": "x"}, "unknown option 'image'; it can override: cpu, memory, gpu"),
        ({"timeout": 0.1}, "timeout=0.1 is out of range"),
        ({"max_containers": 0}, "max_containers= must be at least 1"),
        ({"memory": -1}, "memory= is a number of MiB"),
        ({"env": {"1BAD": "x"}}, "is not a valid variable name"),
        ({"secrets": ["s"]}, "secrets= is a list of Secrets"),
        ({"volumes": {"/etc": modal.Volume.from_name("v")}}, "would hide the image's /etc"),
    ],
)
def test_with_options_refuses_what_it_cannot_honour(options: dict[str, Any], message: str) -> None:
    _, Model = _model_cls()
    with pytest.raises(InvalidOptionError) as exc:
        Model.with_options(**options)
    assert message in str(exc.value)
    with pytest.raises(InvalidOptionError) as exc:
        modal.Function.from_name("a", "f").with_options(**options)
    assert message in str(exc.value)


def test_function_with_options_is_a_new_handle() -> None:
    f = modal.Function.from_name("some-app", "f")
    g = f.with_options(timeout=5).with_options(retries=2)
    assert g._target()["options"] == {"timeout": 5.0, "retries": 2}
    assert "options" not in f._target()


def test_the_server_checks_overrides_as_the_decorators_do() -> None:
    assert parameter.check_overrides("a.f", {"timeout": 10, "cpu": 0.5}) == {"timeout": 10.0, "cpu": 0.5}
    for bad in ({"min_containers": 3}, {"max_containers": "9"}, {"volumes": {"/x": {"name": "../up"}}}, []):
        with pytest.raises(InvalidOptionError):
            parameter.check_overrides("a.f", bad)


# ----- fast: variants and their keys ------------------------------------------------------------------------


def test_each_variant_has_its_own_pool_key_and_snapshot_key() -> None:
    base = "0123456789abcdef" * 2
    small, large = Variant("M", {"size": "small"}), Variant("M", {"size": "large"})
    assert Variant("M").key == "M"
    assert small.key != large.key and small.key.startswith("M#")
    assert Variant("M", {"size": "small"}).key == small.key, "the same set is the same pool"
    assert Variant("M", None, {"timeout": 5.0}).key not in ("M", small.key)
    keys = {variant_snapshot_key(base, v) for v in (small, large)}
    assert len(keys) == 2 and base not in keys
    assert variant_snapshot_key(base, Variant("M", None, {"timeout": 5.0})) == base, "timeout= changes no snapshot"
    assert all(variant_of(k, {base}) for k in keys) and not variant_of("f" * 32, {base})


def test_overrides_apply_on_top_of_the_deployed_spec() -> None:
    fspec = {
        "options": {"timeout": 300.0, "env": {"A": "0", "K": "k"}, "gpu": None, "max_containers": 10},
        "secrets": [{"name": "base"}],
        "volumes": {"/a": {"name": "va"}},
    }
    v = Variant(
        "f",
        None,
        {"timeout": 5.0, "env": {"A": "1"}, "secrets": [{"name": "extra"}], "volumes": {"/b": {"name": "vb"}}},
    )
    eff = v.effective_spec(fspec)
    assert eff["options"]["timeout"] == 5.0 and eff["options"]["max_containers"] == 10
    assert eff["options"]["env"] == {"A": "1", "K": "k"}
    assert eff["secrets"] == [{"name": "base"}, {"name": "extra"}]
    assert eff["volumes"] == {"/a": {"name": "va"}, "/b": {"name": "vb"}}
    assert fspec["options"]["timeout"] == 300.0, "the deployed spec is not changed"


# ----- end to end ---------------------------------------------------------------------------------------------

SOURCE = """
import os, time
import warmboot as modal

app = modal.App({app!r})
meet = modal.Volume.from_name({volume!r}, create_if_missing=True)


@app.cls(enable_memory_snapshot=True)
class Model:
    size: str = modal.parameter(default="small")
    n: int = modal.parameter(default=1)
    flag: bool = modal.parameter(default=False)
    blob: bytes = modal.parameter(default=b"")

    @modal.enter(snap=True)
    def load(self):
        self.loaded = [self.size, self.n, self.flag, self.blob.hex()]  # captured in the snapshot
        self.booted_in = os.environ.get("WARMBOOT_CONTAINER_ID", "")  # empty before START: no identity yet

    @modal.enter()
    def start(self):
        self.started = self.size

    @modal.method()
    def info(self):
        return {{
            "params": [self.size, self.n, self.flag, self.blob.hex()],
            "loaded": self.loaded,
            "started": self.started,
            "container": os.environ["WARMBOOT_CONTAINER_ID"],
            "env": os.environ.get("EXTRA", ""),
        }}


@app.cls()
class Named:
    name: str = modal.parameter()

    @modal.method()
    def hello(self):
        return "hello " + self.name


@app.cls(volumes={{"/meet": meet}})
class Gate:
    @modal.method()
    def hold(self, tag, together):
        # Mark this input running, then wait until `together` inputs run at once (or for the release file).
        open(f"/meet/{{tag}}", "w").close()
        while not os.path.exists("/meet/release") and len(
            [n for n in os.listdir("/meet") if n.startswith(tag.split("-")[0] + "-")]
        ) < together:
            time.sleep(0.01)
        return os.environ["WARMBOOT_CONTAINER_ID"]


@app.function()
def nap(seconds):
    time.sleep(seconds)
    return "woke"
"""


@pytest.fixture(scope="module")
def app(platform: Platform) -> tuple[str, Path, Path]:
    name = f"params-{uuid.uuid4().hex[:8]}"
    volume = f"{name}-meet"
    path = platform.write_app(name.replace("-", "_"), SOURCE.format(app=name, volume=volume))
    platform.cli("deploy", str(path))
    return name, path, platform.home / "volumes" / volume


def _run(platform: Platform, code: str) -> Any:
    proc = platform.python(code, timeout=240)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _info(platform: Platform, name: str, **params: Any) -> dict[str, Any]:
    return _run(
        platform,
        f"""
        import json, warmboot
        Model = warmboot.Cls.from_name({name!r}, "Model")
        print(json.dumps(Model(**{params!r}).info.remote()))
        """,
    )


def _snapshot_rows(platform: Platform, name: str) -> dict[str, dict[str, str]]:
    """`warmboot snapshot list` rows of app ``name``, by their function column."""
    env = {**platform.env, "COLUMNS": "400"}
    out = subprocess.run([WARMBOOT, "snapshot", "list"], env=env, capture_output=True, text=True, check=True).stdout
    columns = SNAPSHOT_LIST_COLUMNS
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == len(columns) and cells[0].startswith(name + "."):
            rows[cells[0]] = dict(zip(columns, cells, strict=True))
    return rows


def test_parameter_sets_get_their_own_containers_and_snapshots(platform: Platform, app: tuple[str, Path, Path]) -> None:
    name, path, _ = app
    a = _info(platform, name, size="a", n=7, flag=True, blob=b"\x01\x02")
    b = _info(platform, name, size="b")
    assert a["params"] == a["loaded"] == ["a", 7, True, "0102"], "@enter(snap=True) saw the parameters"
    assert a["started"] == "a" and b["started"] == "b", "@enter() saw the parameters"
    assert b["params"] == ["b", 1, False, ""], "defaults fill the parameters not given"
    assert a["container"] != b["container"], "two parameter sets never share a container"
    again = _info(platform, name, size="a", n=7, flag=True, blob=b"\x01\x02")
    assert again["container"] == a["container"], "the same set, from another process, reuses its warm pool"

    label_a = f"{name}.Model(size='a', n=7, flag=True, blob=b'\\x01\\x02')"
    label_b = f"{name}.Model(size='b', n=1, flag=False, blob=b'')"
    rows = wait_for("both snapshots are made", lambda: (r := _snapshot_rows(platform, name)) and all(
        r.get(label, {}).get("state") == "ok" for label in (label_a, label_b)) and r,
        watch=platform.home / "logs")  # fmt: skip
    assert rows[label_a]["key"] != rows[label_b]["key"], "each parameter set has its own snapshot"

    # A cold start of set "a" (no container left; the unchanged deploy keeps the keys) restores a's snapshot.
    platform.cli("app", "stop", name)
    platform.cli("deploy", str(path))
    restored = _info(platform, name, size="a", n=7, flag=True, blob=b"\x01\x02")
    assert restored["container"] != a["container"]
    assert restored["loaded"] == ["a", 7, True, "0102"] and restored["started"] == "a"
    log = platform.log_text(name)
    assert f"Restored {label_a} from memory snapshot" in log, log[-3000:]
    assert f"Restored {label_b}" not in log
    rows = _snapshot_rows(platform, name)
    assert rows[label_a]["restores"] == "1" and rows[label_b]["restores"] == "0"
    assert rows[label_b]["state"] == "ok", "the redeploy kept the other set's snapshot too"


def test_with_options_timeout_applies_to_its_handle_only(platform: Platform, app: tuple[str, Path, Path]) -> None:
    name, _, _ = app
    out = _run(
        platform,
        f"""
        import json, warmboot
        nap = warmboot.Function.from_name({name!r}, "nap")
        got = {{"plain": nap.remote(2)}}
        try:
            nap.with_options(timeout=1).remote(30)
        except warmboot.WarmbootError as exc:
            got["short"] = [type(exc).__name__, str(exc)]
        print(json.dumps(got))
        """,
    )
    assert out["plain"] == "woke", "the deployed timeout (300 s) lets a 2 s call finish"
    assert out["short"][0] == "FunctionTimeoutError" and "timeout of 1 s" in out["short"][1], out


def test_with_options_max_containers_and_env(platform: Platform, app: tuple[str, Path, Path]) -> None:
    name, _, meet = app
    # The deployed class runs two inputs at once (each waits until both run: it cannot finish otherwise).
    both = _run(
        platform,
        f"""
        import json, warmboot
        gate = warmboot.Cls.from_name({name!r}, "Gate")()
        calls = [gate.hold.spawn(f"wide-{{i}}", 2) for i in range(2)]
        print(json.dumps([c.get(timeout=120) for c in calls]))
        """,
    )
    assert len(set(both)) == 2
    # The with_options(max_containers=1) handle holds its three inputs to one container: one runs, the rest wait.
    ids = _run(
        platform,
        f"""
        import json, warmboot
        gate = warmboot.Cls.from_name({name!r}, "Gate").with_options(max_containers=1)()
        print(json.dumps([gate.hold.spawn(f"narrow-{{i}}", 3).object_id for i in range(3)]))
        """,
    )
    wait_for("the first narrow input runs", lambda: list(meet.glob("narrow-*")), watch=meet)
    listing = platform.cli("container", "list").stdout
    assert listing.count("Gate.with_options(max_containers)") == 1, listing
    assert len(list(meet.glob("narrow-*"))) == 1, "with max_containers=1 only one input runs"
    (meet / "release").touch()
    narrow = _run(
        platform,
        f"""
        import json, warmboot
        print(json.dumps([warmboot.FunctionCall.from_id(i).get(timeout=120) for i in {ids!r}]))
        """,
    )
    assert len(set(narrow)) == 1 and not set(narrow) & set(both), "one container of its own pool"

    extra = _run(
        platform,
        f"""
        import json, warmboot
        Model = warmboot.Cls.from_name({name!r}, "Model")
        print(json.dumps(Model.with_options(env={{"EXTRA": "yes"}})(size="e").info.remote()))
        """,
    )
    assert extra["env"] == "yes" and extra["params"][0] == "e"
    label = f"{name}.Model(size='e', n=1, flag=False, blob=b'').with_options(env)"
    wait_for(
        "the env= variant's own snapshot",
        lambda: _snapshot_rows(platform, name).get(label, {}).get("state") == "ok",
        watch=platform.home / "logs",
    )


def test_bad_parameters_and_options_are_refused_clearly(platform: Platform, app: tuple[str, Path, Path]) -> None:
    name, _, _ = app
    out = _run(
        platform,
        f"""
        import json, warmboot
        from warmboot.sdk import client
        Model = warmboot.Cls.from_name({name!r}, "Model")
        Named = warmboot.Cls.from_name({name!r}, "Named")
        nap = {{"app_name": {name!r}, "tag": "nap"}}
        got = {{}}
        attempts = {{
            "wrong type": lambda: Model(size=3).info.remote(),
            "unknown": lambda: Model(colour="red").info.remote(),
            "missing": lambda: Named().hello.remote(),
            "positional": lambda: Model("a"),
            "function": lambda: client.call({{**nap, "parameters": {{"x": 1}}}}, (0,), {{}}),
            "option": lambda: client.call({{**nap, "options": {{"min_containers": 3}}}}, (0,), {{}}),
            "gpu": lambda: warmboot.Function.from_name({name!r}, "nap").with_options(gpu="h100:64").remote(0),
            "volume": lambda: warmboot.Function.from_name({name!r}, "nap").with_options(
                volumes={{"/v": warmboot.Volume.from_name("no-such-volume-xyz")}}).remote(0),
        }}
        for what, attempt in attempts.items():
            try:
                attempt()
                got[what] = "no error"
            except warmboot.WarmbootError as exc:
                got[what] = [type(exc).__name__, str(exc)]
        got["ok"] = Named(name="ann").hello.remote()
        print(json.dumps(got))
        """,
    )
    assert out["wrong type"] == ["InvalidOptionError", "Model(): parameter 'size' must be a str, got int 3"]
    assert out["unknown"][0] == "InvalidOptionError" and "unknown parameter(s) 'colour'" in out["unknown"][1]
    assert out["missing"] == ["InvalidOptionError", "Named() is missing the required parameter 'name' (str)"]
    assert out["positional"][0] == "InvalidOptionError" and "keyword only" in out["positional"][1]
    assert out["function"][0] == "InvalidOptionError" and "takes no modal.parameter() values" in out["function"][1]
    assert out["option"][0] == "InvalidOptionError" and "'min_containers' cannot be overridden" in out["option"][1]
    assert out["volume"][0] == "NotFoundError" and "no-such-volume-xyz" in out["volume"][1]
    assert out["gpu"][0] == "UnsupportedOptionError" and "h100" in out["gpu"][1], out["gpu"]
    assert out["ok"] == "hello ann", "the server still serves the app"


# ----- fast: the server's variant pools -----------------------------------------------------------------------


class _FakePool:
    def __init__(self, key: str) -> None:
        self.key, self.busy, self.stopped = key, False, threading.Event()
        self.submitted: list[Any] = []

    def counts(self) -> dict[str, int]:
        return {"booting": 0, "running": int(self.busy), "idle": 0, "waiting": 0}

    def submit(self, call: Any) -> None:
        self.submitted.append(call)

    def stop(self) -> None:
        self.stopped.set()


class _App(RunningApp):
    """A RunningApp whose pools are fakes: what is checked is which pool a variant gets, and the cap."""

    def _make_pool(self, tag: str, variant: Variant | None = None) -> Any:
        return _FakePool(variant.key if variant else tag)


def _running_app() -> _App:
    spec = {
        "functions": {
            "M": {"kind": "cls", "options": {}, "parameters": {"size": {"type": "str", "default": "s"}}},
            "f": {"kind": "function", "options": {}, "parameters": None},
        }
    }
    record = AppRecord("ap-1", "app", "deployed", 1, spec, "/code", "app.py", 0.0)
    return _App(None, record)  # type: ignore[arg-type] - no server: these variants need no volume or secret


def test_the_server_routes_each_variant_to_its_own_pool() -> None:
    app = _running_app()
    default, large = app.variant("M", None), app.variant("M", {"size": "large"})
    assert default.parameters == {"size": "s"} and default.key == app.variant("M", {"size": "s"}).key
    assert app.variant_pool(default) is app.variant_pool(app.variant("M", {}))
    assert app.variant_pool(large) is not app.variant_pool(default)
    assert app.variant("f").key == "f" and app.variant("f", None, {"timeout": 9}).key.startswith("f#")
    with pytest.raises(InvalidOptionError, match=r"app\.f is a function: it takes no modal\.parameter"):
        app.variant("f", {"x": 1})
    with pytest.raises(InvalidOptionError, match=r"parameter 'size' must be a str"):
        app.variant("M", {"size": 1})


def test_a_recorded_variant_comes_back_to_the_same_pool() -> None:
    app = _running_app()
    variant = app.variant("M", {"size": "x"}, {"timeout": 30})
    assert app.variant_from_json("M", variant.to_json()) == variant
    assert app.variant_from_json("M", None) == app.variant("M", {}), "no record: the default parameter set"
    book = CallBook(Database.sqlite(":memory:"), threading.Lock())
    call = book.accept(Target(tag="M", method="m"), "ap-1", b"", detached=True, variant=variant.to_json())
    (queued,), _ = book.recover(ServerRestartedError("restart"))
    assert queued.call_id == call.call_id and app.variant_from_json(queued.tag, queued.variant) == variant


def test_variant_pools_are_capped_and_idle_ones_dropped_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apps_module, "MAX_VARIANT_POOLS", 2)
    app = _running_app()
    first, second = (app.variant_pool(app.variant("M", {"size": s})) for s in ("a", "b"))
    first.busy = True
    third = app.variant_pool(app.variant("M", {"size": "c"}))
    assert second.stopped.is_set() and not first.stopped.is_set(), "the idle variant's pool went, the busy one stayed"
    assert app.variant_pool(app.variant("M", {"size": "a"})) is first
    third.busy = True
    with pytest.raises(UnsupportedOptionError, match=r"already runs 2 variants .* WARMBOOT_MAX_VARIANT_POOLS"):
        app.variant_pool(app.variant("M", {"size": "d"}))
    assert app.pool("f") is app.pools["f"], "deployed pools do not count against the cap"
