"""Memory snapshots end to end: real server, real containers, real CRIU; no mocks.

What is checked is the behaviour of docs/reference "Memory Snapshot" as warmboot reproduces it: only deployed
apps get snapshots; the first cold start runs imports and ``@enter(snap=True)`` and snapshots the container;
later cold starts restore copies (each with its own identity, environment, secrets and RNG streams); a
redeploy with new code replaces the snapshot; a snapshot that cannot be restored (a deleted volume file, a
corrupted image) is discarded, the input is served by a cold boot, and it is recreated at most once; a
container holding a live network connection is never snapshotted.

Every test deploys its own app (unique name) with the real CLI and calls it with the SDK in a fresh process.
A "new cold start" is forced with ``warmboot app stop`` + an unchanged ``warmboot deploy``: the app has no
container left, and the unchanged code keeps the snapshot's key.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from platform_helpers import SNAPSHOT_LIST_COLUMNS, WARMBOOT, Platform

# ----- helpers -------------------------------------------------------------------------------------------

# Runs in a fresh SDK process. Calls the target once with .remote(), or `spawn` times concurrently with
# .spawn(); prints the result(s) as one JSON line.
_CALL = """
import json, warmboot
app, tag, method, args, spawn = {app!r}, {tag!r}, {method!r}, {args!r}, {spawn!r}
target = warmboot.Cls.from_name(app, tag)() if method else warmboot.Function.from_name(app, tag)
fn = getattr(target, method) if method else target
if spawn:
    handles = [fn.spawn(*args) for _ in range(spawn)]
    result = [h.get(timeout=120) for h in handles]
else:
    result = fn.remote(*args)
