"""This worker's NVIDIA GPUs, and putting their device nodes into a container.

A CPU memory snapshot of a GPU function must be taken with no GPU visible (a CUDA context cannot be
checkpointed by CRIU alone), so such a container boots with a /dev that lacks the GPU nodes and
``CUDA_VISIBLE_DEVICES`` empty; its GPUs are added, and the variables set, only after the snapshot point.
The driver's user-space files reach the container as a layer of their own (:func:`driver_layer`).
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from warmboot.errors import ContainerError, UnsupportedOptionError

#: Overrides discovery (colon-separated device node paths): for machines whose GPUs are not at /dev/nvidiaN.
DEVICES_ENV = "WARMBOOT_GPU_DEVICES"
_CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset")


@dataclass(frozen=True)
class Gpu:
    """One GPU of this worker: its host index, device node and model name ("" where the driver does not say)."""

    index: int
    node: str
    model: str = ""

    def matches(self, kind: str) -> bool:
        """Whether a ``gpu=`` type (``"h100"``, ``"any"``) fits this GPU; a GPU of unknown model fits any type."""
        wanted = kind.strip().lower()
        return wanted in ("", "any") or not self.model or wanted in self.model.lower()


@dataclass(frozen=True)
class GpuInventory:
    """Device nodes of the GPUs (one per GPU, in index order) and of the driver's control devices.

    ``indices`` are the GPUs' host indices (their positions when not given), ``models`` their model names
    (unknown when not given): a container given a :meth:`subset` sees those GPUs and no others.
    """

    gpus: tuple[str, ...]
    control: tuple[str, ...]
    indices: tuple[int, ...] = ()
    models: tuple[str, ...] = ()

    def devices(self) -> tuple[Gpu, ...]:
        indices = self.indices or tuple(range(len(self.gpus)))
        models = self.models or ("",) * len(self.gpus)
        return tuple(Gpu(i, node, model) for i, node, model in zip(indices, self.gpus, models, strict=True))

    def matching(self, kind: str) -> tuple[Gpu, ...]:
        """The GPUs a ``gpu=`` type fits."""
        return tuple(g for g in self.devices() if g.matches(kind))

    def subset(self, indices: Iterable[int]) -> GpuInventory:
        """These GPUs (by host index) with the control nodes: what one container gets."""
        wanted = set(indices)
        chosen = [g for g in self.devices() if g.index in wanted]
        missing = wanted - {g.index for g in chosen}
        if missing:
            raise ValueError(f"no GPU with index {sorted(missing)} in {self}")
        return GpuInventory(
            tuple(g.node for g in chosen),
            self.control,
            tuple(g.index for g in chosen),
            tuple(g.model for g in chosen),
        )

    def nodes(self) -> tuple[str, ...]:
        return self.gpus + self.control

    def visible_env(self) -> dict[str, str]:
        """The variables that show a process the GPUs of this inventory.

        A container has only these GPUs' device nodes, so CUDA numbers them from 0 (``CUDA_VISIBLE_DEVICES``
        counts from 0); ``NVIDIA_VISIBLE_DEVICES`` names their host indices, as NVIDIA's container toolkit does.
        """
        return {
            "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(self.gpus))),
            "NVIDIA_VISIBLE_DEVICES": ",".join(str(g.index) for g in self.devices()),
        }


HIDDEN_ENV = {
    "CUDA_VISIBLE_DEVICES": "",
    "NVIDIA_VISIBLE_DEVICES": "void",
    # torch.cuda.is_available() then asks NVML instead of initialising CUDA: an initialisation that found no
    # GPU is cached for the life of the process, and would make the GPUs added after the snapshot invisible.
    "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
}


def inventory() -> GpuInventory:
    """The GPUs of this worker (empty when it has none), with their host indices and, where known, models."""
    configured = os.environ.get(DEVICES_ENV)
    if configured is not None:
        gpus = tuple(p for p in configured.split(":") if p)
    else:
        gpus = tuple(sorted(glob.glob("/dev/nvidia[0-9]*"), key=lambda p: int(p.removeprefix("/dev/nvidia"))))
    control = tuple(p for p in _CONTROL_NODES if os.path.exists(p)) if gpus else ()
    # /dev/nvidiaN is the GPU of device minor N; a node named otherwise (WARMBOOT_GPU_DEVICES) goes by position.
    names = [re.fullmatch(r"nvidia(\d+)", os.path.basename(p)) for p in gpus]
    minors = tuple(int(m.group(1)) for m in names if m)
    if len(set(minors)) != len(gpus):
        return GpuInventory(gpus, control)
    by_minor = _models_by_minor()
    return GpuInventory(gpus, control, minors, tuple(by_minor.get(i, "") for i in minors))


def _models_by_minor() -> dict[int, str]:
    """Model names by device minor, from the driver's ``information`` files."""
    found: dict[int, str] = {}
    for info in glob.glob("/proc/driver/nvidia/gpus/*/information"):
        fields: dict[str, str] = {}
        with contextlib.suppress(OSError), open(info) as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if fields.get("Device Minor", "").isdigit():
            found[int(fields["Device Minor"])] = fields.get("Model", "")
    return found


