"""Two servers (two agents' homes) sharing one S3 bucket: a snapshot one makes, the other restores.

Real servers, the real CLI and SDK, a real S3 server (SeaweedFS, tests/s3_helpers.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import minio
import pytest
from platform_helpers import Platform, wait_for
from s3_helpers import s3_server  # noqa: F401 - the session's S3 server

from warmboot.worker.snapshot_remote import S3Settings

APP = """
import os

import warmboot as modal

app = modal.App({name!r})
TOKEN = os.urandom(8).hex()  # drawn at import: a restored copy has the token of the snapshot's container
TABLE = list(range(300_000))  # pages enough for several chunks


@app.function(enable_memory_snapshot=True)
def token(x):
    return {{"token": TOKEN, "value": TABLE[x], "container": os.environ["WARMBOOT_CONTAINER_ID"]}}
"""


@pytest.fixture
def shared(s3_server: S3Settings, tmp_path: Path) -> Iterator[tuple[S3Settings, dict[str, str]]]:  # noqa: F811
    bucket = f"share-{uuid.uuid4().hex[:8]}"
    secret = tmp_path / "s3-secret"
    secret.write_text(s3_server.secret_key)
    env = {
        "WARMBOOT_S3_ENDPOINT": f"http://{s3_server.endpoint}",
        "WARMBOOT_S3_ACCESS_KEY": s3_server.access_key,
        "WARMBOOT_S3_SECRET_KEY_FILE": str(secret),
        "WARMBOOT_S3_BUCKET": bucket,
    }
    yield S3Settings(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket, secure=False), env


@pytest.fixture
def agents(shared: tuple[S3Settings, dict[str, str]]) -> Iterator[list[Platform]]:
    made: list[Platform] = []

    def new() -> Platform:
        p = Platform(extra_env=shared[1])
        p.start_server()
        made.append(p)
        return p

    yield [new(), new(), new()]
    for p in made:
        p.close()


def _deploy_and_call(agent: Platform, name: str, x: int) -> dict:
    path = agent.write_app(name.replace("-", "_"), APP.format(name=name))
    agent.cli("deploy", str(path))
    out = agent.python(
        f"import json, warmboot; print(json.dumps(warmboot.Function.from_name({name!r}, 'token').remote({x})))"
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_snapshot_made_on_one_agent_is_fetched_and_restored_on_another(
    agents: list[Platform], shared: tuple[S3Settings, dict[str, str]]
) -> None:
    first, second, third = agents
    name = f"shared-{uuid.uuid4().hex[:6]}"
    label = f"{name}.token"
    made = _deploy_and_call(first, name, 1)
    assert made["value"] == 1
    pushed = wait_for(
        "the first agent pushed its snapshot",
        lambda: "Pushed memory snapshot" in first.log_text(name),
        watch=first.home / "logs",
    )
    assert pushed

    restored = _deploy_and_call(second, name, 2)
    assert restored["value"] == 2
    assert restored["token"] == made["token"], "the second agent's container must be a copy of the first's snapshot"
    log = second.log_text(name)
    assert "Fetched memory snapshot" in log and f"Restored {label} from memory snapshot" in log, log
    assert "fetched from object storage" in log and f"(container {restored['container']}" in log
    assert "Creating memory snapshot" not in log, "the second agent must not make a snapshot of its own"

    # A chunk lost from the bucket: the third agent's fetch fails by name, and the input is served cold.
    settings = shared[0]
    client = minio.Minio(settings.endpoint, settings.access_key, settings.secret_key, secure=False)
    chunk = next(o.object_name for o in client.list_objects(settings.bucket, prefix="chunks/"))
    client.remove_object(settings.bucket, chunk)
    cold = _deploy_and_call(third, name, 3)
    assert cold["value"] == 3 and cold["token"] != made["token"], "a cold boot draws its own token"
    log = third.log_text(name)
    assert "Fetching the memory snapshot" in log and "is missing from object storage" in log, log
    assert f"Container {cold['container']} started for {label} (cold boot" in log