print(json.dumps(result))
"""


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _write(platform: Platform, app: str, body: str, *, app_kwargs: str = "") -> Path:
    """An app file for App(``app``): ``body`` (dedented) follows ``import warmboot as modal`` and the App."""
    source = f"import warmboot as modal\n\napp = modal.App({app!r}{app_kwargs})\n" + textwrap.dedent(body)
    return platform.write_app(app.replace("-", "_"), source)


def _deploy(platform: Platform, app: str, body: str, *, app_kwargs: str = "") -> Path:
    path = _write(platform, app, body, app_kwargs=app_kwargs)
    platform.cli("deploy", str(path))
    return path


def _new_cold_start(platform: Platform, app: str, path: Path) -> None:
    """Leave the app with no container (its next input needs a cold start); the code, hence the key, is kept."""
    platform.cli("app", "stop", app)
    platform.cli("deploy", str(path))


def _call(platform: Platform, app: str, tag: str, method: str | None = None, *args: Any, spawn: int = 0) -> Any:
    code = _CALL.format(app=app, tag=tag, method=method, args=tuple(args), spawn=spawn)
    proc = platform.python(code, timeout=240)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _count(platform: Platform, app: str, needle: str) -> int:
    return sum(needle in line for line in platform.log_text(app).splitlines())


def _wait_count(platform: Platform, app: str, needle: str, expected: int, deadline_s: float = 10.0) -> int:
    """The number of log lines holding ``needle``, once it reaches ``expected`` (container output is pumped
    into the log by a thread, so it may trail the call's result by a moment) or the deadline passes."""
    end = time.monotonic() + deadline_s
    while _count(platform, app, needle) < expected and time.monotonic() < end:
        time.sleep(0.1)
    time.sleep(0.3)  # let a line too many show up, if there is one
    return _count(platform, app, needle)


def _restored_ids(platform: Platform, label: str) -> list[str]:
    """Container ids of the "Restored LABEL from memory snapshot" lines, in log order."""
    pattern = re.compile(rf"Restored {re.escape(label)} from memory snapshot in \d+ ms \(container (wc-[0-9a-f]+)\b")
    app = label.split(".")[0]
    return [m.group(1) for line in platform.log_text(app).splitlines() if (m := pattern.search(line))]


def _snapshot_dirs(platform: Platform, app: str, tag: str) -> list[tuple[Path, dict[str, Any]]]:
    """(directory, manifest) of the published snapshots of ``app``.``tag`` in the store."""
    found = []
    for entry in sorted((platform.home / "snapshots").iterdir()):
        if entry.name.startswith(".") or not (entry / "manifest.json").is_file():
            continue
        manifest = json.loads((entry / "manifest.json").read_text())
        meta = manifest.get("metadata", {})
        if meta.get("app") == app and meta.get("tag") == tag:
            found.append((entry, manifest))
    return found


def _snapshot_rows(platform: Platform, label: str) -> list[dict[str, str]]:
    """The rows of `warmboot snapshot list` for function ``label`` ("app.tag"): function, key, state, ..."""
    # A wide terminal, so that rich never wraps a cell onto a second line.
    env = {**platform.env, "COLUMNS": "400"}
    out = subprocess.run([WARMBOOT, "snapshot", "list"], env=env, capture_output=True, text=True, check=True).stdout
    columns = SNAPSHOT_LIST_COLUMNS
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == len(columns) and cells[0] == label:
            rows.append(dict(zip(columns, cells, strict=True)))
    return rows


# ----- the tests -----------------------------------------------------------------------------------------


def test_enter_hooks_run_in_their_phase_and_snap_state_survives_restores(platform: Platform) -> None:
    app = _unique("snap-hooks")
    label = f"{app}.Model"
    path = _deploy(
        platform,
        app,
        """
        import os

        @app.cls(enable_memory_snapshot=True)
        class Model:
            @modal.enter(snap=True)
            def load(self):
                print("HOOK snap=True ran")
                self.weights = [i * 3 for i in range(1_000_000)]
                self.id_at_load = os.environ.get("WARMBOOT_CONTAINER_ID")

            @modal.enter(snap=False)
            def setup(self):
                print("HOOK snap=False ran in", os.environ["WARMBOOT_CONTAINER_ID"])
                self.id_at_setup = os.environ["WARMBOOT_CONTAINER_ID"]

            @modal.method()
            def info(self):
                return {
                    "n": len(self.weights),
                    "last": self.weights[-1],
                    "id_at_load": self.id_at_load,
                    "id_at_setup": self.id_at_setup,
                    "container": os.environ["WARMBOOT_CONTAINER_ID"],
                }
        """,
    )
    results = [_call(platform, app, "Model", "info")]
    for _ in range(2):
        _new_cold_start(platform, app, path)
        results.append(_call(platform, app, "Model", "info"))

    for r in results:
        assert (r["n"], r["last"]) == (1_000_000, 2_999_997), "state built in @enter(snap=True) must be there"
        assert r["id_at_load"] is None, "@enter(snap=True) runs before the container has an identity"
        assert r["id_at_setup"] == r["container"], "@enter(snap=False) runs in each container, with its id"
    containers = [r["container"] for r in results]
    assert len(set(containers)) == 3
    assert _restored_ids(platform, label) == containers[1:]
    assert _wait_count(platform, app, "HOOK snap=False ran", 3) == 3
    assert _count(platform, app, "HOOK snap=True ran") == 1, platform.log_text(app)
    for cid in containers:
        assert _count(platform, app, f"HOOK snap=False ran in {cid}") == 1
    assert _count(platform, app, f"Creating memory snapshot for {label}") == 1
    assert _count(platform, app, "Snapshot created in") == 1


def test_second_cold_start_is_a_restore_in_a_new_container(platform: Platform) -> None:
    app = _unique("snap-restore")
    label = f"{app}.whoami"
    path = _deploy(
        platform,
        app,
        """
        import os

        @app.function(enable_memory_snapshot=True)
        def whoami():
            return os.environ["WARMBOOT_CONTAINER_ID"]
        """,
    )
    first = _call(platform, app, "whoami")
    log = platform.log_text(app)
    assert f"Creating memory snapshot for {label}" in log
    assert re.search(rf"Snapshot created in [\d.]+ s \(\d+ MB\) for {re.escape(label)}", log), log
    assert f"Container {first} started for {label} (cold boot" in log

    _new_cold_start(platform, app, path)
    second = _call(platform, app, "whoami")
    assert second != first
    assert _restored_ids(platform, label) == [second]
    assert f"Container {second} started" not in platform.log_text(app), "a restore, not a cold boot"
    rows = _snapshot_rows(platform, label)
    assert [(r["state"], r["restores"]) for r in rows] == [("ok", "1")]


def test_redeploy_reuses_snapshot_unless_the_code_changes(platform: Platform) -> None:
    app = _unique("snap-redeploy")
    label = f"{app}.version"
    body = """
        @app.function(enable_memory_snapshot=True)
        def version():
            return "{v}"
        """
    path = _deploy(platform, app, body.replace("{v}", "v1"))
    assert _call(platform, app, "version") == "v1"
    [(old_dir, old_manifest)] = _snapshot_dirs(platform, app, "version")
    old_key = old_manifest["metadata"]["key"]

    platform.cli("deploy", str(path))  # unchanged
    assert _call(platform, app, "version") == "v1"
    assert _count(platform, app, "Creating memory snapshot") == 1, "an unchanged redeploy keeps the snapshot"
    assert len(_restored_ids(platform, label)) == 1
    assert old_dir.is_dir()

    _deploy(platform, app, body.replace("{v}", "v2"))
    assert not old_dir.exists(), "the old version's snapshot must be deleted on redeploy with new code"
    assert f"Deleted memory snapshot {old_key[:12]}" in platform.log_text(app)
    assert _call(platform, app, "version") == "v2"
    assert _count(platform, app, "Creating memory snapshot") == 2
    assert len(_restored_ids(platform, label)) == 1, "the new version must not restore the old snapshot"

    [(new_dir, new_manifest)] = _snapshot_dirs(platform, app, "version")
    new_key = new_manifest["metadata"]["key"]
    assert new_key != old_key and new_dir != old_dir
    rows = _snapshot_rows(platform, label)
    assert [(r["key"], r["state"]) for r in rows] == [(new_key[:12], "ok")]


@pytest.mark.parametrize("reseed", [True, False], ids=["reseeded", "reseed_after_restore=False"])
def test_randomness_after_restore(platform: Platform, reseed: bool) -> None:
    app = _unique("snap-random" if reseed else "snap-norandom")
    label = f"{app}.draw"
    path = _deploy(
        platform,
        app,
        """
        import os
        import random
        import time

        MODULE_DRAW = random.random()  # drawn before the snapshot: part of it

        @app.function(enable_memory_snapshot=True, max_containers=2)
        def draw(pause):
            time.sleep(pause)
            return {"module": MODULE_DRAW, "call": random.random(), "container": os.environ["WARMBOOT_CONTAINER_ID"]}
        """,
        app_kwargs="" if reseed else ", reseed_after_restore=False",
    )
    cold = _call(platform, app, "draw", None, 0)
    _new_cold_start(platform, app, path)
    a, b = _call(platform, app, "draw", None, 1.5, spawn=2)  # two at once: two restored containers
    assert a["container"] != b["container"]
    assert sorted(_restored_ids(platform, label)) == sorted([a["container"], b["container"]])
    assert cold["module"] == a["module"] == b["module"], "module-level state is captured in the snapshot"
    if reseed:
        assert a["call"] != b["call"], "restored copies must not repeat each other's random draws"
        assert cold["call"] not in (a["call"], b["call"])
    else:
        assert a["call"] == b["call"] == cold["call"], "without reseeding, copies continue the captured RNG"


def test_open_connection_at_snapshot_point_refuses_snapshot(platform: Platform) -> None:
    # The container has only its own loopback before the snapshot point, so the connection is to a server the
    # container runs itself: still a live connection that no restored copy could carry on.
    app = _unique("snap-conn")
    label = f"{app}.Client"
    path = _deploy(
        platform,
        app,
        """
        import os
        import socket

        @app.cls(enable_memory_snapshot=True)
        class Client:
            @modal.enter(snap=True)
            def connect(self):
                self.listener = socket.create_server(("127.0.0.1", 0))
                self.conn = socket.create_connection(self.listener.getsockname())
                self.accepted, _ = self.listener.accept()

            @modal.method()
            def peer(self):
                return {"port": self.conn.getpeername()[1], "container": os.environ["WARMBOOT_CONTAINER_ID"]}
        """,
    )
    first = _call(platform, app, "Client", "peer")
    log = platform.log_text(app)
    [refusal] = [line for line in log.splitlines() if f"No memory snapshot for {label}" in line]
    assert f"127.0.0.1:{first['port']}" in refusal and "@enter(snap=False)" in refusal, refusal
    assert [r["state"] for r in _snapshot_rows(platform, label)] == ["refused"]

    _new_cold_start(platform, app, path)
    second = _call(platform, app, "Client", "peer")
    assert second["container"] != first["container"]
    assert f"Container {second['container']} started for {label} (cold boot" in platform.log_text(app)
    assert _count(platform, app, "No memory snapshot for") == 1, "a refused key must not be tried again"
    assert _count(platform, app, "Creating memory snapshot") == 0
    assert _restored_ids(platform, label) == []
    assert _snapshot_dirs(platform, app, "Client") == []


def test_deleted_volume_file_discards_snapshot_and_recreates_at_most_once(platform: Platform) -> None:
    app = _unique("snap-volfile")
    label = f"{app}.Reader"
    volume = _unique("snapvol")
    data = platform.home / "volumes" / volume / "weights.bin"
    path = _deploy(
        platform,
        app,
        f"""
        import mmap
        import os

        vol = modal.Volume.from_name({volume!r}, create_if_missing=True)

        @app.cls(enable_memory_snapshot=True, volumes={{"/data": vol}})
        class Reader:
            @modal.enter(snap=True)
            def load(self):
                if not os.path.exists("/data/weights.bin"):
                    with open("/data/weights.bin", "wb") as f:
                        f.write(os.urandom(256 * 1024))
                self.file = open("/data/weights.bin", "rb")  # kept open, and mapped, into the snapshot
                self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)

            @modal.method()
            def read(self):
                return {{"size": len(self.map), "container": os.environ["WARMBOOT_CONTAINER_ID"]}}
        """,
    )
    restore_failed = f"Restore of {label} from memory snapshot"
    creating = f"Creating memory snapshot for {label}"

    assert _call(platform, app, "Reader", "read")["size"] == 256 * 1024
    [(first_dir, _)] = _snapshot_dirs(platform, app, "Reader")
    assert _count(platform, app, creating) == 1

    # The file goes away: the restore fails, the input is served cold, the snapshot is recreated (once).
    platform.cli("app", "stop", app)
    data.unlink()
    platform.cli("deploy", str(path))
    assert _call(platform, app, "Reader", "read")["size"] == 256 * 1024
    [failure] = [line for line in platform.log_text(app).splitlines() if restore_failed in line]
    assert "failed" in failure and "booting cold" in failure, failure
    assert "a file the snapshot needs was changed or deleted" in failure, failure
    assert not first_dir.exists(), "a snapshot that failed to restore must be deleted"
    assert _count(platform, app, creating) == 2
    assert _restored_ids(platform, label) == []
    assert [r["state"] for r in _snapshot_rows(platform, label)] == ["ok"]

    # Again: the recreated snapshot fails too; this time the function just boots cold, no third snapshot.
    platform.cli("app", "stop", app)
    data.unlink()
    platform.cli("deploy", str(path))
    assert _call(platform, app, "Reader", "read")["size"] == 256 * 1024
    assert _count(platform, app, restore_failed) == 2
    assert _count(platform, app, creating) == 2, "a broken snapshot is recreated at most once"
    [row] = _snapshot_rows(platform, label)
    assert row["state"] == "broken" and row["note"], row
    assert _snapshot_dirs(platform, app, "Reader") == []

    # And from now on: cold boots, no restore attempts, no snapshots.
    _new_cold_start(platform, app, path)
    third = _call(platform, app, "Reader", "read")
    assert f"Container {third['container']} started for {label} (cold boot" in platform.log_text(app)
    assert _count(platform, app, restore_failed) == 2
    assert _count(platform, app, "Creating memory snapshot") == 2


def test_corrupted_image_is_refused_and_the_input_served_cold(platform: Platform) -> None:
    app = _unique("snap-corrupt")
    label = f"{app}.work"
    path = _deploy(
        platform,
        app,
        """
        import os

        TABLE = list(range(200_000))

        @app.function(enable_memory_snapshot=True)
        def work(x):
            return {"value": TABLE[x], "container": os.environ["WARMBOOT_CONTAINER_ID"]}
        """,
    )
    assert _call(platform, app, "work", None, 7)["value"] == 7
    [(snap_dir, manifest)] = _snapshot_dirs(platform, app, "work")
    pages = max(snap_dir.glob("pages-*.img*"), key=lambda p: p.stat().st_size)
    with open(pages, "r+b") as f:
        offset = pages.stat().st_size // 2
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))

    _new_cold_start(platform, app, path)
    result = _call(platform, app, "work", None, 9)
    assert result["value"] == 9
    log = platform.log_text(app)
    assert f"Container {result['container']} started for {label} (cold boot" in log
    [failure] = [line for line in log.splitlines() if f"Restore of {label} from memory snapshot" in line]
    assert manifest["id"] in failure and "failed" in failure and "checksum" in failure, failure
    assert _restored_ids(platform, label) == []
    assert not snap_dir.exists(), "a corrupted snapshot must be discarded"


