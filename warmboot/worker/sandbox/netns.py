"""Fresh network namespaces for restored containers, made in-process.

At a snapshot point a container's network namespace holds loopback only (outbound network is attached at
START), so there is nothing in it worth saving. Snapshots therefore declare it external to CRIU, and every
restore hands CRIU a fresh namespace with loopback up instead. CRIU restoring the namespace itself runs
`ip` and `iptables-restore` several times per restore (about 20 ms measured here, for state that is always the
same); making one here takes a system call and an ioctl.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TypeVar

from warmboot.errors import ContainerError

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _in_throwaway_thread(work: Callable[[], T], name: str) -> T:
    """``work()`` on a thread that ends with it: a thread that changes its network namespace (unshare, setns)
    must not go on serving anything else; whatever it made (a descriptor, a socket) outlives it."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def fresh() -> int:
    """An open descriptor of a new network namespace with loopback up (the caller closes it)."""

    def make() -> int:
        # unshare(CLONE_NEWNET) moves only the calling thread, which then ends, leaving the namespace alive
        # through the descriptor opened here.
        if _libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise ContainerError(f"cannot create a network namespace: {os.strerror(err)}")
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack("16sH14x", b"lo", 0)
            flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))
        return fd

    return _in_throwaway_thread(make, "warmboot-netns")


def inode(pid: int) -> int:
    """The inode that names ``pid``'s network namespace (what CRIU's ``--external net[...]`` takes)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def connect(pid: int, port: int, timeout: float) -> socket.socket:
    """A TCP connection to ``127.0.0.1:port`` inside ``pid``'s network namespace (a ``web_server`` function's).

    A socket belongs to the namespace it was made in, whatever thread uses it later: a throwaway thread joins
    the container's namespace, connects and ends, and the gateway uses the connected socket from the host.
    """

    def make() -> socket.socket:
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise ContainerError(f"cannot enter the network namespace of process {pid}: {os.strerror(err)}")
        finally:
            os.close(fd)
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.settimeout(None)
        return sock

    return _in_throwaway_thread(make, "warmboot-netns-connect")
