"""Device check: a CPU memory snapshot of a GPU function, through the worker's FunctionContainer.

The snap=True phase must see no GPU; after the snapshot point (cold boot) and after a restore, the function's
GPU must be there, and torch must find it. Prints what each phase saw; exit status 0 when all hold.
Run by bench/gpu_check.sh after the engine-level check, with the same environment.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle

from warmboot.errors import WarmbootError
from warmboot.worker import gpus
from warmboot.worker.container import BindMount
from warmboot.worker.runner import FunctionContainer, LaunchPlan
from warmboot.worker.snapshot import SnapshotStore

APP = """
import os
import warmboot as modal

app = modal.App("gpu-phases")

def seen():
    import torch
    return {"cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "node": os.path.exists("/dev/nvidia0"),
            "torch_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}

@app.cls(gpu="any", enable_memory_snapshot=True)
class Probe:
    @modal.enter(snap=True)
    def load(self):
        import torch
        self.weights = torch.arange(12, dtype=torch.float32).reshape(3, 4)
        self.snap_phase = seen()

    @modal.enter(snap=False)
    def setup(self):
        self.start_phase = seen()
        import torch
        if torch.cuda.is_available():
            self.weights = self.weights.to("cuda")

    @modal.method()
    def report(self):
        out = (self.weights @ self.weights.T).sum().item()
        return {"snap": self.snap_phase, "start": self.start_phase, "call": seen(),
                "on": str(self.weights.device), "result": out}
"""


def main() -> int:
    repo = Path(__file__).resolve().parent.parent
    python = sys.argv[1] if len(sys.argv) > 1 else sys.executable
    appdir = Path(tempfile.mkdtemp(prefix="gpu-phases-", dir="/var/tmp"))
    (appdir / "gpu_app.py").write_text(APP)
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LD_LIBRARY_PATH", "HOME")}
    plan = LaunchPlan(
        python=python,
        app_file="/app/gpu_app.py",
        tag="Probe",
        env=env,
        mounts=[BindMount(str(appdir), "/app", read_only=True)],
        label="gpu-phases.Probe",
        runtime_path=":".join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p),
        gpus=gpus.inventory(),
        gpus_after_snapshot=True,
    )
    store = SnapshotStore(Path(tempfile.mkdtemp(prefix="gpu-phases-snaps-", dir="/var/tmp")))
    args = cloudpickle.dumps(((), {}))
    results = {}
    try:
        t0 = time.monotonic()
        cold = FunctionContainer(plan, lambda cid, stream, line: print(f"  [{stream}] {line}", flush=True))
        cold.boot()
        snap = cold.checkpoint(store)
        cold.start({})
        outcome = cold.call("cold", "report", args, 120)
        results["cold"] = {"ms": round((time.monotonic() - t0) * 1000), **cloudpickle.loads(outcome["value"])}
        cold.kill()
        t0 = time.monotonic()
        copy = FunctionContainer(plan, lambda cid, stream, line: print(f"  [{stream}] {line}", flush=True))
        copy.restore(store, snap)
        copy.start({}, reseed=True)
        outcome = copy.call("restored", "report", args, 120)
        results["restored"] = {"ms": round((time.monotonic() - t0) * 1000), **cloudpickle.loads(outcome["value"])}
        copy.kill()
    except WarmbootError as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}")
        return 1
    print(json.dumps(results, indent=1))
    ok = all(
        r["snap"]["node"] is False
        and r["snap"]["torch_available"] is False
        and r["start"]["node"] is True
        and r["call"]["torch_available"] is True
        and r["on"].startswith("cuda")
        for r in results.values()
    )
    print("GPU PHASES:", "PASS" if ok else "FAIL (see above: which phase saw what)")
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