def test_concurrent_cold_starts_each_restore(platform: Platform) -> None:
    app = _unique("snap-conc")
    label = f"{app}.slow"
    path = _deploy(
        platform,
        app,
        """
        import os
        import time

        @app.function(enable_memory_snapshot=True, max_containers=4)
        def slow(pause):
            time.sleep(pause)
            return os.environ["WARMBOOT_CONTAINER_ID"]
        """,
    )
    _call(platform, app, "slow", None, 0)
    _new_cold_start(platform, app, path)
    ids = _call(platform, app, "slow", None, 2, spawn=4)
    assert len(set(ids)) == 4, ids
    assert sorted(_restored_ids(platform, label)) == sorted(ids)
    assert _count(platform, app, "Creating memory snapshot") == 1
    assert "failed" not in platform.log_text(app)


def test_restored_container_sees_current_secret_values(platform: Platform) -> None:
    app = _unique("snap-secret")
    label = f"{app}.creds"
    secret = _unique("snapsecret")
    platform.cli("secret", "create", secret, "K=v1")
    path = _deploy(
        platform,
        app,
        f"""
        import os

        AT_IMPORT = os.environ.get("K")

        @app.function(enable_memory_snapshot=True, secrets=[modal.Secret.from_name({secret!r})], env={{"MODE": "a"}})
        def creds():
            return {{"K": os.environ.get("K"), "MODE": os.environ.get("MODE"), "at_import": AT_IMPORT}}
        """,
    )
    assert _call(platform, app, "creds") == {"K": "v1", "MODE": "a", "at_import": "v1"}
    assert _count(platform, app, f"Creating memory snapshot for {label}") == 1

    platform.cli("secret", "create", secret, "K=v2")
    _new_cold_start(platform, app, path)
    restored = _call(platform, app, "creds")
    assert len(_restored_ids(platform, label)) == 1, "a secret's value is not part of the snapshot's key"
    assert restored["K"] == "v2", "a restored container must see the secret's current value"
    assert restored["MODE"] == "a"
    assert _count(platform, app, "Creating memory snapshot") == 1


