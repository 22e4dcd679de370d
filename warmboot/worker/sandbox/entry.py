"""The container's entry point: where the static init lives on the host, and the command line that runs it.

``init.c`` is compiled by ``scripts/build-init.sh`` (part of ``make setup``). The launcher copies the binary
and :func:`warmboot.worker.sandbox.seccomp.export_bpf`'s program into the read-only runtime layer, then runs
:func:`command` as the last step before the function's Python.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from warmboot.errors import HostSetupError
from warmboot.worker.sandbox import capabilities

INIT_BINARY = Path(os.environ.get("WARMBOOT_INIT", "/opt/warmboot/libexec/warmboot-init"))

# Where the runtime layer puts them, as the container sees them.
CONTAINER_INIT = "/__warmboot/init"
CONTAINER_SECCOMP = "/__warmboot/seccomp.bpf"

# The init's own failures (bad arguments, a capability or seccomp step refused); the program's exec failure is 127.
SETUP_FAILED = 125


def init_binary() -> Path:
    """The host's compiled init; raises :class:`HostSetupError` when set-up has not built it."""
    if not INIT_BINARY.is_file():
        raise HostSetupError(f"the container init is missing at {INIT_BINARY}; run `make setup`")
    return INIT_BINARY


def command(
    program: Sequence[str],
    *,
    init: str = CONTAINER_INIT,
    seccomp: str = CONTAINER_SECCOMP,
    root: str | None = None,
    cwd: str = "/",
) -> list[str]:
    """``init [--root DIR --cwd DIR] --seccomp FILE --caps ... -- PROGRAM...``: run ``program`` confined.

    With ``root`` the init first makes that directory the container's root (pivot_root) and enters ``cwd``.
    """
    where = ["--root", root, "--cwd", cwd] if root is not None else []
    return [init, *where, "--seccomp", seccomp, "--caps", capabilities.caps_argument(), "--", *program]