def add_to_container(init_pid: int, nodes: tuple[str, ...]) -> None:
    """Create these device nodes (same type, major and minor) in a running container's /dev.

    Written from the host through ``/proc/PID/root``: the container itself cannot create device nodes
    (it lacks CAP_MKNOD), so nothing but the worker puts a GPU in front of it.
    """
    dev = f"/proc/{init_pid}/root/dev"
    for node in nodes:
        st = os.stat(node)
        target = os.path.join(dev, os.path.basename(node))
        try:
            if not os.path.exists(target):
                os.mknod(target, 0o666 | (st.st_mode & 0o170000), st.st_rdev)
            os.chmod(target, 0o666)
        except OSError as exc:
            raise ContainerError(f"could not add GPU device {node} to container {init_pid}: {exc}") from exc


def models() -> list[str]:
    """The GPUs' model names from the driver (e.g. "NVIDIA H200"); empty where the driver does not say."""
    found = []
    for info in sorted(glob.glob("/proc/driver/nvidia/gpus/*/information")):
        with open(info) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    found.append(value.strip())
    return found


def parse_request(gpu: str) -> tuple[str, int]:
    """A ``gpu=`` option as (type, count): ``"h100:2"`` is ("h100", 2), ``"any"`` is ("any", 1)."""
    kind, _, count_text = str(gpu).partition(":")
    return kind.strip(), int(count_text) if count_text.strip().isdigit() else 1


def check_request(gpu: str, label: str, inventory_: GpuInventory | None = None) -> None:
    """Refuse a ``gpu=`` request this worker cannot honour, naming what it has.

    ``gpu`` is ``"any"`` or a type such as ``"h100"``/``"A10G"``, optionally with a count (``"h100:2"``).
    """
    have = inventory_ or inventory()
    kind, count = parse_request(gpu)
    names = models()
    described = ", ".join(names) if names else f"{len(have.gpus)} GPU(s) of unknown type"
    if not have.gpus:
        raise UnsupportedOptionError(
            f"{label}: gpu={gpu!r} cannot be honoured: this machine has no NVIDIA GPU (no /dev/nvidia* devices). "
            "Remove gpu= or deploy on a machine with one."
        )
    if count < 1:
        raise UnsupportedOptionError(f"{label}: gpu={gpu!r} asks for no GPU; ask for at least one, or remove gpu=")
    if count > len(have.gpus):
        raise UnsupportedOptionError(f"{label}: gpu={gpu!r} asks for {count} GPUs; this machine has {described}")
    wanted = kind.lower()
    if wanted not in ("", "any") and names and not any(wanted in n.lower() for n in names):
        raise UnsupportedOptionError(
            f"{label}: gpu={gpu!r} cannot be honoured: this machine has {described}; use gpu='any' or one of its types"
        )
    fitting = have.matching(kind)
    if count > len(fitting):
        raise UnsupportedOptionError(
            f"{label}: gpu={gpu!r} asks for {count} GPUs of that type; this machine has {len(fitting)} "
            f"(all its GPUs: {described})"
        )


#: Where a GPU function's container finds the host driver's user-space files (as NVIDIA's container toolkit does).
DRIVER_DIR = "/usr/local/nvidia"
DRIVER_ENV = {"LD_LIBRARY_PATH": f"{DRIVER_DIR}/lib64", "NVIDIA_DRIVER_DIR": DRIVER_DIR}
_DRIVER_LIBRARIES = re.compile(r"^lib(cuda|nvidia-[\w-]+|nvcuvid|cudadebugger|nvoptix)\.so(\.[\d.]+)?$")
_DRIVER_BINARIES = ("nvidia-smi", "nvidia-debugdump")


def driver_layer(root: Path, version: str) -> Path:
    """A layer holding the host NVIDIA driver's libraries and tools under :data:`DRIVER_DIR`.

    The user-space driver must match the kernel module, so it comes from the host, never from the image.
    A layer rather than bind mounts: a container's mounts are recreated at every restore, a layer costs nothing.
    Files are hard-linked where the layer shares the host's filesystem, copied otherwise; one layer per version.
    """
    target = root / f"nvidia-{version}"
    if target.is_dir():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    lib, bin_ = tmp / DRIVER_DIR.lstrip("/") / "lib64", tmp / DRIVER_DIR.lstrip("/") / "bin"
    lib.mkdir(parents=True)
    bin_.mkdir()
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        name, _, path = line.strip().partition(" => ")
        name = name.split(" ", 1)[0]
        if _DRIVER_LIBRARIES.match(name) and "x86-64" in line and os.path.exists(path):
            _link_or_copy(Path(path).resolve(), lib / Path(path).resolve().name)
            if name != Path(path).resolve().name and not (lib / name).exists():
                os.symlink(Path(path).resolve().name, lib / name)
    for tool in _DRIVER_BINARIES:
        found = shutil.which(tool)
        if found:
            _link_or_copy(Path(found).resolve(), bin_ / tool)
    with contextlib.suppress(OSError):
        os.rename(tmp, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def _link_or_copy(source: Path, dest: Path) -> None:
    if dest.exists():
        return
    try:
        os.link(source, dest)
    except OSError:
        shutil.copy2(source, dest)