def test_warmboot_run_makes_no_snapshot(platform: Platform) -> None:
    app = _unique("snap-ephemeral")
    path = _write(
        platform,
        app,
        """
        @app.function(enable_memory_snapshot=True)
        def hello():
            return "hi"

        @app.local_entrypoint()
        def main():
            print("result:", hello.remote())
        """,
    )
    proc = platform.cli("run", str(path))
    assert "result: hi" in proc.stdout
    log = platform.log_text(app)
    assert f"started for {app}.hello (cold boot" in log, log
    assert "Creating memory snapshot" not in log and "Restored" not in log
    assert _snapshot_rows(platform, f"{app}.hello") == []
    assert _snapshot_dirs(platform, app, "hello") == []


def test_snapshot_rm_deletes_it_and_the_next_cold_start_makes_a_fresh_one(platform: Platform) -> None:
    app = _unique("snap-rm")
    label = f"{app}.f"
    path = _deploy(
        platform,
        app,
        """
        @app.function(enable_memory_snapshot=True)
        def f():
            return 42
        """,
    )
    assert _call(platform, app, "f") == 42
    [(snap_dir, manifest)] = _snapshot_dirs(platform, app, "f")
    key = manifest["metadata"]["key"]
    [row] = _snapshot_rows(platform, label)
    assert row["key"] == key[:12]

    out = platform.cli("snapshot", "rm", key[:12]).stdout
    assert "Deleted snapshot" in out and key[:12] in out
    assert not snap_dir.exists()
    assert _snapshot_rows(platform, label) == []

    _new_cold_start(platform, app, path)
    assert _call(platform, app, "f") == 42
    assert _restored_ids(platform, label) == []
    assert _count(platform, app, f"Creating memory snapshot for {label}") == 2
    [(new_dir, new_manifest)] = _snapshot_dirs(platform, app, "f")
    assert new_dir != snap_dir and new_manifest["metadata"]["key"] == key
    assert [r["state"] for r in _snapshot_rows(platform, label)] == ["ok"]


