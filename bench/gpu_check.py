"""One device check of GPU memory snapshots (issue 6), using the engine directly.

A container runs a small torch MLP on the GPU (fixed seed), keeps its output and a ballast tensor on the
device, and answers requests on its control pipes. The check times the cold start to the first answer,
then does what a GPU-snapshot function's checkpoint does (lock + checkpoint its CUDA processes, CRIU dump
leaving it running, restore + unlock the original), asks the original again, restores copies (CRIU
restore, then restore + unlock their CUDA processes) and compares their answers with the original's
exactly (torch.equal). Before the GPU run it does the same round trip with a CPU-only child, so a CRIU or
mount problem of the machine is told apart from a CUDA one.

    python bench/gpu_check.py             # on a GPU machine (see bench/gpu_check.sh)
    python bench/gpu_check.py --dry-run   # here: the CPU-only round trip, every CUDA step skipped

The containers are function containers: an image's layers, the host driver's layer (gpus.driver_layer, as the
server gives GPU functions) and the runtime layer. The images are built by the images package (the CPU child on
``debian_slim``, the GPU child on ``debian_slim().pip_install("torch")``), which needs Debian and PyPI mirrors;
on a machine that has none, pass a prebuilt root filesystem with ``--layer DIR`` (repeatable, bottom first)
and ``--python`` (its interpreter, as a path inside it).

Every step prints what it does; CRIU's error lines and log tail are printed on failure; a watchdog ends
the run (with tracebacks) before the device call's limit. Output is copied to $OUT/gpu_check.log.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import select
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from warmboot.errors import CheckpointError, SnapshotError, WarmbootError
from warmboot.sdk.image import Image
from warmboot.worker import container as containers
from warmboot.worker import criu, cuda_checkpoint, gpus, runtime_lib
from warmboot.worker.images import build_image
from warmboot.worker.snapshot import SnapshotStore

OUT = Path(os.environ.get("OUT") or "/tmp/gpu_check_out")

CPU_CHILD = r"""
import json, os, random
rng = random.Random(0)
stored = [rng.random() for _ in range(200000)]
cin = os.fdopen(3, "rb", buffering=0)
cout = os.fdopen(4, "wb", buffering=0)
for line in cin:
    if line.strip() == b"exit":
        break
    fresh = random.Random(0).random()
    reply = {"pid": os.getpid(), "stored": repr(sum(stored)), "fresh": repr(fresh), "ballast_ok": True}
    cout.write(json.dumps(reply).encode() + b"\n")
"""

GPU_CHILD = r"""
import json, os, sys, time
t0 = time.monotonic()
import torch
torch.manual_seed(0)
dev = torch.device("cuda")
model = torch.nn.Sequential(
    torch.nn.Linear(256, 1024), torch.nn.GELU(),
    torch.nn.Linear(1024, 1024), torch.nn.GELU(),
    torch.nn.Linear(1024, 16),
).to(dev).eval()
x = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)).to(dev)
ballast = torch.full((int(os.environ.get("GPU_CHECK_MB", "256")) * 262144,), 3.0, device=dev)
with torch.no_grad():
    stored = model(x)
torch.cuda.synchronize()
print(f"child: model ready on {torch.cuda.get_device_name()} in {time.monotonic() - t0:.2f} s", flush=True)
cin = os.fdopen(3, "rb", buffering=0)
cout = os.fdopen(4, "wb", buffering=0)
for line in cin:
    if line.strip() == b"exit":
        break
    with torch.no_grad():
        fresh = model(x)
    torch.cuda.synchronize()
    reply = {
        "pid": os.getpid(),
        "stored": stored.cpu().numpy().tobytes().hex(),
        "fresh": fresh.cpu().numpy().tobytes().hex(),
        "ballast_ok": bool((ballast == 3.0).all().item()),
        "device": torch.cuda.get_device_name(),
    }
    cout.write(json.dumps(reply).encode() + b"\n")
"""


class Tee:
    def __init__(self, stream: Any, log: Any):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        self.log.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def fileno(self) -> int:
        return self.stream.fileno()


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def sh(cmd: str, timeout: float = 30) -> str:
    try:
        proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout)
        return (proc.stdout + proc.stderr).strip()
    except subprocess.TimeoutExpired:
        return f"(timed out after {timeout} s)"


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(cannot read {path}: {exc})"


def keep(path: Path, name: str) -> None:
    """Copy a log into $OUT (the device tool brings back at most 8 files)."""
    with contextlib.suppress(OSError):
        shutil.copy(path, OUT / name)


def report_error(exc: BaseException, label: str) -> None:
    say(f"FAILED {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    if isinstance(exc, SnapshotError) and exc.criu_errors:
        print("  CRIU error lines:\n    " + "\n    ".join(exc.criu_errors))
    if not isinstance(exc, WarmbootError):
        traceback.print_exception(exc)


class Rootfs:
    """A container's root filesystem (layers bottom first, the runtime layer on top) and its run directories."""

    def __init__(self, layers: tuple[Path, ...], python: str, env: dict[str, str], work: Path):
        self.layers, self.python, self.env, self.work = layers, python, env, work
        self.serial = 0

    def run_dir(self) -> Path:
        self.serial += 1
        return self.work / "containers" / f"c{self.serial}"


