"""Where warmboot keeps its state, and which external tools it runs. Environment variables override."""

from __future__ import annotations

import os
from pathlib import Path

from warmboot.errors import InvalidOptionError

DEFAULT_HOME = Path("/var/lib/warmboot")
DEFAULT_CRIU = Path("/opt/warmboot/criu/bin/criu")  # written by scripts/install-criu.sh


def home() -> Path:
    """Root of warmboot's state (``WARMBOOT_HOME``, default ``/var/lib/warmboot``)."""
    return Path(os.environ.get("WARMBOOT_HOME", DEFAULT_HOME))


def snapshots_dir() -> Path:
    """Where published snapshots live (``$WARMBOOT_HOME/snapshots``)."""
    return home() / "snapshots"


def criu_path() -> Path:
    """The CRIU binary to run (``WARMBOOT_CRIU``, else the one set-up installed, else ``criu`` on PATH)."""
    configured = os.environ.get("WARMBOOT_CRIU")
    if configured:
        return Path(configured)
    if DEFAULT_CRIU.exists():
        return DEFAULT_CRIU
    return Path("criu")


def server_socket() -> Path:
    """The local server's Unix socket (``$WARMBOOT_HOME/server.sock``; root-only)."""
    return home() / "server.sock"


def volume_dir(name: str, home_dir: Path | None = None) -> Path:
    """Where the volume ``name`` keeps its files on this machine (``$WARMBOOT_HOME/volumes/NAME``)."""
    return (home_dir or home()) / "volumes" / name


def value_or_file(name: str) -> str:
    """``NAME``, or the contents of the file ``NAME_FILE`` names (how Kubernetes secrets arrive: a password or
    token kept out of the environment); "" when neither is set."""
    if path := os.environ.get(f"{name}_FILE"):
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise InvalidOptionError(f"{name}_FILE={path!r} cannot be read ({exc})") from exc
    return os.environ.get(name, "").strip()
