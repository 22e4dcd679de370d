"""The CUDA checkpoint bindings and the GPU-snapshot path, on a machine without a GPU (the layouts, the
refusals, and the clean failure a GPU snapshot must give so that the pool falls back to a cold boot)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Running

from warmboot.errors import GpuSnapshotError, SnapshotError
from warmboot.worker import container as containers
from warmboot.worker import cuda_checkpoint as cc
from warmboot.worker import gpus
from warmboot.worker.runner import FunctionContainer, LaunchPlan
from warmboot.worker.snapshot import SnapshotStore

no_driver = pytest.mark.skipif(
    os.path.exists("/proc/driver/nvidia/version"), reason="this machine has an NVIDIA driver"
)

# A process that maps a file named like the driver library, as a CUDA process maps libcuda.so.1.
_MAPPER = (
    "import mmap, sys, time\n"
    "f = open(sys.argv[1], 'rb')\n"
    "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
    "print('mapped', flush=True)\n"
    "time.sleep(60)\n"
)


def _fake_libcuda(tmp_path: Path) -> Path:
    lib = tmp_path / "libcuda.so.1"
    lib.write_bytes(b"\0" * 4096)
    return lib


def test_argument_structs_match_the_cuda_header_layout() -> None:
    # cuda.h (CUDA 12.8+/13): every checkpoint argument struct is 64 bytes; members in header order.
    for struct in (
        cc.CUcheckpointLockArgs,
        cc.CUcheckpointCheckpointArgs,
        cc.CUcheckpointRestoreArgs,
        cc.CUcheckpointUnlockArgs,
    ):
        assert ctypes.sizeof(struct) == 64, struct.__name__
    assert [name for name, _ in cc.CUcheckpointLockArgs._fields_] == ["timeoutMs", "reserved0", "reserved1"]
    assert cc.CUcheckpointLockArgs.timeoutMs.offset == 0
    assert cc.CUcheckpointLockArgs.reserved0.offset == 4
    assert cc.CUcheckpointLockArgs.reserved1.offset == 8
    assert cc.CUcheckpointRestoreArgs.gpuPairs.offset == 0
    assert cc.CUcheckpointRestoreArgs.gpuPairsCount.offset == 8
    assert cc.CUcheckpointRestoreArgs.reserved.offset == 12
    assert cc.CUcheckpointCheckpointArgs.reserved.offset == 0
    assert cc.CUcheckpointUnlockArgs.reserved.offset == 0
    args = cc.CUcheckpointLockArgs(timeoutMs=1234)
    assert bytes(args)[:4] == (1234).to_bytes(4, sys.byteorder) and not any(bytes(args)[4:])


def test_gpu_snapshot_error_is_a_snapshot_error() -> None:
    # The pool falls back to a cold boot (and discards the snapshot) on any SnapshotError.
    assert issubclass(GpuSnapshotError, SnapshotError)


@no_driver
def test_the_api_is_unavailable_without_a_driver() -> None:
    assert cc.available() is False
    assert cc.driver_version() is None
    with pytest.raises(GpuSnapshotError, match="not available"):
        cc.state(os.getpid())
    with pytest.raises(GpuSnapshotError):
        cc.lock(os.getpid(), 100)


def test_suspend_and_resume_of_processes_without_cuda_do_nothing() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert cc.cuda_pids([proc.pid]) == []
        assert cc.suspend([proc.pid]) == []
        assert cc.resume([proc.pid]) == []
        assert proc.poll() is None  # never stopped or harmed
    finally:
        proc.kill()
        proc.wait()


@no_driver
def test_suspend_refuses_a_process_that_maps_libcuda_when_the_api_is_missing(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _MAPPER, str(_fake_libcuda(tmp_path))], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"mapped\n"
        assert cc.cuda_pids([proc.pid]) == [proc.pid]
        with pytest.raises(GpuSnapshotError, match="not available"):
            cc.suspend([proc.pid])
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def _plan(**overrides: object) -> LaunchPlan:
    base: dict[str, object] = {
        "python": "/usr/bin/python3",
        "app_file": "/app.py",
        "tag": "f",
        "env": {},
        "layers": (),
        "containers_dir": Path("/nonexistent"),
    }
    base.update(overrides)
    return LaunchPlan(**base)  # type: ignore[arg-type]


def test_which_plans_take_gpu_snapshots() -> None:
    inv = gpus.GpuInventory(("/dev/nvidia0",), ())
    assert FunctionContainer(_plan(gpus=inv), print).gpu_snapshot
    assert not FunctionContainer(_plan(gpus=inv, gpus_after_snapshot=True), print).gpu_snapshot
    assert not FunctionContainer(_plan(), print).gpu_snapshot


@no_driver
def test_a_failed_gpu_checkpoint_raises_a_snapshot_error_and_publishes_nothing(
    tmp_path: Path, running: Running
) -> None:
    lib_dir = tmp_path / "driver"
    lib_dir.mkdir()
    _fake_libcuda(lib_dir)
    store = SnapshotStore(tmp_path / "snapshots")
    fc = FunctionContainer(_plan(gpus=gpus.GpuInventory((), ())), lambda *_: None)
    # The fake driver library reaches the container through a volume: the container sees nothing else of the host.
    fc.container = running.start(
        [running.image.python, "-c", _MAPPER, "/driver/libcuda.so.1"],
        mounts=(containers.BindMount(str(lib_dir), "/driver", read_only=True),),
    )
    try:
        assert fc.container.channels.stdout.readline() == b"mapped\n"
        assert cc.cuda_pids(fc.container.pids()), "the mapped libcuda.so.1 is not seen in the container's maps"
        with pytest.raises(SnapshotError) as info:
            fc.checkpoint(store, app="a", tag="f", key="k")
        assert isinstance(info.value, GpuSnapshotError)
        assert store.list() == []
        assert fc.container.is_running()  # the cold-booted container can still serve
    finally:
        fc.kill()


def test_gpu_request_on_a_machine_without_gpus_names_the_option() -> None:
    from warmboot.errors import UnsupportedOptionError
    from warmboot.worker import gpus

    with pytest.raises(UnsupportedOptionError, match=r"gpu='h100'.*no NVIDIA GPU"):
        gpus.check_request("h100", "app.f", gpus.GpuInventory((), ()))


def test_gpu_count_beyond_the_machine_is_refused_naming_what_it_has() -> None:
    from warmboot.errors import UnsupportedOptionError
    from warmboot.worker import gpus

    one = gpus.GpuInventory(("/dev/nvidia0",), ())
    gpus.check_request("any", "app.f", one)
    with pytest.raises(UnsupportedOptionError, match=r"asks for 2 GPUs; this machine has"):
        gpus.check_request("any:2", "app.f", one)