def rootfs(kind: str, args: argparse.Namespace, work: Path) -> Rootfs:
    """The image for ``kind`` ("cpu" or "gpu"): ``--layer`` if given, else built; GPU: plus the driver's layer."""
    if args.layer:
        layers, python, env = tuple(Path(p) for p in args.layer), args.python, {"PATH": os.environ["PATH"]}
    else:
        image = Image.debian_slim() if kind == "cpu" else Image.debian_slim().pip_install("torch")
        say(f"[{kind}] building (or finding cached) the image under {args.images}")
        built = build_image(image.to_spec(), root=Path(args.images), progress=lambda line: print(f"  {line}"))
        layers, python, env = tuple(built.layers), built.python, dict(built.env)
    if kind == "gpu":
        # The host driver's user-space libraries, as the server gives a GPU function (daemon.RunningApp).
        version = cuda_checkpoint.driver_version() or "unknown"
        layers = (*layers, gpus.driver_layer(work / "drivers", version))
        env = {**env, **gpus.DRIVER_ENV}
    return Rootfs((*layers, runtime_lib.ensure(work / "home")), python, env, work)


class Box:
    """One container and a line reader on its control-out pipe."""

    def __init__(self, c: containers.Container, label: str):
        self.c, self.label, self.buf = c, label, b""

    def ask(self, timeout: float) -> dict[str, Any]:
        self.c.channels.control_in.write(b"go\n")
        fd = self.c.channels.control_out.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.label}: no answer within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"{self.label}: control pipe closed (exit {self.c.returncode}); see its stderr")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def output(self) -> str:
        """What the container printed (stdout and stderr), once it is dead; non-blocking read otherwise."""
        text = []
        for stream in (self.c.channels.stdout, self.c.channels.stderr):
            with contextlib.suppress(OSError, ValueError):
                os.set_blocking(stream.fileno(), False)
                while True:
                    try:
                        chunk = os.read(stream.fileno(), 1 << 16)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    text.append(chunk.decode(errors="replace"))
        return "".join(text).strip()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.c.kill(timeout=10)


def same(a: dict[str, Any], b: dict[str, Any], key: str, gpu: bool) -> bool:
    if not gpu:
        return a[key] == b[key]
    import torch

    ta = torch.frombuffer(bytearray(bytes.fromhex(a[key])), dtype=torch.float32)
    tb = torch.frombuffer(bytearray(bytes.fromhex(b[key])), dtype=torch.float32)
    return bool(torch.equal(ta, tb))


def diagnose_dump(pid: int, work: Path) -> None:
    """After a failed dump: dump again (leaving it running) with the log kept, and print its tail."""
    diag = work / "diag-dump"
    shutil.rmtree(diag, ignore_errors=True)
    diag.mkdir(parents=True)
    with contextlib.suppress(Exception):
        result = criu.run(
            ["dump", "-t", str(pid), "-D", str(diag), "--leave-running"], log_path=diag / "dump.log", timeout=60
        )
        say(f"diagnostic CRIU dump exit {result.returncode}; log tail:")
        print(tail(diag / "dump.log", 60))
        keep(diag / "dump.log", "criu-diag-dump.log")