def test_memory_limit_holds_in_a_restored_container(platform: Platform) -> None:
    app = _unique("snap-memory")
    label = f"{app}.alloc"
    path = _deploy(
        platform,
        app,
        """
        import os

        @app.function(enable_memory_snapshot=True, memory=128)
        def alloc(mb):
            block = bytearray(mb * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            return os.environ["WARMBOOT_CONTAINER_ID"]
        """,
    )
    _call(platform, app, "alloc", None, 4)  # cold boot, makes the snapshot
    _new_cold_start(platform, app, path)
    restored = _call(platform, app, "alloc", None, 4)
    assert _restored_ids(platform, label) == [restored]
    out = platform.python(
        f"""
        import warmboot
        from warmboot.errors import ContainerCrashedError
        try:
            warmboot.Function.from_name({app!r}, "alloc").remote(400)
        except ContainerCrashedError as exc:
            print("crashed:", exc)
        """
    )
    assert f"container {restored}" in out.stdout and "out of memory" in out.stdout, out.stdout


def test_restored_copy_has_a_fresh_network_namespace_with_loopback(platform: Platform) -> None:
    """Each restored copy gets a network namespace of its own (CRIU does not recreate the snapshot's), with
    loopback up: a server and a client inside the copy talk over 127.0.0.1."""
    app = _unique("snap-loopback")
    label = f"{app}.Echo"
    path = _deploy(
        platform,
        app,
        """
        import os
        import socket
        import threading

        meeting = modal.Volume.from_name(app.name + "-meet", create_if_missing=True)

        @app.cls(enable_memory_snapshot=True, volumes={"/meet": meeting})
        class Echo:
            @modal.method()
            def roundtrip(self, meet=0):
                import time

                # Check in, then wait (with a deadline) until `meet` containers have: the inputs are then
                # served by that many containers alive at once, each a copy of its own.
                open(f"/meet/{os.environ['WARMBOOT_CONTAINER_ID']}", "w").close()
                deadline = time.monotonic() + 60
                while len(os.listdir("/meet")) < meet and time.monotonic() < deadline:
                    time.sleep(0.05)
                with socket.create_server(("127.0.0.1", 0)) as listener:
                    got = []
                    thread = threading.Thread(target=lambda: got.append(listener.accept()[0].recv(5)))
                    thread.start()
                    with socket.create_connection(listener.getsockname(), timeout=5) as client:
                        client.sendall(b"hello")
                    thread.join(timeout=5)
                return {"echo": got[0].decode(), "netns": os.readlink("/proc/self/ns/net"),
                        "container": os.environ["WARMBOOT_CONTAINER_ID"]}
        """,
    )
    first = _call(platform, app, "Echo", "roundtrip")
    _new_cold_start(platform, app, path)
    copies = _call(platform, app, "Echo", "roundtrip", 3, spawn=2)  # the cold one's check-in, then two copies
    restored = _restored_ids(platform, label)
    assert sorted(r["container"] for r in copies) == sorted(restored), platform.log_text(app)[-3000:]
    assert [r["echo"] for r in [first, *copies]] == ["hello"] * 3
    assert copies[0]["netns"] != copies[1]["netns"], copies
