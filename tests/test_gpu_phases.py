"""Which GPUs a gpu= function's container sees in each phase, on a worker whose GPU is a stand-in.

This machine has no GPU, so the worker is pointed (WARMBOOT_GPU_DEVICES) at a device node the test makes:
a character device with /dev/null's numbers, named nvidia0. What is under test is warmboot's part: which
device nodes exist in the container's /dev, and what CUDA_VISIBLE_DEVICES says, before the snapshot point,
after it, and in a restored copy.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from platform_helpers import Platform

APP = """
import json, os
import warmboot as modal

app = modal.App({name!r})

def seen():
    return {{"node": os.path.exists("/dev/nvidia0"), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
             "null": os.path.exists("/dev/null")}}

@app.cls(gpu="any", enable_memory_snapshot={snapshot})
class Probe:
    @modal.enter(snap=True)
    def before(self):
        self.before_snapshot = seen()

    @modal.enter(snap=False)
    def after(self):
        self.after_snapshot = seen()

    @modal.method()
    def report(self):
        return json.dumps({{"snap": self.before_snapshot, "start": self.after_snapshot, "call": seen(),
                           "id": os.environ["WARMBOOT_CONTAINER_ID"]}})
"""


@pytest.fixture(scope="module")
def gpu_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    node = Path("/var/tmp") / f"warmboot-fake-gpu-{uuid.uuid4().hex[:8]}" / "nvidia0"
    node.parent.mkdir()
    os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
    p = Platform(extra_env={"WARMBOOT_GPU_DEVICES": str(node)})
    p.start_server()
    yield p
    p.close()
    node.unlink()
    node.parent.rmdir()


def _report(platform: Platform, app: str) -> dict:
    out = platform.python(f"import warmboot; print(warmboot.Cls.from_name({app!r}, 'Probe')().report.remote())")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cpu_snapshot_of_a_gpu_function_hides_the_gpu_until_after_the_snapshot(gpu_platform: Platform) -> None:
    app = f"gpu-phases-{uuid.uuid4().hex[:6]}"
    path = gpu_platform.write_app(app.replace("-", "_"), APP.format(name=app, snapshot=True))
    gpu_platform.cli("deploy", str(path))

    hidden = {"node": False, "cuda": "", "null": True}
    visible = {"node": True, "cuda": "0", "null": True}
    cold = _report(gpu_platform, app)
    assert (cold["snap"], cold["start"], cold["call"]) == (hidden, visible, visible)
    assert "Creating memory snapshot" in gpu_platform.log_text(app)

    gpu_platform.cli("app", "stop", app)
    gpu_platform.cli("deploy", str(path))
    restored = _report(gpu_platform, app)
    assert restored["id"] != cold["id"]
    assert f"(container {restored['id']}" in gpu_platform.log_text(app), "the second container must be a restore"
    assert (restored["snap"], restored["start"], restored["call"]) == (hidden, visible, visible)
    gpu_platform.cli("app", "stop", app)  # its container holds the one fake GPU until it idles out otherwise


def test_gpu_function_without_snapshots_sees_its_gpu_throughout(gpu_platform: Platform) -> None:
    app = f"gpu-plain-{uuid.uuid4().hex[:6]}"
    path = gpu_platform.write_app(app.replace("-", "_"), APP.format(name=app, snapshot=False))
    gpu_platform.cli("deploy", str(path))
    visible = {"node": True, "cuda": "0", "null": True}
    seen = _report(gpu_platform, app)
    assert (seen["snap"], seen["start"], seen["call"]) == (visible, visible, visible)