def round_trip(kind: str, args: argparse.Namespace, store: SnapshotStore, work: Path) -> dict[str, Any]:
    """Cold start, checkpoint (CUDA suspended around it for GPU), restore copies; return the results."""
    gpu = kind == "gpu"
    res: dict[str, Any] = {"kind": kind, "ok": False}
    boxes: list[Box] = []
    try:
        fs = rootfs(kind, args, work)
        env = {**fs.env, "PYTHONUNBUFFERED": "1", "GPU_CHECK_MB": str(args.gpu_mb)}
        devices: tuple[str, ...] = ()
        if gpu:
            inv = gpus.inventory()
            devices = inv.nodes()
            env.update(inv.visible_env())
            say(f"[{kind}] device nodes {list(devices)}; driver layer {fs.layers[-2]}; env {env}")
        spec = containers.ContainerSpec(
            argv=[fs.python, "-c", GPU_CHILD if gpu else CPU_CHILD],
            layers=fs.layers,
            run_dir=fs.run_dir(),
            env=env,
            cwd="/root",
            devices=devices,
        )
        say(f"[{kind}] starting container: {fs.python} -c <child> on {len(fs.layers)} layers")
        t0 = time.monotonic()
        original = Box(containers.start(spec), f"{kind} original")
        boxes.append(original)
        try:
            first = original.ask(args.cold_timeout)
        except Exception:
            say(f"[{kind}] child output:\n{original.output()}")
            raise
        res["cold_ms"] = (time.monotonic() - t0) * 1000
        say(f"[{kind}] cold start to first answer: {res['cold_ms']:.0f} ms (pid {first['pid']} in its namespace)")
        say(f"[{kind}] child said: {original.output()[:500]}")
        pids = original.c.pids()
        say(f"[{kind}] container processes: {pids}")

        suspended: list[int] = []
        if gpu:
            cpids = cuda_checkpoint.cuda_pids(pids)
            say(f"[{kind}] CUDA processes: {cpids}; states {[cuda_checkpoint.state(p) for p in cpids]}")
            t = time.monotonic()
            suspended = cuda_checkpoint.suspend(pids, timeout_ms=args.lock_timeout_ms)
            res["suspend_ms"] = (time.monotonic() - t) * 1000
            say(
                f"[{kind}] suspended {suspended} in {res['suspend_ms']:.0f} ms; states "
                f"{[cuda_checkpoint.state(p) for p in suspended]} (2 = checkpointed)"
            )
        t = time.monotonic()
        try:
            snap = store.checkpoint(original.c, leave_running=True, metadata={"gpu_snapshot": gpu, "check": kind})
        except CheckpointError:
            diagnose_dump(original.c.pid, work)
            if suspended:
                cuda_checkpoint.resume(suspended)
            raise
        res["dump_ms"] = (time.monotonic() - t) * 1000
        res["size_mb"] = snap.size_bytes / 1e6
        res["pages_mb"] = snap.pages_bytes / 1e6
        say(f"[{kind}] CRIU dump: {res['dump_ms']:.0f} ms, snapshot {res['size_mb']:.1f} MB, id {snap.id}")
        if gpu:
            t = time.monotonic()
            resumed = cuda_checkpoint.resume(suspended)
            res["resume_original_ms"] = (time.monotonic() - t) * 1000
            say(f"[{kind}] original resumed {resumed} in {res['resume_original_ms']:.0f} ms")
        again = original.ask(args.restore_timeout)
        res["original_again_equal"] = same(first, again, "stored", gpu) and same(first, again, "fresh", gpu)
        say(f"[{kind}] original answers again after the snapshot: equal={res['original_again_equal']}")
        original.kill()

        restores = []
        for i in range(args.restores):
            say(f"[{kind}] restore {i + 1}/{args.restores}")
            t = time.monotonic()
            try:
                copy_c = store.restore(snap, fs.run_dir())
            except SnapshotError as exc:
                report_error(exc, "CRIU restore")
                logs = sorted(store.root.joinpath(".logs").glob("restore-*.log"), key=os.path.getmtime)
                if logs:
                    say(f"restore log {logs[-1]} tail:")
                    print(tail(logs[-1], 60))
                    keep(logs[-1], f"criu-restore-{kind}.log")
                raise
            copy = Box(copy_c, f"{kind} copy {i + 1}")
            boxes.append(copy)
            t_criu = time.monotonic()
            if gpu:
                resumed = cuda_checkpoint.resume(copy_c.pids())
                say(f"[{kind}] copy CUDA processes resumed: {resumed}")
            t_cuda = time.monotonic()
            try:
                answer = copy.ask(args.restore_timeout)
            except Exception:
                say(f"[{kind}] copy output:\n{copy.output()}")
                raise
            t_end = time.monotonic()
            row = {
                "restore_ms": (t_end - t) * 1000,
                "check_ms": copy_c.timings.get("check_ms", 0),
                "criu_restore_ms": copy_c.timings.get("criu_restore_ms", 0),
                "cuda_resume_ms": (t_cuda - t_criu) * 1000,
                "first_answer_ms": (t_end - t_cuda) * 1000,
                "stored_equal": same(first, answer, "stored", gpu),
                "fresh_equal": same(first, answer, "fresh", gpu),
                "ballast_ok": answer.get("ballast_ok"),
            }
            restores.append(row)
            say(
                f"[{kind}] restore {i + 1}: "
                + ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
            )
            copy.kill()
        res["restores"] = restores
        res["ok"] = bool(restores) and all(r["stored_equal"] and r["fresh_equal"] and r["ballast_ok"] for r in restores)
    except Exception as exc:  # noqa: BLE001 - the check reports every failure and goes on
        report_error(exc, f"{kind} round trip")
        res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for box in boxes:
            box.kill()
    return res


