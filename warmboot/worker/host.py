"""This machine's fingerprint: what a snapshot must match to be restored here."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from dataclasses import dataclass

from warmboot.worker import criu


@dataclass(frozen=True)
class HostFingerprint:
    """CPU model and flags, kernel release and CRIU version of the machine that made or restores a snapshot."""

    cpu_model: str
    cpu_flags_sha256: str
    kernel: str
    criu_version: str

    @property
    def cpu(self) -> str:
        """A short id of the CPU fingerprint (model and flags)."""
        return hashlib.sha256(f"{self.cpu_model}|{self.cpu_flags_sha256}".encode()).hexdigest()[:16]


def _cpuinfo() -> tuple[str, str]:
    model, flags = "unknown", ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model == "unknown":
                model = value.strip()
            elif key == "flags" and not flags:
                # Sorted so that the order the kernel prints them in does not matter.
                flags = " ".join(sorted(value.split()))
            if model != "unknown" and flags:
                break
    return model, flags


@functools.cache
def fingerprint() -> HostFingerprint:
    """The fingerprint of this machine (cached: it does not change while a process runs)."""
    model, flags = _cpuinfo()
    # An operator's label (WARMBOOT_FINGERPRINT_EXTRA) joins the CPU model: nodes that the hardware would group
    # (say, ones with different GPU drivers behind the same CPU) then never restore each other's snapshots.
    extra = os.environ.get("WARMBOOT_FINGERPRINT_EXTRA", "")
    return HostFingerprint(
        cpu_model=f"{model} [{extra}]" if extra else model,
        cpu_flags_sha256=hashlib.sha256(flags.encode()).hexdigest(),
        kernel=platform.release(),
        criu_version=criu.version(),
    )
