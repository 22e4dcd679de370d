"""A real server keeping its state in PostgreSQL (``WARMBOOT_DATABASE_URL``): nothing in SQLite, and a restart
keeps apps and snapshots. The state modules' own tests run on both databases (tests/db_helpers.py)."""

from __future__ import annotations

import json
import uuid

import psycopg
from platform_helpers import Platform

from warmboot.devservices import postgres

APP = """
import os

import warmboot as modal

app = modal.App({name!r})
TOKEN = os.urandom(8).hex()


@app.function(enable_memory_snapshot=True)
def token(x):
    return {{"token": TOKEN, "x": x, "container": os.environ["WARMBOOT_CONTAINER_ID"]}}
"""


def _call(p: Platform, name: str, x: int) -> dict:
    out = p.python(
        f"import json, warmboot; print(json.dumps(warmboot.Function.from_name({name!r}, 'token').remote({x})))"
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_server_on_postgresql_keeps_apps_and_snapshots_across_a_restart(postgres_cluster: str) -> None:
    url = postgres.create_database(postgres_cluster)
    p = Platform(extra_env={"WARMBOOT_DATABASE_URL": url})
    p.start_server()
    try:
        name = f"pg-{uuid.uuid4().hex[:6]}"
        p.cli("deploy", str(p.write_app(name.replace("-", "_"), APP.format(name=name))))
        first = _call(p, name, 1)
        assert not (p.home / "state.db").exists(), "the state must not be in SQLite"

        p.restart_server()
        second = _call(p, name, 2)
        assert second["x"] == 2 and second["token"] == first["token"], "restored from the snapshot PostgreSQL knows"
        assert f"(container {second['container']}" in p.log_text(name)

        with psycopg.connect(url) as conn:
            apps = conn.execute("SELECT name, state FROM apps WHERE name = %s", (name,)).fetchall()
            snaps = conn.execute("SELECT state FROM snapshots WHERE app_name = %s", (name,)).fetchall()
            starts = conn.execute("SELECT kind FROM starts ORDER BY id").fetchall()
        assert apps == [(name, "deployed")] and snaps == [("ok",)]
        assert [k for (k,) in starts][-1] == "restore"
    finally:
        p.close()