def environment(args: argparse.Namespace) -> None:
    say("environment")
    print(sh("uname -r; id -u; nproc"))
    print("python:", sys.executable, sys.version.split()[0])
    if not args.dry_run:
        print(sh("nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader"))
        print(sh("nvidia-smi | head -15"))
        print(sh("cat /proc/driver/nvidia/version"))
    print(
        f"cuda_checkpoint.available()={cuda_checkpoint.available()} driver_version={cuda_checkpoint.driver_version()}"
    )
    print(f"GPU inventory: {gpus.inventory()}")
    print(f"CRIU: {criu.binary()} version {criu.version()}")
    print(sh(f"{criu.binary()} check 2>&1 | tail -5", timeout=60))
    print("mounts:\n" + sh("findmnt -rno TARGET,FSTYPE | head -40"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU round trip only; skip every CUDA step")
    parser.add_argument("--layer", action="append", help="a prebuilt root filesystem layer (repeatable, bottom first)")
    parser.add_argument("--python", help="with --layer: the interpreter, as a path inside that root filesystem")
    parser.add_argument("--images", default="/var/tmp/warmboot-gpu-check-images", help="where images are built")
    parser.add_argument("--gpu-mb", type=int, default=256, help="MB of ballast the child keeps on the GPU")
    parser.add_argument("--restores", type=int, default=2)
    parser.add_argument("--cold-timeout", type=float, default=120)
    parser.add_argument("--restore-timeout", type=float, default=60)
    parser.add_argument("--lock-timeout-ms", type=int, default=10_000)
    parser.add_argument("--deadline", type=float, default=260, help="seconds before the watchdog ends the run")
    parser.add_argument("--work", default="/var/tmp/warmboot-gpu-check")
    args = parser.parse_args()
    if bool(args.layer) != bool(args.python):
        # bench/gpu_check.sh passed --python alone (a host venv's torch): a container no longer sees the host.
        parser.error("--layer and --python go together: the child runs on a root filesystem, not on the host")

    OUT.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "gpu_check.log", "w")  # noqa: SIM115
    sys.stdout = Tee(sys.__stdout__, log)
    sys.stderr = Tee(sys.__stderr__, log)
    faulthandler.dump_traceback_later(args.deadline, exit=True, file=sys.__stderr__)

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results = []
    try:
        environment(args)
        store = SnapshotStore(work / "snapshots")
        results.append(round_trip("cpu", args, store, work))
        if not args.dry_run:
            results.append(round_trip("gpu", args, store, work))
    except Exception as exc:  # noqa: BLE001 - the check reports every failure and goes on
        report_error(exc, "setup")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    say("SUMMARY")
    for r in results:
        print(f"  {r['kind']}: ok={r['ok']}" + (f" error={r['error']}" if "error" in r else ""))
        if "cold_ms" in r:
            print(f"    cold start to first answer: {r['cold_ms']:.0f} ms")
        if "size_mb" in r:
            print(f"    snapshot: {r['size_mb']:.1f} MB (pages {r['pages_mb']:.1f} MB), dump {r['dump_ms']:.0f} ms")
        if "suspend_ms" in r:
            print(
                f"    CUDA lock+checkpoint {r['suspend_ms']:.0f} ms, "
                f"original restore+unlock {r.get('resume_original_ms', 0):.0f} ms"
            )
        if "original_again_equal" in r:
            print(f"    original answers the same after the snapshot: {r['original_again_equal']}")
        for i, row in enumerate(r.get("restores", []), 1):
            print(
                f"    restore {i}: {row['restore_ms']:.0f} ms to first answer (checks {row['check_ms']:.0f}, CRIU "
                f"{row['criu_restore_ms']:.0f}, CUDA restore+unlock {row['cuda_resume_ms']:.0f}, answer "
                f"{row['first_answer_ms']:.0f}); outputs equal: stored={row['stored_equal']} "
                f"fresh={row['fresh_equal']} ballast_ok={row['ballast_ok']}"
            )
    if not args.dry_run:
        print(
            "  driver:",
            cuda_checkpoint.driver_version(),
            "|",
            sh("nvidia-smi --query-gpu=name,driver_version --format=csv,noheader"),
        )
    ok = bool(results) and all(r["ok"] for r in results)
    say("RESULT: " + ("PASS" if ok else "FAIL"))
    faulthandler.cancel_dump_traceback_later()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
