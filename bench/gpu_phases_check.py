"""Device check: a CPU memory snapshot of a GPU function, through the worker's FunctionContainer.

The snap=True phase must see no GPU; after the snapshot point (cold boot) and after a restore, the function's
GPU must be there, and torch must find it. Prints what each phase saw; exit status 0 when all hold.
Run by bench/gpu_check.sh after the engine-level check, with the same environment.

The container is built as the server builds a GPU function's (daemon.RunningApp): the image's layers, the host
driver's layer (gpus.driver_layer, with gpus.DRIVER_ENV), a layer with the app file under /root, the runtime
layer. The image is ``debian_slim().pip_install("torch")`` built by the images package (Debian and PyPI mirrors
needed), or a prebuilt root filesystem given as ``--layer DIR`` (repeatable, bottom first) with ``--python``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cloudpickle

from warmboot.errors import WarmbootError
from warmboot.sdk.image import Image
from warmboot.worker import cuda_checkpoint, gpus, runtime_lib
from warmboot.worker.images import build_image
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", action="append", help="a prebuilt root filesystem layer (repeatable, bottom first)")
    parser.add_argument("--python", help="with --layer: the interpreter, as a path inside that root filesystem")
    parser.add_argument("--images", default="/var/tmp/warmboot-gpu-check-images", help="where images are built")
    parser.add_argument(
        "--work",
        default="/var/tmp",
        help="where the code, driver and runtime layers and run dirs go (on another filesystem than '/' when "
        "'/' itself is a --layer: overlayfs refuses layers nested inside one another)",
    )
    parser.add_argument("host_python", nargs="?", help=argparse.SUPPRESS)  # what bench/gpu_check.sh still passes
    opts = parser.parse_args()
    if opts.host_python:
        parser.error("a host interpreter cannot run a function: it runs on a root filesystem (--layer, --python)")
    if bool(opts.layer) != bool(opts.python):
        parser.error("--layer and --python go together: the function runs on a root filesystem, not on the host")
    Path(opts.work).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-phases-", dir=opts.work))
    if opts.layer:
        layers, python, env = tuple(Path(p) for p in opts.layer), opts.python, {"PATH": os.environ["PATH"]}
    else:
        image = Image.debian_slim().pip_install("torch")
        built = build_image(image.to_spec(), root=Path(opts.images), progress=lambda line: print(f"  {line}"))
        layers, python, env = tuple(built.layers), built.python, dict(built.env)
    code = work / "code"  # the app file at /root, as the server's code layer holds it
    (code / "root").mkdir(parents=True)
    (code / "root" / "gpu_app.py").write_text(APP)
    os.chmod(code / "root", 0o700)
    driver = gpus.driver_layer(work / "drivers", cuda_checkpoint.driver_version() or "unknown")
    plan = LaunchPlan(
        python=python,
        app_file="/root/gpu_app.py",
        tag="Probe",
        env={**env, **gpus.DRIVER_ENV},
        layers=(*layers, driver, code, runtime_lib.ensure(work / "home")),
        containers_dir=work / "containers",
        network=False,  # the check needs no network (and the device machine may lack slirp4netns)
        label="gpu-phases.Probe",
        gpus=gpus.inventory(),
        gpus_after_snapshot=True,
    )
    store = SnapshotStore(work / "snapshots")
    args = cloudpickle.dumps(((), {}))
    results = {}
    started: list[FunctionContainer] = []

    def container() -> FunctionContainer:
        fc = FunctionContainer(plan, lambda cid, stream, line: print(f"  [{stream}] {line}", flush=True))
        started.append(fc)
        return fc

    try:
        t0 = time.monotonic()
        cold = container()
        cold.boot()
        snap = cold.checkpoint(store)
        cold.start({})
        outcome = cold.call("cold", "report", args, 120)
        results["cold"] = {"ms": round((time.monotonic() - t0) * 1000), **cloudpickle.loads(outcome["value"])}
        cold.kill()
        t0 = time.monotonic()
        copy = container()
        copy.restore(store, snap)
        copy.start({}, reseed=True)
        outcome = copy.call("restored", "report", args, 120)
        results["restored"] = {"ms": round((time.monotonic() - t0) * 1000), **cloudpickle.loads(outcome["value"])}
    except WarmbootError as exc:
        print(f"FAILED: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for fc in started:
            fc.kill()
        shutil.rmtree(work, ignore_errors=True)
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
