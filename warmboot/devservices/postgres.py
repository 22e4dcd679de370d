"""A private PostgreSQL cluster (Debian's server binaries) for tests and one-machine trials.

It listens on a Unix socket in its own folder only (no TCP port), runs as the ``postgres`` system user (the
server refuses root), and is removed with its data when the block ends. An operator points warmboot at their own
PostgreSQL instead (``WARMBOOT_DATABASE_URL``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 60


def bin_dir() -> Path:
    """The newest installed PostgreSQL server's binaries (``make setup`` installs Debian's ``postgresql``)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise FileNotFoundError("PostgreSQL's server is not installed: run `make setup` (Debian's postgresql)")
    return Path(found[-1]).parent


@contextlib.contextmanager
def cluster() -> Iterator[str]:
    """A running cluster; yields a URL prefix: append a database name (see :func:`create_database`)."""
    user = pwd.getpwnam("postgres")
    root = Path(tempfile.mkdtemp(prefix="warmboot-pg-", dir="/var/tmp"))
    os.chown(root, user.pw_uid, user.pw_gid)
    data, sockets = root / "data", root / "sockets"
    as_postgres = ["runuser", "-u", "postgres", "--"]
    _run([*as_postgres, str(bin_dir() / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
    sockets.mkdir(mode=0o700)
    os.chown(sockets, user.pw_uid, user.pw_gid)
    options = f"-c listen_addresses='' -c unix_socket_directories={sockets} -c fsync=off -c max_connections=200"
    _run([*as_postgres, str(bin_dir() / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", options,
          "-w", "-t", str(START_TIMEOUT_S), "start"])  # fmt: skip
    try:
        yield f"postgresql://postgres@/?host={sockets}&dbname="
    finally:
        subprocess.run([*as_postgres, str(bin_dir() / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def create_database(prefix: str) -> str:
    """A new, empty database in the cluster at ``prefix``; its URL."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(prefix + "postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return prefix + name


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr or done.stdout}")
